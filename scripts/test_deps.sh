#!/usr/bin/env bash
# System packages the test suite needs beyond .venv: Debian's chromium (album-report test) and prometheus.
# Installs only what is missing; needs root for apt (CI runs as root). Without it the browser test fails loudly.
set -euo pipefail
# checkov, which the deploy tests run, in its own venv (.venv-checkov; no root needed).
bash "$(dirname "$0")/checkov_venv.sh"
# Debian packages, each installed only when its commands are missing: chromium (the album-report test),
# prometheus (promtool and prometheus for the monitoring tests, which start their own prometheus on a free
# loopback port with a temporary config and data folder: the package's own service is not used).
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
{ command -v promtool && command -v prometheus; } >/dev/null 2>&1 || missing+=(prometheus)
if [ ${#missing[@]} = 0 ]; then
  echo "chromium, prometheus: up to date"
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "${missing[*]} missing and installing needs root: apt-get install ${missing[*]}" >&2
  exit 0
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
if [[ " ${missing[*]} " == *" prometheus "* ]]; then
  # Where systemd runs, the package starts its service on :9090; nothing here needs it.
  systemctl disable --now prometheus >/dev/null 2>&1 || true
  echo "prometheus: installed $(prometheus --version 2>&1 | head -1)"
fi
if [[ " ${missing[*]} " == *" chromium "* ]]; then
  echo "chromium: installed $(chromium --version 2>/dev/null | head -1)"
fi
