#!/usr/bin/env bash
# Runs `cargo test` with the given arguments, shows its output as it comes, and ends with one
# plain line, "N passed, M failed", summed over every test binary (cargo prints one
# "test result:" line per binary, which is hard to add up by eye). Exits with cargo's status,
# so a build error or a failed test fails the caller.
set -uo pipefail

log=$(mktemp)
trap 'rm -f "$log"' EXIT

cargo test "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}

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
    echo "cargo test exited with status $status before all tests could report (see above)"
fi
echo "$passed passed, $failed failed"
exit "$status"
