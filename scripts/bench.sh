#!/usr/bin/env bash
# `make bench`: the load tool against freshly started systems, with Redis measured in the same
# run. Starts redis-server (AOF, appendfsync everysec), then, BENCH_ROUNDS times (3 by default),
# a fresh coordinator with four workers (fsync everysec) in a temporary directory on free
# loopback ports, and measures in each round:
#   1. POST through the coordinator, and the same stream as pipelined SADD into Redis;
#   2. POST straight to one worker, with the whole machine's busy CPU per request: what a POST
#      costs the load tool, the worker and the merging together, which a hop's CPU adds to;
#   3. GET counts through the coordinator, and straight to one worker;
#   4. POST and GET counts through HAProxy in front of the same four workers: the reference for
#      what a hop costs on this machine (an HTTP proxy in C, keep-alive to the workers), with
#      its CPU per request measured as the coordinator's is.
# Then, once:
#   5. redis-benchmark -t sadd -P 100 -c 16, the reference SPEC.md names;
#   6. POST and GET through a coordinator whose workers keep the tenants in that Redis
#      (store: redis), against the store: json figures above; and GET counts straight to one
#      worker, store: redis against store: json (step 3), with their ratio.
# Each run through the coordinator also reports the coordinator's CPU time per forwarded
# request: utime+stime from /proc/<pid>/stat over the run, over the run's delta of /stats
# cluster.requests_forwarded, and stime alone: the kernel's share, which no change to the
# coordinator's own code removes (in target/bench/coordinator-cpu.json). A summary of the ratios
# the SPEC's targets name ends the output: each round's, and their medians, since one run on
# this machine varies by 10-20%.
# Figures go to target/bench/ (round N's in round-N/). Everything started here is stopped on exit.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

duration=${BENCH_DURATION:-10s}
rounds=${BENCH_ROUNDS:-3}
out=target/bench
rm -rf "$out"
mkdir -p "$out"

./scripts/ensure-packages.sh redis-server:redis-server redis-cli:redis-server haproxy:haproxy

cargo build --release --workspace --bins

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
dir=$(mktemp -d)
redis_port=$(free_port)
listen=$(free_port)
haproxy_port=$(free_port)
workers=()
for _ in 1 2 3 4; do workers+=("$(free_port)"); done

cleanup() {
    if [ -n "${haproxy:-}" ]; then kill -TERM "$haproxy" 2>/dev/null && wait "$haproxy" 2>/dev/null || true; fi
    if [ -n "${coordinator:-}" ]; then kill -TERM "$coordinator" 2>/dev/null && wait "$coordinator" 2>/dev/null || true; fi
    redis-cli -p "$redis_port" shutdown nosave >/dev/null 2>&1 || true
    rm -rf "$dir"
}
trap cleanup EXIT

redis-server --port "$redis_port" --bind 127.0.0.1 --dir "$dir" --appendonly yes --appendfsync everysec \
    --save "" --daemonize yes --logfile "$dir/redis.log"
# Empties Redis and rewrites its AOF, so that each measurement starts from the same Redis: one
# left with a round's 20M ids rewrites its AOF (a fork and a full copy) during the next.
fresh_redis() {
    redis-cli -p "$redis_port" flushall >/dev/null
    redis-cli -p "$redis_port" bgrewriteaof >/dev/null
    until redis-cli -p "$redis_port" info persistence | grep -c 'aof_rewrite_in_progress:0\|aof_rewrite_scheduled:0' | grep -q 2; do sleep 0.1; done
}
# A coordinator with four workers in $dir/$1, with the extra config lines $2 (the store).
start_cluster() {
    local name=$1 extra=$2
    mkdir -p "$dir/$name"
    {
        echo "workers:"
        for port in "${workers[@]}"; do echo "  - http://127.0.0.1:$port"; done
        echo "database: db/"
        echo "worker_logs: logs/"
        echo "fsync: everysec"
        echo "listen: 127.0.0.1:$listen"
        echo "$extra"
    } > "$dir/$name/config.yaml"
    ./target/release/coordinator --config "$dir/$name/config.yaml" 2> "$dir/$name/coordinator.log" &
    coordinator=$!
    for _ in $(seq 100); do
        live=$(curl -s "http://127.0.0.1:$listen/health" | python3 -c 'import json,sys; print(json.load(sys.stdin)["live_workers"])' 2>/dev/null || echo 0)
        [ "$live" = 4 ] && return 0
        sleep 0.1
    done
    echo "the cluster did not start:"; cat "$dir/$name/coordinator.log"; exit 1
}

