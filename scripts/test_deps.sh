#!/usr/bin/env bash
# System packages the test suite needs beyond .venv: Debian's chromium for the album-report test.
# Installs only what is missing; needs root for apt (CI runs as root). Without it the browser test fails loudly.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
  echo "chromium: up to date"
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "chromium is missing and installing it needs root: apt-get install chromium" >&2
  exit 0
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
echo "chromium: installed $(chromium --version 2>/dev/null | head -1)"
