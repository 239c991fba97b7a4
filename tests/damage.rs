//! Damaged files and failing disks, as an operator meets them: junk in a tenant's file, a
//! manifest or a segment, a damaged shard record, a segment damaged between two merges, and
//! errors of the disk itself. Each costs at most its tenant (quarantined, its new ids kept) or
//! its shard (its record rebuilt); every other tenant is served on, and every acknowledged id
//! is counted once the damage is repaired. Real processes, real files.

use std::fs;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use countapp_store::{DEFAULT_SHARDS, shard_of};
use countapp_testcluster::{
    Cluster, Immutable, Stopped, batch, client, count, count_reply, eventually, eventually_owner, free_port, get_json,
    metric, post, post_range, running, sigkill, stats, worker_url,
};
use reqwest::StatusCode;

/// How long a round, a repair or a respawn gets to show.
const SETTLED: Duration = Duration::from_secs(15);

/// Waits until `tenant` counts exactly `expected` through the coordinator at `url`.
fn counted(url: &str, tenant: &str, expected: u64) {
    let client = client();
    eventually(SETTLED, &format!("{tenant} counts {expected}"), || {
        count_reply(&client, url, tenant).status() == StatusCode::OK && count(&client, url, tenant) == expected
    });
}

#[test]
fn a_tenant_whose_file_is_junk_is_quarantined_without_delaying_others_and_its_new_ids_are_kept() {
    let (cluster, ports, _, coordinator) = running(2, "worker_persist: 0.2\n");
    let url = coordinator.url();
    let client = client();
    post_range(&url, "bad", 0, 40);
    post_range(&url, "good", 0, 40);
    eventually(SETTLED, "both counted", || count(&client, &url, "bad") == 40 && count(&client, &url, "good") == 40);

    // The bad tenant's file is overwritten with junk; items keep coming for both tenants.
    let bad = cluster.tenant_file("bad");
    fs::write(&bad, "this is not JSON").unwrap();
    post_range(&url, "bad", 40, 70);
    post_range(&url, "good", 40, 70);
    eventually(SETTLED, "the good tenant is not held up", || count(&client, &url, "good") == 70);

    // The bad tenant answers an error naming its file, on every worker, in counts as in
    // listings; the owner shows it.
    let bad_name = bad.file_name().unwrap().to_string_lossy().into_owned();
    for &port in &ports {
        let reply = count_reply(&client, &worker_url(port), "bad");
        assert!(reply.status().is_server_error(), "{}", reply.status());
        let text = reply.text().unwrap();
        assert!(text.contains(&bad_name), "{text}");
        let listed = listing(&worker_url(port));
        assert!(
            listed[0]["tenant"] == "bad" && listed[0]["error"].as_str().is_some_and(|e| e.contains(&bad_name)),
            "{listed}"
        );
        assert_eq!(listed[1], serde_json::json!({"tenant": "good", "count": 70}), "{listed}");
    }
    let owner = eventually_owner(&ports, "bad", SETTLED);
    let quarantined = stats(&worker_url(owner))["quarantined"][0].clone();
    assert_eq!(
        (quarantined["tenant"].as_str(), quarantined["kept_ids"].as_u64()),
        (Some("bad"), Some(30)),
        "{quarantined}"
    );
    let metrics = client.get(format!("{}/metrics", worker_url(owner))).send().unwrap().text().unwrap();
    assert_eq!(metric(&metrics, "countapp_worker_quarantined_tenants", &[]), Some(1.0), "{metrics}");
    // The dashboard shows it on the owner's row.
    let owner_url = worker_url(owner);
    eventually(SETTLED, "the dashboard shows the quarantine", || {
        let body = get_json(&client, &format!("{url}/dashboard.json"));
        body["workers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w["url"] == owner_url && w["quarantined"][0]["tenant"] == "bad")
    });

    // Repaired by removing the junk: the tenant takes the ids kept for it (those only the junk
    // file held are gone), and leaves quarantine.
    fs::remove_file(&bad).unwrap();
    eventually(SETTLED, "the repaired tenant counts its kept ids", || {
        count_reply(&client, &url, "bad").status() == StatusCode::OK && count(&client, &url, "bad") == 30
    });
    eventually(SETTLED, "out of quarantine", || stats(&worker_url(owner))["quarantined"] == serde_json::json!([]));
    post_range(&url, "bad", 70, 80);
    eventually(SETTLED, "ingest goes on", || count(&client, &url, "bad") == 40);
    assert_eq!(listing(&url), serde_json::json!([{"tenant": "bad", "count": 40}, {"tenant": "good", "count": 70}]));
}

/// The tenants that `GET /tenants` at `url` lists, in one page.
fn listing(url: &str) -> serde_json::Value {
    let page = get_json(&client(), &format!("{url}/tenants"));
    assert_eq!(page["next"], serde_json::Value::Null, "{page}");
    page["tenants"].clone()
}

#[test]
fn a_junk_manifest_is_rebuilt_from_its_segments_and_a_junk_segment_quarantines_until_restored() {
    let (cluster, _, _, coordinator) = running(1, "worker_persist: 0.2\n");
    let url = coordinator.url();
    let client = client();
    // Past a small file: the tenant keeps its ids in segments, listed by a manifest.
    post_range(&url, "big", 0, 2000);
    eventually(SETTLED, "counted", || count(&client, &url, "big") == 2000);
    let manifest = cluster.tenant_file("big");
    let segments = manifest.with_extension("");
    assert!(segments.is_dir(), "{} holds segments", segments.display());

    fs::write(&manifest, "{ junk").unwrap();
    post_range(&url, "big", 2000, 2100);
    eventually(SETTLED, "the manifest is rebuilt and the new ids merged", || {
        count_reply(&client, &url, "big").status() == StatusCode::OK && count(&client, &url, "big") == 2100
    });

    // A segment holds ids nothing else does: junk there quarantines the tenant, once a merge
    // reads it, as the next one of at least as many new ids as the newest segment holds does
    // (it absorbs that segment), whichever way the rounds split the posts before.
    let segment = fs::read_dir(&segments).unwrap().flatten().map(|e| e.path()).max().unwrap();
    let saved = fs::read(&segment).unwrap();
    let held = serde_json::from_slice::<Vec<String>>(&saved).unwrap().len();
    fs::write(&segment, "[\"unterminated").unwrap();
    post_at_once(&url, "big", 2100, 2100 + held);
    eventually(SETTLED, "quarantined", || count_reply(&client, &url, "big").status().is_server_error());
    let reply = count_reply(&client, &url, "big").text().unwrap();
    assert!(reply.contains("quarantined"), "{reply}");
    // Its manifest still reads: only the quarantine tells, in a listing as in a count.
    let listed = listing(&url);
    assert!(listed[0]["error"].as_str().is_some_and(|e| e.contains("quarantined")), "{listed}");

    // Restored from a backup: every id is back, the kept ones too.
    fs::write(&segment, saved).unwrap();
    let all = (2100 + held) as u64;
    eventually(SETTLED, "restored", || {
        count_reply(&client, &url, "big").status() == StatusCode::OK && count(&client, &url, "big") == all
    });
}

/// Posts ids `<tenant>-<i>` for `i` in `from..to` to `url` in one batch, so that one merge
/// round takes them all.
fn post_at_once(url: &str, tenant: &str, from: usize, to: usize) {
    let ids: Vec<String> = (from..to).map(|i| format!("{tenant}-{i}")).collect();
    let items: Vec<(&str, &str)> = ids.iter().map(|id| (tenant, id.as_str())).collect();
    assert_eq!(post(&client(), url, batch(&items)).status(), StatusCode::OK);
}

/// A tenant grown into segments: posts of 1,100, 1,200 and 100 ids leave a segment of 2,300
/// and one of 100. The larger is damaged; the next merge, of 2,300 new ids, would absorb both
/// into one new segment. It must fail for this tenant alone, and delete nothing: once the
/// damaged segment is restored, every id counts, also after the worker reloads the tenant from
/// its files. Two damages: junk that is no array, and an array that parses but is not what the
/// segment held (a merge must never copy damage into a new segment and delete the original).
#[test]
fn a_merge_that_meets_a_damaged_segment_deletes_nothing_and_every_id_counts_once_restored() {
    for junk in ["{}", "[\"x\"]\n"] {
        let (cluster, ports, _, coordinator) = running(1, "worker_persist: 0.2\n");
        let url = coordinator.url();
        for (from, to) in [(0, 1100), (1100, 2300), (2300, 2400)] {
            post_at_once(&url, "big", from, to);
            counted(&url, "big", to as u64);
        }
        let segments = cluster.tenant_file("big").with_extension("");
        let mut files: Vec<_> = fs::read_dir(&segments).unwrap().flatten().map(|e| e.path()).collect();
        files.sort();
        assert_eq!(files.len(), 2, "a segment of 2,300 ids and one of 100: {files:?}");
        let saved = fs::read(&files[0]).unwrap();

        fs::write(&files[0], junk).unwrap();
        post_at_once(&url, "big", 2400, 4700);
        let owner = eventually_owner(&ports, "big", SETTLED);
        assert!(count_reply(&client(), &url, "big").status().is_server_error(), "{junk}: quarantined");
        assert!(files[1].exists(), "{junk}: the segment of 100 is still there");
        post_range(&url, "other", 0, 10);
        counted(&url, "other", 10);

        fs::write(&files[0], saved).unwrap();
        counted(&url, "big", 4700);
        eventually(SETTLED, "out of quarantine", || stats(&worker_url(owner))["quarantined"] == serde_json::json!([]));
        // The worker loads the tenant afresh from its files: they hold every id.
        sigkill(coordinator.pid_of(ports[0]));
        eventually(SETTLED, "the worker is respawned", || {
            client().get(format!("{}/ready", worker_url(ports[0]))).send().is_ok_and(|r| r.status().is_success())
        });
        post_at_once(&url, "big", 4700, 4701);
        counted(&url, "big", 4701);
        drop(cluster);
    }
}

/// Every worker killed with SIGKILL, and one byte of junk in one shard's record
/// (`printf '{' > SHARD.json`). Opening a store must not trip over the record, so every worker comes back at
/// the first respawn; the shard's owner rebuilds the record (every log file still present is
/// merged again) and keeps the damaged one aside; every tenant, that shard's included, counts
/// exactly what was acknowledged.
#[test]
fn a_damaged_shard_record_is_rebuilt_and_stops_no_worker() {
    let (cluster, ports, _, coordinator) = running(4, "worker_persist: 0.2\n");
    let url = coordinator.url();
    let tenants: Vec<String> = (0..64).map(|t| format!("t{t}")).collect();
    for tenant in &tenants {
        post_range(&url, tenant, 0, 10);
    }
    for tenant in &tenants {
        counted(&url, tenant, 10);
    }

    let record = cluster.tenant_file("t0").with_file_name("SHARD.json");
    post_range(&url, "t0", 10, 20);
    let pids: Vec<u32> = ports.iter().map(|&port| coordinator.pid_of(port)).collect();
    // The coordinator waits while the workers die and the record is damaged, so that only the
    // workers it respawns ever read the damage.
    let paused = Stopped::new(coordinator.pid());
    for pid in pids {
        sigkill(pid);
    }
    fs::write(&record, "{").unwrap();
    let killed = Instant::now();
    drop(paused);
    counted(&url, "t0", 20);
    for tenant in &tenants[1..] {
        counted(&url, tenant, 10);
    }
    eprintln!("every tenant counted again {:.2} s after every worker was killed", killed.elapsed().as_secs_f64());

    let record_now: serde_json::Value = serde_json::from_slice(&fs::read(&record).unwrap()).unwrap();
    assert!(record_now["merged"].is_object(), "the record is whole again: {record_now}");
    let kept: Vec<_> =
        fs::read_dir(cluster.database().join("damaged")).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(kept.iter().any(|name| name.to_string_lossy().contains("SHARD.json")), "{kept:?}");
    let rebuilt = || -> f64 {
        ports
            .iter()
            .map(|&port| {
                let metrics = client().get(format!("{}/metrics", worker_url(port))).send().unwrap().text().unwrap();
                metric(&metrics, "countapp_worker_rebuilt_shard_records_total", &[]).unwrap_or(0.0)
            })
            .sum()
    };
    // A round's figures reach /metrics once it is over, a moment after its files.
    eventually(SETTLED, "the rebuild is counted", || rebuilt() > 0.0);
    assert_eq!(rebuilt(), 1.0, "one worker rebuilt the record once");
    for worker in stats(&url)["workers"].as_array().unwrap() {
        assert_eq!(worker["restarts"], 1, "respawned once after the kill, never again: {worker}");
    }
}

/// Quarantines the tenant `bad` (ids `bad-0..40` counted, its file overwritten with junk, ids
/// `bad-40..70` posted) through the coordinator at `url`: returns its tenant file, its
/// quarantine file and the worker of `ports` that holds it.
fn quarantine_bad(cluster: &Cluster, ports: &[u16], url: &str) -> (PathBuf, PathBuf, u16) {
    post_range(url, "bad", 0, 40);
    counted(url, "bad", 40);
    let file = cluster.tenant_file("bad");
    fs::write(&file, "this is not JSON").unwrap();
    post_range(url, "bad", 40, 70);
    let owner = eventually_owner(ports, "bad", SETTLED);
    eventually(SETTLED, "the 30 new ids are kept", || kept_ids(owner, "bad") == Some(30));
    (file.clone(), file.with_extension("quarantine"), owner)
}

/// The ids the worker on `port` keeps for the quarantined `tenant`, as its `/stats` says.
fn kept_ids(port: u16, tenant: &str) -> Option<u64> {
    let stats = stats(&worker_url(port));
    stats["quarantined"].as_array()?.iter().find(|q| q["tenant"] == tenant)?["kept_ids"].as_u64()
}

/// A tenant of the same shard as `tenant`, other than it.
fn shard_peer(tenant: &str) -> String {
    let shard = shard_of(tenant, DEFAULT_SHARDS);
    (0..).map(|i| format!("peer{i}")).find(|t| shard_of(t, DEFAULT_SHARDS) == shard).unwrap()
}

/// A crash between a repair's commit and the removal of the quarantine file leaves the file
/// behind (here put back by hand). The repaired tenant must count on, and the worker that next
/// takes the shard removes the file.
#[test]
fn a_quarantine_file_left_behind_by_a_repair_is_ignored_and_removed() {
    let (cluster, ports, _, coordinator) = running(1, "worker_persist: 0.2\n");
    let url = coordinator.url();
    let (file, quarantine, _) = quarantine_bad(&cluster, &ports, &url);
    let left_behind = fs::read(&quarantine).unwrap();
    fs::remove_file(&file).unwrap();
    counted(&url, "bad", 30);
    eventually(SETTLED, "the repair removes the quarantine file", || !quarantine.exists());

    fs::write(&quarantine, &left_behind).unwrap();
    for _ in 0..20 {
        assert_eq!(count(&client(), &url, "bad"), 30, "a quarantine file the record does not list is stale");
        assert_eq!(listing(&url)[0], serde_json::json!({"tenant": "bad", "count": 30}), "listed as it counts");
    }
    sigkill(coordinator.pid_of(ports[0]));
    post_range(&url, "bad", 70, 80);
    counted(&url, "bad", 40);
    assert!(!quarantine.exists(), "the worker that took the shard removed the stale file");
}

/// A damaged quarantine file (junk lines, a head cut short) read by a restarted owner: its
/// shard and every other merge on, the tenant stays in quarantine keeping its new ids, and the
/// log says how many kept ids were lost; the damaged file is kept aside.
#[test]
fn a_damaged_quarantine_file_stops_nothing_else_and_says_what_was_lost() {
    let (cluster, ports, _, coordinator) = running(1, "worker_persist: 0.2\n");
    let url = coordinator.url();
    let (file, quarantine, _) = quarantine_bad(&cluster, &ports, &url);
    fs::write(&quarantine, "{\"tenant\":\"ba\ngarbage\n\"bad-4\n").unwrap();
    sigkill(coordinator.pid_of(ports[0]));
    let peer = shard_peer("bad");
    post_range(&url, &peer, 0, 10);
    post_range(&url, "other", 0, 10);
    post_range(&url, "bad", 70, 75);
    counted(&url, &peer, 10);
    counted(&url, "other", 10);
    eventually(SETTLED, "the new ids are kept", || kept_ids(ports[0], "bad") == Some(5));
    assert!(count_reply(&client(), &url, "bad").status().is_server_error());
    let log = fs::read_to_string(cluster.path().join("logs").join(format!("{}.log", ports[0]))).unwrap();
    assert!(log.contains("the quarantine file is damaged") && log.contains("lost_ids=30"), "{log}");
    let kept: Vec<_> = fs::read_dir(cluster.database().join("damaged")).unwrap().flatten().collect();
    assert!(kept.iter().any(|e| e.file_name().to_string_lossy().ends_with(".quarantine")), "kept aside");

    fs::remove_file(&file).unwrap();
    counted(&url, "bad", 5);
}

/// Ids posted again and again to a quarantined tenant are kept once each: in memory, in
/// `/stats` and in its quarantine file, which grows by the new ids alone.
#[test]
fn a_quarantined_tenant_keeps_each_id_once() {
    let (cluster, ports, _, coordinator) = running(1, "worker_persist: 0.2\n");
    let url = coordinator.url();
    let (_, quarantine, owner) = quarantine_bad(&cluster, &ports, &url);
    for _ in 0..5 {
        post_range(&url, "bad", 40, 70);
    }
    post_range(&url, "bad", 70, 71);
    eventually(SETTLED, "the one new id is kept", || kept_ids(owner, "bad") == Some(31));
    let lines = fs::read_to_string(&quarantine).unwrap().lines().count();
    assert_eq!(lines, 1 + 31, "a head and each kept id once");
}

/// An I/O error while writing a tenant (its segments' directory made immutable, so that not
/// even root may create a file in it) quarantines it; once the directory is writable again the
/// tenant leaves quarantine by itself, though none of its files changed, with every id.
#[test]
fn a_tenant_that_could_not_be_written_recovers_by_itself() {
    let (cluster, ports, _, coordinator) = running(1, "worker_persist: 0.2\n");
    let url = coordinator.url();
    post_at_once(&url, "big", 0, 1100);
    counted(&url, "big", 1100);
    let segments = cluster.tenant_file("big").with_extension("");
    {
        let _frozen = Immutable::new(&segments);
        post_at_once(&url, "big", 1100, 1200);
        eventually_owner(&ports, "big", SETTLED);
        post_range(&url, "other", 0, 10);
        counted(&url, "other", 10);
    }
    counted(&url, "big", 1200);
}

/// A shard whose directory cannot be written (made immutable) is left out of rounds, with a
/// backoff, while every other shard of the same worker merges on; writable again, it catches up
/// with every id.
#[test]
fn an_unwritable_shard_delays_no_other_shard() {
    let (cluster, _, _, coordinator) = running(1, "worker_persist: 0.2\n");
    let url = coordinator.url();
    post_range(&url, "stuck", 0, 10);
    counted(&url, "stuck", 10);
    let shard = cluster.tenant_file("stuck").parent().unwrap().to_path_buf();
    {
        let _frozen = Immutable::new(&shard);
        post_range(&url, "stuck", 10, 20);
        post_range(&url, "other", 0, 10);
        counted(&url, "other", 10);
        assert_eq!(count(&client(), &url, "stuck"), 10);
    }
    counted(&url, "stuck", 20);
}

/// A closed log file whose rename to `.log` fails stays `.open` under a live worker: no record
/// may move past it, and the worker renames it at its next closing, so that its batch is merged
/// and, after a restart, not taken for merged and deleted unread.
#[test]
fn a_log_file_whose_closing_rename_fails_is_merged_all_the_same() {
    let port = free_port();
    let cluster = Cluster::new(&[port], "worker_persist: 0.2\n");
    let failing = [("FAILPOINTS", "store-io-close-log=1*return(EIO)")];
    let mut worker = cluster.worker_with_env("127.0.0.1", port, &failing);
    worker.wait_ready();
    let url = worker.url();
    let post = |ids: &[&str]| {
        let items: Vec<(&str, &str)> = ids.iter().map(|id| ("closing", *id)).collect();
        assert_eq!(post(&client(), &url, batch(&items)).status(), StatusCode::OK);
    };
    post(&["a1", "a2"]);
    eventually(SETTLED, "the first closing fails its rename", || worker.log().contains("keeps its .open name"));
    post(&["b1", "b2", "b3"]);
    counted(&url, "closing", 5);

    worker.kill();
    let mut worker = cluster.worker(port);
    worker.wait_ready();
    post(&["c1"]);
    counted(&worker.url(), "closing", 6);
}