# HAProxy as Debian packages it, with its default threads (one per core), in front of the
# cluster's workers: random balancing as the coordinator's, keep-alive connections to the
# workers, reused across client connections.
start_haproxy() {
    {
        echo "defaults"
        echo "  mode http"
        echo "  option http-keep-alive"
        echo "  timeout connect 5s"
        echo "  timeout client 30s"
        echo "  timeout server 30s"
        echo "frontend hop"
        echo "  bind 127.0.0.1:$haproxy_port"
        echo "  default_backend workers"
        echo "backend workers"
        echo "  balance random"
        echo "  http-reuse always"
        for port in "${workers[@]}"; do echo "  server w$port 127.0.0.1:$port"; done
    } > "$dir/haproxy.cfg"
    haproxy -db -f "$dir/haproxy.cfg" 2> "$dir/haproxy.log" &
    haproxy=$!
    for _ in $(seq 50); do
        curl -s -o /dev/null "http://127.0.0.1:$haproxy_port/health" && return 0
        sleep 0.1
    done
    echo "haproxy did not start:"; cat "$dir/haproxy.log"; exit 1
}
stop_haproxy() {
    kill -TERM "$haproxy" && wait "$haproxy" || true
    haproxy=
}

# A process's CPU time so far, user and system, in clock ticks.
cpu_ticks() { sed 's/.*) //' "/proc/$1/stat" | awk '{ print $12, $13 }'; }
# The requests the coordinator has forwarded to a worker and got an answer to.
forwarded() {
    curl -s "http://127.0.0.1:$listen/stats" | python3 -c 'import json,sys; print(json.load(sys.stdin)["cluster"]["requests_forwarded"])'
}
cpu_figures=()
# Runs the load tool ($2...) through the coordinator, then records the coordinator's CPU per
# forwarded request over that run under the name $1.
through_coordinator() {
    local name=$1
    shift
    local ticks0 fwd0 ticks1 fwd1
    ticks0=$(cpu_ticks "$coordinator")
    fwd0=$(forwarded)
    "$@"
    ticks1=$(cpu_ticks "$coordinator")
    fwd1=$(forwarded)
    cpu_figures+=("$(python3 -c '
import json, sys
name, ticks0, ticks1, fwd, hz = sys.argv[1], sys.argv[2].split(), sys.argv[3].split(), int(sys.argv[4]), int(sys.argv[5])
user, system = ((int(b) - int(a)) / hz for a, b in zip(ticks0, ticks1))
per_request = lambda seconds: round(seconds * 1e6 / fwd, 2) if fwd else None
print(json.dumps({"run": name, "cpu_seconds": user + system, "requests_forwarded": fwd,
                  "cpu_us_per_request": per_request(user + system), "system_us_per_request": per_request(system)}))
' "$name" "$ticks0" "$ticks1" $((fwd1 - fwd0)) "$(getconf CLK_TCK)")")
    echo "coordinator CPU: ${cpu_figures[-1]}"
}
# The whole machine's busy CPU time so far, every core: user, nice, system, irq and softirq (not
# idle, iowait, or the time the hypervisor stole), in clock ticks.
machine_ticks() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8; exit }' /proc/stat; }
# Runs the load tool ($3...) with its JSON written to $1, then adds to that JSON the machine's
# busy CPU per request over the run, and process $2's (HAProxy's) if $2 is not empty.
measured() {
    local json=$1 pid=$2
    shift 2
    local machine0 machine1 ticks0="" ticks1=""
    [ -n "$pid" ] && ticks0=$(cpu_ticks "$pid")
    machine0=$(machine_ticks)
    "$@" --json "$json"
    machine1=$(machine_ticks)
    [ -n "$pid" ] && ticks1=$(cpu_ticks "$pid")
    python3 - "$json" $((machine1 - machine0)) "$(getconf CLK_TCK)" $ticks0 $ticks1 <<'PY'
import json, sys
path, machine, hz, process_ticks = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
report = json.load(open(path))
requests = report["run"]["requests"]
per_request = lambda ticks: round(ticks / hz * 1e6 / requests, 2) if requests else None
report["machine_cpu_us_per_request"] = per_request(machine)
line = f"the machine's CPU: {report['machine_cpu_us_per_request']} us per request"
if process_ticks:
    user0, system0, user1, system1 = map(int, process_ticks)
    report["process_cpu_us_per_request"] = per_request(user1 - user0 + system1 - system0)
    line += f", haproxy's: {report['process_cpu_us_per_request']} us"
json.dump(report, open(path, "w"), indent=2)
print(line)
PY
}

