#!/usr/bin/env bash
# `make bench-scale`: how CountApp scales in memory, in sustained load and in tenants. Each run
# gets a fresh coordinator with four local workers (fsync everysec) in a temporary directory on
# free loopback ports, loaded through the coordinator by countapp-load:
#   memory     2M ids in one tenant, 20M in one tenant, 20M over 1,000 tenants: the workers'
#              resident memory (sum of VmRSS) before the load and once the counts converged
#              (plus 2 s), per stored id. Target: at most 40 B/id.
#   sustained  16 connections, batches of 100 over 10 tenants (as `make bench`) for 10, 60 and
#              180 s: items/s, 503s and errors, and the convergence time after the last ack.
#              Target: worker_persist + 2 s.
#   tenants    100,000 and 1,000,000 tenants of one id each: the convergence time after the last
#              ack as the files show it (the newest tenant file's ctime), and as the client sees
#              it (a sample of 1,000 tenants, then all, with the sweep's granularity), the tenant
#              files and their disk use. Targets:
#              worker_persist + 3 s (100k), + 15 s (1M); one file and at most 4.5 KiB per tenant.
# Figures go to target/bench-scale/*.json (each load run's report, and summary.json); a summary
# is printed at the end. Everything started here is stopped on exit, and every run's files are
# kept until then (about 10 GB at full size): on ext4 without a journal, as on this project's
# machine, deleting a million files slows every file created in the next few minutes, which
# would skew the runs that follow.
#
# Environment (defaults in brackets):
#   SCENARIOS          which scenarios, in order ["memory sustained tenants"]
#   WORKER_PERSIST     the workers' worker_persist, seconds [5]
#   MEMORY_RUNS        memory runs as IDS:TENANTS ["2000000:1 20000000:1 20000000:1000"]
#   SUSTAINED          sustained durations, seconds ["10 60 180"]
#   TENANT_RUNS        tenant counts of the tenants scenario, one id each ["100000 1000000"]
#   CONVERGE_TIMEOUT   the load tool's --converge-timeout [300s]
#   CHECK_CONNECTIONS  the load tool's --check-connections [16]
#   BIN_DIR            where coordinator, worker and countapp-load are [target/release]
#   NO_BUILD=1         skip `cargo build --release --workspace --bins`
# A smoke run, a minute or two:
#   WORKER_PERSIST=1 MEMORY_RUNS="200000:1 200000:100" SUSTAINED=3 TENANT_RUNS=10000 make bench-scale
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scenarios=${SCENARIOS:-memory sustained tenants}
persist=${WORKER_PERSIST:-5}
memory_runs=${MEMORY_RUNS:-2000000:1 20000000:1 20000000:1000}
sustained=${SUSTAINED:-10 60 180}
tenant_runs=${TENANT_RUNS:-100000 1000000}
converge_timeout=${CONVERGE_TIMEOUT:-300s}
check_connections=${CHECK_CONNECTIONS:-16}
bin=${BIN_DIR:-target/release}
out=target/bench-scale

for scenario in $scenarios; do
    case $scenario in
        memory | sustained | tenants) ;;
        *) echo "SCENARIOS: unknown scenario '$scenario' (memory, sustained, tenants)" >&2; exit 2 ;;
    esac
done
[[ $persist =~ ^[0-9]+(\.[0-9]+)?$ ]] || { echo "WORKER_PERSIST: not a number of seconds: $persist" >&2; exit 2; }

if [ "${NO_BUILD:-}" != 1 ]; then
    # --workspace: at the root, --bins alone builds only the root package (not countapp-load).
    cargo build --release --workspace --bins
fi
for binary in coordinator worker countapp-load; do
    [ -x "$bin/$binary" ] || { echo "$bin/$binary is missing (BIN_DIR=$bin)" >&2; exit 2; }
