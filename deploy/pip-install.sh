#!/bin/sh
# pip install into the image's virtualenv (used by the Dockerfile's deps stage).
# Offline (--no-index --find-links) when the build context's wheelhouse/ holds wheels and the build arg
# WHEELHOUSE is not "off"; otherwise from the package index (and any --index-url the caller passes).
set -eu
wheels=/build/wheelhouse
mode="${WHEELHOUSE:-auto}"
if [ "$mode" != off ] && ls "$wheels"/*.whl >/dev/null 2>&1; then
    echo "pip-install: offline, from wheelhouse/"
    set -- --no-index --find-links "$wheels" "$@"
elif [ "$mode" = on ]; then
    echo "pip-install: WHEELHOUSE=on but wheelhouse/ holds no wheels (run .ci/wheelhouse.sh)" >&2
    exit 1
else
    echo "pip-install: online, from the package index"
fi
exec /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check --root-user-action=ignore "$@"