stop_cluster() {
    kill -TERM "$coordinator" && wait "$coordinator" || true
    coordinator=
}

load=./target/release/countapp-load
common=(--duration "$duration" --connections 16 --quiet)
for round in $(seq "$rounds"); do
    r="$out/round-$round"
    mkdir -p "$r"
    fresh_redis
    start_cluster "json-$round" "store: json"
    echo "=== round $round of $rounds: POST through the coordinator (4 workers), and Redis SADD in the same run ==="
    through_coordinator "post, round $round" $load --url "http://127.0.0.1:$listen" "${common[@]}" --batch 100 --tenants 10 \
        --redis "redis://127.0.0.1:$redis_port" --json "$r/coordinator-post.json" --plot "$r/coordinator-post.svg"
    echo "=== round $round of $rounds: POST straight to one worker ==="
    measured "$r/worker-post.json" "" $load --url "http://127.0.0.1:${workers[0]}" "${common[@]}" --batch 100 --tenants 10
    echo "=== round $round of $rounds: GET counts through the coordinator ==="
    through_coordinator "count, round $round" $load --url "http://127.0.0.1:$listen" "${common[@]}" --count --tenants 10 --json "$r/coordinator-count.json"
    echo "=== round $round of $rounds: GET counts straight to one worker ==="
    $load --url "http://127.0.0.1:${workers[0]}" "${common[@]}" --count --tenants 10 --json "$r/worker-count.json"
    start_haproxy
    echo "=== round $round of $rounds: POST through HAProxy (the same 4 workers) ==="
    measured "$r/haproxy-post.json" "$haproxy" $load --url "http://127.0.0.1:$haproxy_port" "${common[@]}" --batch 100 --tenants 10
    echo "=== round $round of $rounds: GET counts through HAProxy ==="
    measured "$r/haproxy-count.json" "$haproxy" $load --url "http://127.0.0.1:$haproxy_port" "${common[@]}" --count --tenants 10
    stop_haproxy
    stop_cluster
done
fresh_redis
echo "=== redis-benchmark -t sadd -P 100 -c 16 -r 100000000 -n 2000000 ==="
redis-benchmark -p "$redis_port" -t sadd -P 100 -c 16 -r 100000000 -n 2000000 -q | tr '\r' '\n' | grep 'requests per second' | tail -n 1

fresh_redis
start_cluster redis "store: redis
redis_url: redis://127.0.0.1:$redis_port"
echo "=== store: redis: POST through the coordinator ==="
through_coordinator redis-store-post $load --url "http://127.0.0.1:$listen" "${common[@]}" --batch 100 --tenants 10 --json "$out/redis-store-post.json"
echo "=== store: redis: GET counts through the coordinator ==="
through_coordinator redis-store-count $load --url "http://127.0.0.1:$listen" "${common[@]}" --count --tenants 10 --json "$out/redis-store-count.json"
echo "=== store: redis: GET counts straight to one worker ==="
$load --url "http://127.0.0.1:${workers[0]}" "${common[@]}" --count --tenants 10 --json "$out/redis-store-worker-count.json"
python3 - "$out/redis-store-worker-count.json" "$out"/round-*/worker-count.json <<'PY'
import json, statistics, sys
rate = lambda path: json.load(open(path))["run"]["requests_per_s"]
redis, json_store = rate(sys.argv[1]), statistics.median(rate(path) for path in sys.argv[2:])
print(f"GET counts straight to one worker: store: redis {redis:,.0f}/s, store: json {json_store:,.0f}/s "
      f"(median of the rounds), ratio {redis / json_store:.2f}x (target at least 0.6x)")
