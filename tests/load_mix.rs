//! The load tool's mixed workload (`countapp-load --mix`) against a real cluster of three
//! workers: strong counts, membership checks, `POST /counts` and deletes among the batches,
//! every answer checked as it comes, then the set check across the deletes and the membership
//! check of the ids around them. An honest cluster must pass all of it, and the report must give
//! each kind of request its own figures.
//!
//! The tool is the `countapp-load` binary of the workspace, built beside these tests by
//! `cargo test --workspace` (as `make tests` runs it), or by `cargo build -p countapp-load`.

use std::process::Command;

use countapp_testcluster::{binary, running};
use serde_json::Value;

#[test]
fn the_mixed_workload_passes_its_checks_through_a_coordinator() {
    // Merges every 0.2 s, so that the eventual counts the set check waits for converge soon.
    let (cluster, _ports, _listen, coordinator) = running(3, "worker_persist: 0.2\n");
    let json = cluster.path().join("mix.json");
    // Shares far above a realistic mix, so that 4 s hold several of each kind, deletes included
    // (a debug build of three workers on a small machine answers some tens of requests a second
    // under this mix, strong reads being barriers).
    let output = Command::new(binary("countapp-load"))
        .args(["--url", &coordinator.url(), "--quiet", "--json"])
        .arg(&json)
        .args(["--mix", "strong=0.1,contains=0.1,counts=0.05,delete=0.05"])
        .args(["-d", "4s", "-c", "8", "-b", "50", "--tenants", "12", "--repeat", "0.2", "--converge-timeout", "10s"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    let errors = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "countapp-load failed:\n{text}\n{errors}");
    let report: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();

    assert_eq!(report["mode"], "mix", "{text}");
    for kind in ["batch", "strong", "contains", "counts", "delete"] {
        let figures = &report["run"]["operations"][kind];
        assert!(figures["requests"].as_u64().unwrap() > 0, "no {kind} request:\n{text}");
        assert!(figures["latency_ms"]["p99"].as_f64().unwrap() > 0.0, "{kind}: {figures}");
        assert!(text.contains(&format!("\n  {kind} ")), "no row for {kind} in\n{text}");
    }
    let check = &report["check"];
    assert_eq!((check["lost"].as_u64(), check["unexpected"].as_u64()), (Some(0), Some(0)), "{text}");
    assert!(check["acked"].as_u64().unwrap() > 0, "{text}");
    let mix = &report["mix"];
    assert_eq!(mix["wrong_answers"], 0, "{text}");
    // Deleted tenants were asked about the ids on both sides of their last delete.
    let membership = &mix["membership"];
    assert!(membership["tenants"].as_u64().unwrap() > 0, "{text}");
    assert!(membership["gone_asked"].as_u64().unwrap() > 0, "{text}");
    assert!(membership["kept_asked"].as_u64().unwrap() > 0, "{text}");
    assert_eq!((membership["gone_found"].as_u64(), membership["kept_missing"].as_u64()), (Some(0), Some(0)));
    println!("{text}");
}
