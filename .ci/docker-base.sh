#!/usr/bin/env bash
# Make sure the Dockerfile's base image (python:3.11-slim) exists in the local engine.
#
# A locally tagged image is used by `docker build` without pulling, so where no container registry is
# reachable we build a stand-in of the same name: a minimal Debian bookworm (whose python3 is 3.11)
# bootstrapped from the apt mirror this host already uses, plus the small setup the official image has
# (python/pip on PATH, pip allowed system-wide). The Dockerfile itself stays standard for real users.
#
# Usage: .ci/docker-base.sh [IMAGE]   (default python:3.11-slim; env DOCKER_BASE_SUITE=bookworm)
set -euo pipefail

image="${1:-python:3.11-slim}"
suite="${DOCKER_BASE_SUITE:-bookworm}"
log() { printf '[docker-base] %s\n' "$*" >&2; }

if docker image inspect "$image" >/dev/null 2>&1; then
    log "$image is present locally"
    exit 0
fi
if timeout 60 docker pull -q "$image" >/dev/null 2>&1; then
    log "pulled $image"
    exit 0
fi
log "$image cannot be pulled: building a local stand-in from Debian $suite"

# The mirror apt already uses (never a hard-coded host): the repository that serves the bare suite.
mirror="$(apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 2>/dev/null |
    awk -v s="$suite" '$2 == s { print $1; exit }')"
if [[ -z "$mirror" ]]; then
    mirror="$(grep -rhoE '^(deb|URIs:)[[:space:]]+(\[[^]]*\][[:space:]]+)?https?://[^[:space:]]+' \
        /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null |
        grep -v -- '-security' | grep -oE 'https?://[^[:space:]]+' | head -n1 || true)"
fi
[[ -n "$mirror" ]] || { log "no apt mirror found in the apt sources"; exit 1; }

if ! command -v debootstrap >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
fi

# debootstrap honours http_proxy; pass on apt's proxy if the host has one configured.
proxy="$(apt-config dump 2>/dev/null | awk -F'"' '/^Acquire::http::Proxy /{ print $2; exit }')"
if [[ -n "$proxy" && -z "${http_proxy:-}" ]]; then export http_proxy="$proxy"; fi

rootfs="$(mktemp -d)"
trap 'rm -rf "$rootfs"' EXIT
log "debootstrap $suite from $mirror"
debootstrap --variant=minbase \
    --include=python3,python3-venv,python3-pip,ca-certificates \
    "$suite" "$rootfs" "$mirror" >"$rootfs.log" 2>&1 ||
    { tail -n 30 "$rootfs.log" >&2; rm -f "$rootfs.log"; exit 1; }
rm -f "$rootfs.log"

# What the official image gives on top of Debian's python3.
ln -sf python3 "$rootfs/usr/bin/python"
ln -sf pip3 "$rootfs/usr/bin/pip"
rm -f "$rootfs"/usr/lib/python3*/EXTERNALLY-MANAGED
# Keep it slim: no package lists, caches, docs or man pages.
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* "$rootfs"/var/cache/debconf/*-old \
    "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/var/log/*

tar -C "$rootfs" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'LABEL org.opencontainers.image.description=local-stand-in-for-python-3.11-slim' \
    --change 'CMD ["python3"]' \
    - "$image" >/dev/null
docker run --rm "$image" python -c 'import sys, venv, ensurepip; assert sys.version_info[:2] == (3, 11), sys.version'
log "built $image ($(docker image inspect -f '{{.Size}}' "$image" | awk '{ printf "%.0f MB", $1/1e6 }'))"
