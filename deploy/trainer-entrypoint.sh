#!/bin/sh
# Entrypoint of the trainer image.
#   With arguments: they go straight to `python -m trainer` (docker run carvae-trainer --help).
#   Without: the docker-compose one-shot. Trains on /data when it holds images (any file type the
#   trainer reads), otherwise on the embedded synthetic cars, into $CARVAE_TRAIN_OUT with --if-missing,
#   so a valid checkpoint for the same configuration makes it exit at once.
#   Settings (all optional; the trainer's own defaults otherwise):
#     CARVAE_TRAIN_DATA         auto (default) | synthetic | a folder inside the container
#     CARVAE_TRAIN_DATA_DIR     the folder "auto" looks in (default /data, where compose mounts ./data)
#     CARVAE_TRAIN_OUT          run directory (default /models/current)
#     CARVAE_TRAIN_EPOCHS, CARVAE_TRAIN_MAX_MINUTES, CARVAE_TRAIN_IMAGE_SIZE, CARVAE_TRAIN_LATENT_DIM,
#     CARVAE_TRAIN_SEED, CARVAE_TRAIN_DEVICE
#     CARVAE_TRAIN_EXTRA_ARGS   more trainer flags, split on spaces (e.g. "--smoke")
set -eu

if [ "$#" -gt 0 ]; then
    exec python -m trainer "$@"
fi

# A value argparse cannot parse would end in a page of usage and "argument --epochs: invalid int value",
# naming a flag the user never wrote: check the numbers here and name the variable instead. (Ranges,
# e.g. epochs >= 1, are the trainer's to check; its one-line errors name the setting well enough.)
check_number() {  # VARIABLE WHAT whole|decimal; empty is fine (the trainer's default)
    eval "value=\"\${$1:-}\""
    [ -n "$value" ] || return 0
    case "${value#-}" in
        "" | . | *[!0-9.]* | *.*.*) ;;
        *.*) [ "$3" = decimal ] && return 0 ;;
        *) return 0 ;;
    esac
    echo "trainer: error: $1 must be $2, got '$value'" >&2
    exit 2
}
for var in CARVAE_TRAIN_EPOCHS CARVAE_TRAIN_IMAGE_SIZE CARVAE_TRAIN_LATENT_DIM CARVAE_TRAIN_SEED; do
    check_number "$var" "a whole number" whole
done
check_number CARVAE_TRAIN_MAX_MINUTES "a number of minutes (e.g. 5 or 0.5)" decimal

data="${CARVAE_TRAIN_DATA:-auto}"
data_dir="${CARVAE_TRAIN_DATA_DIR:-/data}"
# The container runs as uid 10001: a host folder or photos that only their owner may read (umask 077,
# chmod 700/600) are invisible to it. Say so, instead of quietly training on something else.
unreadable_hint() {
    echo "trainer: warning: uid $(id -u) (the container's user) cannot read $1; make it readable on" \
        "the host (chmod -R a+rX ./data) to train on those photos" >&2
}
if [ "$data" = auto ]; then
    data=synthetic
    if [ -d "$data_dir" ] && ! { [ -r "$data_dir" ] && [ -x "$data_dir" ]; }; then
        unreadable_hint "$data_dir"
        echo "trainer: warning: falling back to the synthetic cars" >&2
    # The trainer's IMAGE_EXTENSIONS (trainer/data.py; a test keeps the two lists equal), and like the
    # trainer not in hidden files or folders (macOS ._car.jpg copies, .thumbnails).
    elif [ -d "$data_dir" ] && find -L "$data_dir" -mindepth 1 -name '.*' -prune -o -type f \
        \( -iname '*.jpg' -o -iname '*.jpeg' -o -iname '*.jfif' -o -iname '*.jpe' -o -iname '*.png' \
        -o -iname '*.webp' -o -iname '*.bmp' -o -iname '*.gif' -o -iname '*.tif' -o -iname '*.tiff' \) \
        -print 2>/dev/null | head -n 1 | grep -q .; then
        data="$data_dir"
    fi
fi
echo "trainer: data=$data out=${CARVAE_TRAIN_OUT:-/models/current}"
if [ -d "$data" ]; then
    hidden="$(find -L "$data" \( -type d ! -executable -o ! -readable \) -print 2>/dev/null | wc -l)"
    [ "$hidden" -eq 0 ] || unreadable_hint "$hidden file(s) or folder(s) under $data"
fi

set -- --data "$data" --out "${CARVAE_TRAIN_OUT:-/models/current}" --if-missing
[ -n "${CARVAE_TRAIN_EPOCHS:-}" ] && set -- "$@" --epochs "$CARVAE_TRAIN_EPOCHS"
[ -n "${CARVAE_TRAIN_MAX_MINUTES:-}" ] && set -- "$@" --max-minutes "$CARVAE_TRAIN_MAX_MINUTES"
[ -n "${CARVAE_TRAIN_IMAGE_SIZE:-}" ] && set -- "$@" --image-size "$CARVAE_TRAIN_IMAGE_SIZE"
[ -n "${CARVAE_TRAIN_LATENT_DIM:-}" ] && set -- "$@" --latent-dim "$CARVAE_TRAIN_LATENT_DIM"
[ -n "${CARVAE_TRAIN_SEED:-}" ] && set -- "$@" --seed "$CARVAE_TRAIN_SEED"
[ -n "${CARVAE_TRAIN_DEVICE:-}" ] && set -- "$@" --device "$CARVAE_TRAIN_DEVICE"
# Without a terminal (docker compose up, CI logs) progress bars are noise; epoch summaries still print.
[ -t 1 ] || set -- "$@" --no-progress
# Word splitting of the extra flags is intended.
# shellcheck disable=SC2086
exec python -m trainer "$@" ${CARVAE_TRAIN_EXTRA_ARGS:-}
