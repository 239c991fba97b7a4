#!/usr/bin/env bash
# Installs chromium and chromedriver from Debian's packages where they are missing: the
# dashboard's test drives a real headless Chromium through chromedriver.
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    exit 0
fi
echo "chromium or chromedriver is missing; installing Debian's chromium and chromium-driver packages"
sudo=""
[ "$(id -u)" -eq 0 ] || sudo=sudo
$sudo apt-get update -qq
$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