PY
stop_cluster
printf '%s\n' "${cpu_figures[@]}" | python3 -c 'import json,sys; json.dump([json.loads(l) for l in sys.stdin], open(sys.argv[1], "w"), indent=2)' "$out/coordinator-cpu.json"

echo "=== summary (targets from SPEC.md, Performance) ==="
python3 - "$out" "$rounds" <<'PY'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
def load(round, name):
    with open(f"{out}/round-{round}/{name}.json") as f:
        return json.load(f)
cpu_runs = json.load(open(f"{out}/coordinator-cpu.json"))
cpu = {c["run"]: c["cpu_us_per_request"] for c in cpu_runs}
system = {c["run"]: c["system_us_per_request"] for c in cpu_runs}
figures = []
for r in range(1, rounds + 1):
    reports = {n: load(r, n) for n in (
        "coordinator-post", "worker-post", "coordinator-count", "worker-count", "haproxy-post", "haproxy-count")}
    cpost, wpost, ccount, wcount, hpost, hcount = (report["run"] for report in reports.values())
    redis = reports["coordinator-post"]["redis"]["items_per_s"]
    f = {
        "POST items/s through the coordinator": cpost["items_per_s"],
        "POST items/s straight to one worker": wpost["items_per_s"],
        "Redis SADD items/s": redis,
        "POST coordinator/worker (target >= 0.9)": cpost["items_per_s"] / wpost["items_per_s"],
        "POST coordinator/Redis (target >= 2)": cpost["items_per_s"] / redis,
        "GET counts/s through the coordinator": ccount["requests_per_s"],
        "GET counts/s straight to one worker": wcount["requests_per_s"],
        "GET coordinator/worker (target >= 0.5)": ccount["requests_per_s"] / wcount["requests_per_s"],
        "p99 ms POST through the coordinator (target <= 10)": cpost["latency_ms"]["p99"],
        "p99 ms GET through the coordinator (target <= 5)": ccount["latency_ms"]["p99"],
        "coordinator CPU us per POST (target <= 15)": cpu[f"post, round {r}"],
        "coordinator CPU us per GET (target <= 15)": cpu[f"count, round {r}"],
        "  of which in the kernel, per POST": system[f"post, round {r}"],
        "  of which in the kernel, per GET": system[f"count, round {r}"],
        "machine CPU us per POST straight to one worker": reports["worker-post"]["machine_cpu_us_per_request"],
        "POST HAProxy/worker (reference)": hpost["items_per_s"] / wpost["items_per_s"],
        "GET HAProxy/worker (reference)": hcount["requests_per_s"] / wcount["requests_per_s"],
        "HAProxy CPU us per POST (reference)": reports["haproxy-post"]["process_cpu_us_per_request"],
        "HAProxy CPU us per GET (reference)": reports["haproxy-count"]["process_cpu_us_per_request"],
    }
    figures.append(f)
fmt = lambda v: f"{v:,.0f}" if v >= 1000 else f"{v:.2f}"
width = max(map(len, figures[0]))
print(f"{'':{width}}  " + "  ".join(f"{f'round {r}':>10}" for r in range(1, rounds + 1)) + f"  {'median':>10}")
medians = {}
for name in figures[0]:
    values = [f[name] for f in figures]
    medians[name] = statistics.median(values)
    print(f"{name:{width}}  " + "  ".join(f"{fmt(v):>10}" for v in values) + f"  {fmt(medians[name]):>10}")
json.dump({"rounds": figures, "median": medians}, open(f"{out}/summary.json", "w"), indent=2)
print("store: redis, coordinator CPU us per forwarded request: "
      + ", ".join(f"{name} {us}" for name, us in cpu.items() if name.startswith("redis")))
PY
