#!/usr/bin/env bash
# Installs iproute2 (the `ip` command) from Debian's packages where it is missing: the multi-host
# test (tests/multihost.rs) builds its hosts as network namespaces with it.
set -euo pipefail
if command -v ip >/dev/null; then
    exit 0
fi
echo "ip is missing; installing Debian's iproute2 package"
sudo=""
[ "$(id -u)" -eq 0 ] || sudo=sudo
$sudo apt-get update -qq
$sudo apt-get install -y -qq iproute2 >/dev/null
