#!/usr/bin/env bash
# Debian packages the Python test suite needs beyond the venv: chromium + chromedriver for the browser tests,
# nginx for the reverse-proxy test (tests/test_nginx_proxy.py runs deploy/nginx.conf).
# Idempotent; does nothing when they are present; skips (those tests then skip) when not root.
set -euo pipefail
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
# /usr/sbin is not on every user's PATH. Debian's `nginx` package has the ssl, http2 and proxy modules the
# test needs (Debian 12's nginx-light is that package plus the echo module).
command -v nginx >/dev/null 2>&1 || [[ -x /usr/sbin/nginx ]] || need+=(nginx)
[[ ${#need[@]} -eq 0 ]] && exit 0
if [[ $(id -u) -ne 0 ]]; then
    echo "system-deps: not root; install ${need[*]} yourself to run the browser and nginx tests" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
# Installing nginx would start it on port 80 (the package's default site): not on a CI or developer host.
# policy-rc.d answering 101 stops a package from starting its service; only ours, only during the install.
own_policy=
if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    own_policy=1
fi
trap 'if [[ -n $own_policy ]]; then rm -f /usr/sbin/policy-rc.d; fi' EXIT
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