done
load="$bin/countapp-load"
mkdir -p "$out"
rm -f "$out"/*.json

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
dir=$(mktemp -d)
results="$dir/results.jsonl"
: > "$results"
coordinator=
worker_pids=()
load_pid=
failed=0

# Stops the current cluster: SIGTERM to the coordinator (which stops its workers, each flushing
# first) and a bounded wait; past it, SIGKILL to the coordinator and to any of its workers still
# running.
stop_cluster() {
    [ -n "$coordinator" ] || return 0
    # A worker that was respawned has a new pid: take the current ones too.
    local pid
    for pid in $(worker_pids_now); do worker_pids+=("$pid"); done
    kill -TERM "$coordinator" 2>/dev/null || true
    local waited=0
    while kill -0 "$coordinator" 2>/dev/null && [ "$waited" -lt 600 ]; do
        sleep 0.1
        waited=$((waited + 1))
    done
    if kill -0 "$coordinator" 2>/dev/null; then
        echo "the coordinator did not stop within 60 s: killing it and its workers" >&2
        kill -KILL "$coordinator" 2>/dev/null || true
    fi
    wait "$coordinator" 2>/dev/null || true
    for pid in "${worker_pids[@]}"; do
        # Only a process that is still one of this cluster's workers (a pid may be reused).
        if grep -qF "$cluster_dir" "/proc/$pid/cmdline" 2>/dev/null; then
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    coordinator=
    worker_pids=()
}

cleanup() {
    if [ -n "$load_pid" ]; then
        kill -TERM "$load_pid" 2>/dev/null || true
        wait "$load_pid" 2>/dev/null || true
    fi
    stop_cluster
    rm -rf "$dir"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The pids of the current cluster's workers, from the coordinator's /stats (none if it does not
# answer).
worker_pids_now() {
    curl -s --max-time 5 "http://127.0.0.1:$listen/stats" 2>/dev/null |
        python3 -c 'import json,sys; [print(w["pid"]) for w in json.load(sys.stdin)["workers"] if w.get("pid")]' \
            2>/dev/null || true
}

# Starts a coordinator with four local workers in $dir/$1 and waits (at most 60 s) until all
# four are live; sets $coordinator, $listen, $cluster_dir and $worker_pids.
start_cluster() {
    cluster_dir="$dir/$1"
    mkdir -p "$cluster_dir"
    listen=$(free_port)
    {
        echo "workers:"
        for _ in 1 2 3 4; do echo "  - http://127.0.0.1:$(free_port)"; done
        echo "database: db/"
        echo "worker_logs: logs/"
        echo "fsync: everysec"
        echo "worker_persist: $persist"
        echo "listen: 127.0.0.1:$listen"
    } > "$cluster_dir/config.yaml"
    "$bin/coordinator" --config "$cluster_dir/config.yaml" 2> "$cluster_dir/coordinator.log" &
    coordinator=$!
    local live=0
    for _ in $(seq 600); do
        live=$(curl -s --max-time 2 "http://127.0.0.1:$listen/health" |
            python3 -c 'import json,sys; print(json.load(sys.stdin)["live_workers"])' 2>/dev/null || echo 0)
        [ "$live" = 4 ] && break
        kill -0 "$coordinator" 2>/dev/null || break
        sleep 0.1
    done
    if [ "$live" != 4 ]; then
        echo "the cluster did not start ($live of 4 workers live):" >&2
        tail -n 30 "$cluster_dir/coordinator.log" >&2
        exit 1
    fi
    mapfile -t worker_pids < <(worker_pids_now)
    if [ "${#worker_pids[@]}" != 4 ]; then
        echo "the coordinator's /stats lists ${#worker_pids[@]} worker pids, not 4" >&2
        exit 1
    fi
}

# The workers' resident memory, summed, in bytes.
workers_rss() {
    local pid total=0 kb
    for pid in "${worker_pids[@]}"; do
        kb=$(awk '/^VmRSS:/ { print $2 }' "/proc/$pid/status" 2>/dev/null || true)
        total=$((total + ${kb:-0} * 1024))
    done
    echo "$total"
}

# Runs the load tool against the current cluster with the arguments after the report's path $1;
# its exit status is recorded, not fatal (1: the check failed, 2: the run failed).
run_load() {
    local json=$1
    shift
    local status=0
    # In the background, so that a signal to this script is handled at once (bash runs a trap
    # only once the foreground command is done; `wait` it interrupts).
    "$load" --url "http://127.0.0.1:$listen" --quiet --json "$json" \
        --converge-timeout "$converge_timeout" --check-connections "$check_connections" "$@" &
    load_pid=$!
    wait "$load_pid" || status=$?
    load_pid=
    if [ "$status" != 0 ]; then
        echo "countapp-load exited with status $status" >&2
        failed=1
    fi
    load_status=$status
}

# Appends one result line: the scenario, the load report's path, and extra JSON fields.
record() {
    local scenario=$1 report=$2 extra=$3
    python3 - "$scenario" "$report" "$extra" "$load_status" >> "$results" <<'EOF'
import json, sys
scenario, report, extra, status = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
line = {"scenario": scenario, "report": report, "load_status": status}
line.update(json.loads(extra))
print(json.dumps(line))
EOF
}

memory() {
    local run ids tenants name json before after
    for run in $memory_runs; do
        ids=${run%%:*}
        tenants=${run##*:}
        name="memory-${ids}-ids-${tenants}-tenants"
        json="$out/$name.json"
        echo "=== memory: $ids ids over $tenants tenant(s) ==="
        start_cluster "$name"
        before=$(workers_rss)
        run_load "$json" --tenants "$tenants" --items "$ids" --connections 16 --batch 100
        sleep 2
        after=$(workers_rss)
        record memory "$json" "{\"ids\": $ids, \"tenants\": $tenants, \"rss_before\": $before, \"rss_after\": $after}"
        stop_cluster
    done
}

sustained() {
    local seconds name json
    for seconds in $sustained; do
        name="sustained-${seconds}s"
        json="$out/$name.json"
        echo "=== sustained: ${seconds} s, 16 connections, batches of 100 over 10 tenants ==="
        start_cluster "$name"
        run_load "$json" --duration "$seconds" --connections 16 --batch 100 --tenants 10
        record sustained "$json" "{\"seconds\": $seconds, \"rss_after\": $(workers_rss)}"
        stop_cluster
    done
}

tenants() {
    local tenants name json shards newest files kib
    for tenants in $tenant_runs; do
        name="tenants-${tenants}"
        json="$out/$name.json"
        echo "=== tenants: $tenants tenants of one id each ==="
        start_cluster "$name"
        # Only a sample is read while the workers merge: reading every count through the
        # coordinator meanwhile would take the CPU the merges need. The verdict reads them all.
        run_load "$json" --tenants "$tenants" --batch 1000 --items "$tenants" --connections 16 --check-sample 1000
        shards="$cluster_dir/db/shards"
        newest=null files=null kib=null
        if [ -d "$shards" ]; then
            newest=$(find "$shards" -name '*.json' ! -name 'SHARD.json' -printf '%C@\n' | sort -n | tail -n 1)
            files=$(find "$shards" -name '*.json' ! -name 'SHARD.json' | wc -l)
            kib=$(du -sk "$shards" | cut -f1)
        fi
        record tenants "$json" \
            "{\"tenants\": $tenants, \"newest_ctime\": ${newest:-null}, \"files\": $files, \"du_kib\": $kib}"
        stop_cluster
    done
}

for scenario in $scenarios; do
    "$scenario"
done

# The summary: figures against their targets, printed and written to summary.json.
python3 - "$results" "$out/summary.json" "$persist" <<'EOF'
import json, sys

results_path, summary_path, persist = sys.argv[1], sys.argv[2], float(sys.argv[3])
summary = []
lines = []

def load_report(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None

def check_text(check):
    if check is None:
        return "no check"
    return "lost %d, unexpected %d" % (check["lost"], check["unexpected"])

def verdict(ok):
    return "ok" if ok else "MISSED"

for raw in open(results_path):
    r = json.loads(raw)
    report = load_report(r["report"])
    run = report["run"] if report else None
    check = report.get("check") if report else None
    entry = {"scenario": r["scenario"], "load_status": r["load_status"], "report": r["report"]}
    if check:
        entry.update({"lost": check["lost"], "unexpected": check["unexpected"], "converged": check["converged"],
                      "waited_s": check["waited"], "sweep_s": check["sweep_s"]})
    if run:
        entry.update({"items_per_s": run["items_per_s"], "errors": run["errors"],
                      "http_503": run["errors_by_kind"].get("HTTP 503", 0), "last_ack_unix_ms": run["last_ack_unix_ms"]})
    if r["scenario"] == "memory":
        ids = check["counted"] if check else r["ids"]
        per_id = (r["rss_after"] - r["rss_before"]) / ids if ids else None
        entry.update({"ids": ids, "tenants": r["tenants"], "rss_before": r["rss_before"],
                      "rss_after": r["rss_after"], "bytes_per_id": per_id, "target_bytes_per_id": 40})
        lines.append("memory     %10d ids / %-7d tenants  RSS %7.1f -> %7.1f MiB  %6s B/id (target <= 40: %s)  %s" % (
            r["ids"], r["tenants"], r["rss_before"] / 2**20, r["rss_after"] / 2**20,
            "%.1f" % per_id if per_id is not None else "n/a",
            verdict(per_id is not None and per_id <= 40), check_text(check)))
    elif r["scenario"] == "sustained":
        target = persist + 2
        entry.update({"seconds": r["seconds"], "rss_after": r["rss_after"], "target_converge_s": target})
        if run and check:
            lines.append(("sustained  %4d s  %9.0f items/s  %d x 503, %d errors  converged %s s after the last ack "
                          "(sweep %.2f s; target <= %.0f s: %s)  RSS %.0f MiB  %s") % (
                r["seconds"], run["items_per_s"], entry["http_503"], run["errors"],
                "%.2f" % check["waited"] if check["converged"] else "NOT within %.0f" % check["waited"],
                check["sweep_s"], target, verdict(check["converged"] and check["waited"] <= target),
                r["rss_after"] / 2**20, check_text(check)))
        else:
            lines.append("sustained  %4d s  the load run failed (status %d)" % (r["seconds"], r["load_status"]))
    elif r["scenario"] == "tenants":
        n = r["tenants"]
        target = persist + (3 if n <= 100_000 else 15)
        server_s = None
        if r["newest_ctime"] is not None and run and run["last_ack_unix_ms"]:
            server_s = r["newest_ctime"] - run["last_ack_unix_ms"] / 1000
        per_tenant = r["du_kib"] / n if r["du_kib"] is not None else None
        entry.update({"tenants": n, "target_converge_s": target, "server_converge_s": server_s,
                      "tenant_files": r["files"], "du_kib": r["du_kib"], "kib_per_tenant": per_tenant,
                      "target_kib_per_tenant": 4.5})
        if run and check:
            client = "sample %s s, all %.2f s (sweep %.2f s)" % (
                "%.2f" % check["sample_s"] if check.get("sample_s") is not None else "n/a",
                check["waited"], check["sweep_s"]) if check["converged"] else "NOT within %.0f s" % check["waited"]
            # The files say when the last tenant became readable; the client's figure adds the
            # time it takes to read a count of every tenant.
            converged_s = server_s if server_s is not None else check["waited"]
            lines.append(("tenants    %8d  converged after the last ack: files %s, client %s (target <= %.0f s: %s)"
                          "  %s tenant files (target %d: %s), %s KiB/tenant (target <= 4.5: %s)  %s") % (
                n, "%.2f s" % server_s if server_s is not None else "n/a", client, target,
                verdict(check["converged"] and converged_s <= target),
                r["files"] if r["files"] is not None else "n/a", n, verdict(r["files"] == n),
                "%.2f" % per_tenant if per_tenant is not None else "n/a",
                verdict(per_tenant is not None and per_tenant <= 4.5), check_text(check)))
        else:
            lines.append("tenants    %8d  the load run failed (status %d)" % (n, r["load_status"]))
    summary.append(entry)

with open(summary_path, "w") as f:
    json.dump({"worker_persist": persist, "runs": summary}, f, indent=2)
print()
print("=== bench-scale summary (worker_persist %g s; figures in %s) ===" % (persist, summary_path.rsplit("/", 1)[0]))
for line in lines:
    print(line)
EOF
exit "$failed"
