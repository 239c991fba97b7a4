#!/usr/bin/env bash
# Installs Debian packages for the commands that are missing, so that a fresh machine runs the
# tests and benchmarks with nothing installed by hand. Each argument is COMMAND:PACKAGE, such as
# redis-server:redis-server; the packages of the missing commands are installed in one go.
set -euo pipefail
missing=()
for pair in "$@"; do
    command=${pair%%:*} package=${pair#*:}
    if ! command -v "$command" >/dev/null && [[ " ${missing[*]} " != *" $package "* ]]; then
        missing+=("$package")
    fi
done
[ "${#missing[@]}" -eq 0 ] && exit 0
echo "installing Debian's ${missing[*]} (for commands that are missing)"
sudo=""
[ "$(id -u)" -eq 0 ] || sudo=sudo
$sudo apt-get update -qq
$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
