#!/usr/bin/env bash
# Fill ./wheelhouse with every wheel the Docker images need, downloaded on the host, so the image build
# runs `pip install --no-index --find-links` with no network (and no TLS/CA setup) inside the build.
#
# torch is taken as the CPU wheel (torch==$TORCH_VERSION+cpu): first from whatever pip is configured
# with here, else from $TORCH_INDEX_URL. The other dependencies come from pyproject.toml's
# [project].dependencies at the versions of constraints.txt, for the image's Python (3.11, manylinux, this
# machine's arch). A stamp of that list and the constraints makes a re-run a no-op until pyproject.toml changes (WHEELHOUSE_REFRESH=1 forces).
#
# Usage: .ci/wheelhouse.sh [DIR]   (default ./wheelhouse; env TORCH_VERSION, TORCH_INDEX_URL, PYTHON)
set -euo pipefail
cd "$(dirname "$0")/.."

dest="${1:-wheelhouse}"
torch_version="${TORCH_VERSION:-2.13.0}"
torch_index="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
py="${PYTHON:-python3}"
[[ -x .venv/bin/python && -z "${PYTHON:-}" ]] && py=.venv/bin/python
log() { printf '[wheelhouse] %s\n' "$*" >&2; }

mkdir -p "$dest"
# Wheels for the image, not for the host: pin the interpreter and platform explicitly.
arch="$(uname -m)"
target=(--only-binary=:all: --python-version 3.11 --implementation cp --abi cp311
    --platform "manylinux_2_28_$arch" --platform "manylinux_2_17_$arch" --platform "manylinux2014_$arch"
    --platform "linux_$arch")

# pip's output (including complaints about a host's unreachable extra indexes) only when it fails.
pip_download() {
    local out rc=0
    out="$(mktemp)"
    "$py" -m pip download -q --disable-pip-version-check -d "$dest" "${target[@]}" "$@" >"$out" 2>&1 || rc=$?
    [[ $rc -eq 0 ]] || grep -v 'is ignored: it is neither a file nor a directory' "$out" >&2 || true
    rm -f "$out"
    return $rc
}

# The project's runtime dependencies; torch is added below as the exact CPU build.
mapfile -t deps < <("$py" - <<'PY'
import re
import tomllib

with open("pyproject.toml", "rb") as f:
    deps = tomllib.load(f)["project"]["dependencies"]
print("\n".join(d for d in deps if re.split(r"[\s\[<>=!~;]", d, maxsplit=1)[0].lower() != "torch"))
PY
)
torch_wheel="$dest/torch-$torch_version+cpu-*.whl"

stamp="$({ printf '%s\n' "torch==$torch_version+cpu" "$arch" "${deps[@]}"; cat constraints.txt; } |
    sha256sum | cut -c1-16)"
if [[ "${WHEELHOUSE_REFRESH:-}" != 1 && -f "$dest/.complete" && "$(cat "$dest/.complete")" == "$stamp" ]] &&
    compgen -G "$torch_wheel" >/dev/null; then
    log "up to date: $(find "$dest" -name '*.whl' | wc -l) wheels (WHEELHOUSE_REFRESH=1 re-resolves)"
    exit 0
fi
rm -f "$dest/.complete"

if ! compgen -G "$torch_wheel" >/dev/null; then
    log "downloading torch==$torch_version+cpu"
    pip_download --no-deps "torch==$torch_version+cpu" 2>/dev/null ||
        pip_download --no-deps --index-url "$torch_index" "torch==$torch_version+cpu"
fi
log "downloading ${#deps[@]} dependencies and their requirements"
# The versions CI tested (constraints.txt), as the image's pip-install will ask for them.
pip_download --find-links "$dest" -c constraints.txt "torch==$torch_version+cpu" "${deps[@]}"
echo "$stamp" >"$dest/.complete"
log "$(find "$dest" -name '*.whl' | wc -l) wheels, $(du -sh "$dest" | cut -f1) in $dest"
