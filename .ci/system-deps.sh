#!/usr/bin/env bash
# Debian packages the Python test suite needs beyond the venv: chromium + chromedriver for the browser tests.
# Idempotent; does nothing when they are present; skips (the browser tests then skip) when not root.
set -euo pipefail
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
[[ ${#need[@]} -eq 0 ]] && exit 0
if [[ $(id -u) -ne 0 ]]; then
    echo "system-deps: not root; install ${need[*]} yourself to run the browser tests" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
