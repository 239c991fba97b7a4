#!/usr/bin/env bash
# Installs redis-server and redis-cli from Debian's packages where they are missing: the Redis
# tests and benchmarks run a real redis-server on loopback.
set -euo pipefail
if command -v redis-server >/dev/null && command -v redis-cli >/dev/null; then
    exit 0
fi
echo "redis-server is missing; installing Debian's redis-server package"
sudo=""
[ "$(id -u)" -eq 0 ] || sudo=sudo
$sudo apt-get update -qq
$sudo apt-get install -y -qq redis-server >/dev/null
