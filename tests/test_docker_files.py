"""The Docker deliverables without a Docker engine: the trainer image's entrypoint (run with a stand-in
`python` that records its arguments), the PNG checker the Docker CI relies on, and the consistency of
docker-compose.yml / Dockerfile with the code they configure. The real images and stack are exercised
by `make docker-test` (.ci/docker-test.sh)."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
ENTRYPOINT = ROOT / "deploy" / "trainer-entrypoint.sh"


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _load_smoke() -> ModuleType:
    spec = importlib.util.spec_from_file_location("docker_smoke", ROOT / ".ci" / "docker_smoke.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["docker_smoke"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


smoke = _load_smoke()


# --- trainer entrypoint ----------------------------------------------------------------------------------
@pytest.fixture
def run_entrypoint(tmp_path: Path):
    """Run the entrypoint with a fake `python` first on PATH; returns the argv it would have exec'd."""
    if shutil.which("sh") is None:
        pytest.skip("needs a POSIX sh")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "python"
    record = "import json, sys; print(json.dumps(sys.argv[1:]))"
    fake.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -c "{record}" "$@"\n')
    fake.chmod(0o755)

    def run(*args: str, **env: str) -> list[str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith("CARVAE_TRAIN_")}
        base["PATH"] = f"{bin_dir}{os.pathsep}{base.get('PATH', '')}"
        base.setdefault("CARVAE_TRAIN_DATA_DIR", str(tmp_path / "no-such-dir"))
        out = subprocess.run(
            ["sh", str(ENTRYPOINT), *args], env={**base, **env}, capture_output=True, text=True, check=True
        ).stdout
        return json.loads(out.strip().splitlines()[-1])

    return run


def test_entrypoint_passes_arguments_straight_to_the_trainer(run_entrypoint) -> None:
    assert run_entrypoint("--help") == ["-m", "trainer", "--help"]
    assert run_entrypoint("--data", "x y", "--out", "o") == ["-m", "trainer", "--data", "x y", "--out", "o"]


def test_entrypoint_without_images_trains_on_synthetic_cars(run_entrypoint, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "README.md").write_text("put car photos here")
    argv = run_entrypoint(CARVAE_TRAIN_DATA_DIR=str(data))
    assert argv[:7] == ["-m", "trainer", "--data", "synthetic", "--out", "/models/current", "--if-missing"]
    assert "--no-progress" in argv  # stdout is a pipe here, as under docker compose


def test_entrypoint_uses_the_data_folder_when_it_holds_images(run_entrypoint, tmp_path: Path) -> None:
    nested = tmp_path / "data" / "brand"
    nested.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(nested / "car.JPG")
    argv = run_entrypoint(CARVAE_TRAIN_DATA_DIR=str(tmp_path / "data"))
    assert argv[argv.index("--data") + 1] == str(tmp_path / "data")


def test_entrypoint_does_not_take_hidden_files_for_photos(run_entrypoint, tmp_path: Path) -> None:
    """The trainer leaves hidden files and folders out (macOS ._car.jpg copies, .thumbnails): a folder
    holding only those was picked as the data, and the trainer then said it held no images."""
    data = tmp_path / "data"
    (data / ".thumbnails").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(data / ".thumbnails" / "car.png")
    (data / "._car.jpg").write_bytes(b"\x00\x05\x16\x07")
    argv = run_entrypoint(CARVAE_TRAIN_DATA_DIR=str(data))
    assert argv[argv.index("--data") + 1] == "synthetic"


@pytest.fixture
def run_entrypoint_locked_out():
    """Run the entrypoint with a fake `python` (prints one argument a line) as a user that may not read
    the paths given (mode 0; as root, which may read anything, it runs as nobody via setpriv). Returns
    (the trainer's argv, stderr). Works in a world-readable temp folder, so that nobody reaches it."""
    if shutil.which("sh") is None or shutil.which("find") is None:
        pytest.skip("needs a POSIX sh and find")
    drop: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("as root, needs setpriv to run as another user")
        drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]
    base = Path(tempfile.mkdtemp(prefix="carvae-entrypoint-"))
    base.chmod(0o755)
    bin_dir = base / "bin"
    bin_dir.mkdir(mode=0o755)
    fake = bin_dir / "python"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    fake.chmod(0o755)
    locked: list[Path] = []

    def run(data: Path, *unreadable: Path) -> tuple[list[str], str]:
        for path in unreadable:
            path.chmod(0)
            locked.append(path)
        env = {k: v for k, v in os.environ.items() if not k.startswith("CARVAE_TRAIN_")}
        env |= {"PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", "CARVAE_TRAIN_DATA_DIR": str(data)}
        result = subprocess.run(
            [*drop, "sh", str(ENTRYPOINT)], env=env, capture_output=True, text=True, check=True, cwd=base
        )
        return result.stdout.splitlines()[1:], result.stderr

    yield base, run
    for path in locked:
        path.chmod(0o755)
    shutil.rmtree(base)


def _photos(folder: Path, *names: str) -> None:
    for name in names:
        (folder / name).parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(folder / name)


def test_entrypoint_says_so_when_the_data_folder_is_unreadable(run_entrypoint_locked_out) -> None:
    """A ./data the container's user may not read (host umask 077, chmod 700) meant a silent fallback to
    the synthetic cars: the user's photos were ignored without a word."""
    base, run = run_entrypoint_locked_out
    data = base / "data"
    _photos(data, "car.jpg")
    argv, stderr = run(data, data)
    assert argv[argv.index("--data") + 1] == "synthetic"
    assert f"cannot read {data};" in stderr and "chmod -R a+rX ./data" in stderr
    assert "falling back to the synthetic cars" in stderr


def test_entrypoint_says_so_when_some_photos_are_unreadable(run_entrypoint_locked_out) -> None:
    base, run = run_entrypoint_locked_out
    data = base / "data"
    _photos(data, "car.jpg", "brand/a.png", "brand/b.png", "other.jpg")
    argv, stderr = run(data, data / "brand", data / "other.jpg")
    assert argv[argv.index("--data") + 1] == str(data)
    assert f"cannot read 2 file(s) or folder(s) under {data};" in stderr


def test_entrypoint_is_quiet_when_every_photo_is_readable(run_entrypoint_locked_out) -> None:
    base, run = run_entrypoint_locked_out
    data = base / "data"
    _photos(data, "car.jpg", "brand/a.png")
    for path in (data, data / "car.jpg", data / "brand", data / "brand" / "a.png"):
        path.chmod(0o755)
    argv, stderr = run(data)
    assert argv[argv.index("--data") + 1] == str(data)
    assert stderr == ""


def test_entrypoint_maps_every_setting_to_its_flag(run_entrypoint) -> None:
    argv = run_entrypoint(
        CARVAE_TRAIN_DATA="synthetic",
        CARVAE_TRAIN_OUT="/models/other",
        CARVAE_TRAIN_EPOCHS="3",
        CARVAE_TRAIN_MAX_MINUTES="1.5",
        CARVAE_TRAIN_IMAGE_SIZE="128",
        CARVAE_TRAIN_LATENT_DIM="32",
        CARVAE_TRAIN_SEED="7",
        CARVAE_TRAIN_DEVICE="cpu",
        CARVAE_TRAIN_EXTRA_ARGS="--smoke --batch-size 8",
    )
    for flag, value in {
        "--data": "synthetic",
        "--out": "/models/other",
        "--epochs": "3",
        "--max-minutes": "1.5",
        "--image-size": "128",
        "--latent-dim": "32",
        "--seed": "7",
        "--device": "cpu",
    }.items():
        assert argv[argv.index(flag) + 1] == value, (flag, argv)
    assert argv[-3:] == ["--smoke", "--batch-size", "8"]


@pytest.mark.parametrize(
    ("variable", "value", "must_be"),
    [
        ("CARVAE_TRAIN_EPOCHS", "abc", "a whole number"),
        ("CARVAE_TRAIN_IMAGE_SIZE", "64.5", "a whole number"),
        ("CARVAE_TRAIN_SEED", "-", "a whole number"),
        ("CARVAE_TRAIN_LATENT_DIM", "1 28", "a whole number"),
        ("CARVAE_TRAIN_MAX_MINUTES", "5min", "a number of minutes (e.g. 5 or 0.5)"),
    ],
)
def test_a_setting_that_is_not_a_number_is_named_in_one_line(
    run_entrypoint, variable: str, value: str, must_be: str
) -> None:
    """It went through to argparse: 24 lines of usage, then "argument --epochs: invalid int value"."""
    with pytest.raises(subprocess.CalledProcessError) as failed:
        run_entrypoint(**{variable: value})
    assert failed.value.returncode == 2
    assert failed.value.stderr.splitlines() == [
        f"trainer: error: {variable} must be {must_be}, got '{value}'"
    ]


@pytest.mark.parametrize("value", ["30", "0.5", ".5"])
def test_numbers_pass_through_to_the_trainer(run_entrypoint, value: str) -> None:
    """Whole numbers for the integer settings, decimals only for the minutes; ranges are the trainer's."""
    argv = run_entrypoint(CARVAE_TRAIN_MAX_MINUTES=value, CARVAE_TRAIN_SEED="-1")
    assert argv[argv.index("--max-minutes") + 1] == value and argv[argv.index("--seed") + 1] == "-1"


def test_empty_settings_leave_the_trainer_defaults(run_entrypoint) -> None:
    argv = run_entrypoint(CARVAE_TRAIN_EPOCHS="", CARVAE_TRAIN_DEVICE="")
    assert "--epochs" not in argv and "--device" not in argv


# --- the PNG checker -------------------------------------------------------------------------------------
def _png(width: int, height: int, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (width, height), "red" if mode != "L" else 128).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("size", "mode"), [((64, 64), "RGB"), ((530, 134), "RGB"), ((3, 5), "RGBA"), ((7, 2), "L")]
)
def test_png_size_reads_valid_pngs(size: tuple[int, int], mode: str) -> None:
    assert smoke.png_size(_png(*size, mode=mode)) == size


def test_png_size_rejects_broken_pngs() -> None:
    good = _png(16, 16)
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF
    jpeg = io.BytesIO()
    Image.new("RGB", (16, 16)).save(jpeg, "JPEG")
    for bad in (b"", good[:20], good[:-12], bytes(flipped), jpeg.getvalue(), b'{"error": {}}'):
        with pytest.raises(ValueError):
            smoke.png_size(bad)


# --- compose / Dockerfile agree with the code ------------------------------------------------------------
def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_training_settings_are_all_read_by_the_entrypoint() -> None:
    script = ENTRYPOINT.read_text()
    names = _compose()["services"]["trainer"]["environment"]
    assert names, "the trainer's settings are documented in the compose file"
    for name in names:
        assert f"${{{name}" in script, f"{name} is set in docker-compose.yml but unused by the entrypoint"


def test_compose_service_settings_exist_in_the_service_config() -> None:
    from service.config import Settings

    fields = {f"CARVAE_{name}" for name in Settings.model_fields}
    for name in _compose()["services"]["service"]["environment"]:
        assert name in fields, f"{name} in docker-compose.yml is not a service setting"


def test_compose_passes_every_service_setting_through() -> None:
    """A setting put in .env reaches the service (only four did: the others were silently ignored)."""
    from service.config import Settings

    env = _compose()["services"]["service"]["environment"]
    in_container = {"HOST", "PORT", "CHECKPOINT"}  # fixed by the image and the volume layout
    for name in Settings.model_fields:
        if name in in_container:
            continue
        assert env.get(f"CARVAE_{name}") == f"${{CARVAE_{name}:-}}", (
            f"CARVAE_{name} is not passed through as ${{CARVAE_{name}:-}} (empty = the default)"
        )


def test_compose_stops_gracefully() -> None:
    """Signals reach Python through an init, and `docker compose down` waits for the service's drain."""
    from service.config import Settings

    services = _compose()["services"]
    assert services["trainer"]["init"] is True and services["service"]["init"] is True
    grace = re.fullmatch(r"\$\{CARVAE_STOP_GRACE_PERIOD:-(\d+)s\}", services["service"]["stop_grace_period"])
    assert grace is not None
    defaults = Settings(CHECKPOINT=Path("x"))
    assert int(grace.group(1)) >= defaults.shutdown_timeout_s + defaults.SHUTDOWN_DELAY_S + 5


def test_service_reads_the_checkpoint_the_trainer_writes() -> None:
    compose = _compose()["services"]
    checkpoint = compose["service"]["environment"]["CARVAE_CHECKPOINT"]
    default_out = re.search(r"CARVAE_TRAIN_OUT:-([^}]+)}", ENTRYPOINT.read_text())
    assert default_out is not None
    assert checkpoint == f"{default_out.group(1)}/model.safetensors"
    assert f"CARVAE_CHECKPOINT={checkpoint}" in (ROOT / "Dockerfile").read_text()
    assert "models:/models" in compose["trainer"]["volumes"]
    assert "models:/models:ro" in compose["service"]["volumes"]


def test_service_restarts_when_the_trainer_is_recreated() -> None:
    """A changed CARVAE_TRAIN_* setting recreates the trainer, which retrains; the service must then load
    the new model instead of serving the one it had loaded (.ci/docker-test.sh checks it on the stack)."""
    trainer = _compose()["services"]["service"]["depends_on"]["trainer"]
    assert trainer == {"condition": "service_completed_successfully", "restart": True}


def test_git_ignores_the_compose_env_file(tmp_path: Path) -> None:
    """The README keeps the stack's settings in .env next to docker-compose.yml, CARVAE_API_KEY and
    GRAFANA_ADMIN_PASSWORD among them: a `git add -A` must not commit it."""
    git = shutil.which("git")
    if git is None:
        pytest.skip("needs git")
    subprocess.run([git, "init", "-q", str(tmp_path)], check=True)
    shutil.copy(ROOT / ".gitignore", tmp_path / ".gitignore")
    (tmp_path / ".env").write_text("CARVAE_API_KEY=secret\n")
    ignored = subprocess.run([git, "-C", str(tmp_path), "check-ignore", "-q", ".env"], check=False)
    assert ignored.returncode == 0, ".env is not ignored by .gitignore"


def test_docker_ci_does_not_read_the_developers_env_file() -> None:
    """.ci/docker-test.sh checks the stack on 127.0.0.1:8000 without an API key: a .env with
    CARVAE_PUBLISH_PORT or CARVAE_API_KEY (as README "Docker" suggests keeping settings) made `make test`
    fail with "Failed to connect to localhost port 8000". Every compose call goes through one array."""
    script = (ROOT / ".ci" / "docker-test.sh").read_text()
    arrays = re.findall(r"^compose=\((.*)\)$", script, re.MULTILINE)
    assert len(arrays) == 1, "the compose command is defined once"
    words = shlex.split(arrays[0])
    assert words[words.index("--env-file") + 1] == "/dev/null"
    assert words.index("--env-file") < words.index("-f")


def test_dockerignore_lets_in_everything_the_dockerfile_copies() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    allowed = [
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    ]
    sources = [
        src.rstrip("/")
        for line in dockerfile.splitlines()
        if line.startswith("COPY ") and "--from=" not in line
        for src in line.split()[1:-1]
    ]
    assert sources
    for src in sources:
        assert any(src == a or src.startswith(a + "/") for a in allowed), (
            f"{src} is excluded by .dockerignore"
        )
        assert (ROOT / src).exists(), f"the Dockerfile copies {src}, which is not in the repository"


def test_files_copied_into_the_runtime_images_are_made_readable() -> None:
    """COPY keeps the build context's modes: from a checkout made under umask 077 the code was root-only
    (0600) and the service died on `PermissionError: /app/service/__init__.py`. Each COPY into a runtime
    stage (everything after `deps`, whose files only root uses at build time) is followed by a chmod."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    stage, copied, runs = "", [], []
    for line in text.splitlines():
        words = line.split()
        if not words:
            continue
        if words[0] == "FROM":
            stage = words[-1]
        elif words[0] == "COPY" and stage != "deps" and not any(w.startswith("--from") for w in words):
            copied.append(words[-1].rstrip("/"))
        elif words[0] == "RUN" and stage != "deps":
            runs.append(" ".join(words))
    assert set(copied) >= {"/app/carvae", "/app/trainer", "/app/service", "/usr/local/bin/carvae-trainer"}
    for dest in copied:
        pattern = rf"chmod (-R a\+rX,go-w|0755) {re.escape(dest)}( |$)"
        assert any(re.search(pattern, run) for run in runs), f"{dest} is copied but never made readable"


def test_both_containers_run_locked_down() -> None:
    """The trainer opens users' photos and the service strangers' uploads: neither may write its own
    image, hold capabilities or gain privileges (.ci/docker-test.sh checks the running containers)."""
    services = _compose()["services"]
    for name in ("trainer", "service"):
        spec = services[name]
        assert spec.get("read_only") is True, name
        assert spec.get("cap_drop") == ["ALL"], name
        assert "no-new-privileges:true" in spec.get("security_opt", []), name
        assert "/tmp" in spec.get("tmpfs", []), name


def test_constraints_pin_every_dependency_within_its_range() -> None:
    """constraints.txt (what `make install`, the images and the wheelhouse install) must satisfy
    pyproject.toml: a range changed without `make lock` would otherwise make pip fail, or install an
    untested version for users without the lock."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins: dict[str, str] = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"not an exact pin: {line!r}"
            pins[canonicalize_name(name)] = version
    project = _pyproject()["project"]
    wanted = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        wanted += extra
    for spec in map(Requirement, wanted):
        name = canonicalize_name(spec.name)
        if name == "torch":  # pinned on its own: the CPU or a CUDA build (TORCH_VERSION)
            assert name not in pins
            continue
        assert name in pins, f"{name} is not in constraints.txt (run make lock)"
        assert spec.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt has {name}=={pins[name]}, outside pyproject's {spec.specifier} (run make lock)"
        )


def test_entrypoint_looks_for_the_extensions_the_trainer_reads() -> None:
    """`auto` trains on ./data when it holds a photo: the entrypoint's list must be the trainer's, or a
    folder of .jfif photos would be passed over for the synthetic cars."""
    from trainer.data import IMAGE_EXTENSIONS

    looked_for = set(re.findall(r"-iname '\*(\.[a-z]+)'", ENTRYPOINT.read_text()))
    assert looked_for == set(IMAGE_EXTENSIONS)


# -- the service image leaves out what only the trainer imports ---------------------------------------
SPLIT = ROOT / "deploy" / "split-requirements.py"


def _trainer_only() -> set[str]:
    return set(_pyproject()["tool"]["carvae"]["trainer-only"])


def test_requirements_split_into_shared_and_trainer_only(tmp_path: Path) -> None:
    shared, trainer = tmp_path / "shared.txt", tmp_path / "trainer.txt"
    subprocess.run([sys.executable, SPLIT, ROOT / "pyproject.toml", shared, trainer], check=True)
    dependencies = _pyproject()["project"]["dependencies"]
    got_shared, got_trainer = shared.read_text().splitlines(), trainer.read_text().splitlines()
    assert sorted(got_shared + got_trainer) == sorted(dependencies)
    assert {re.split(r"[<>=!~\[; ]", d)[0] for d in got_trainer} == _trainer_only() == {"matplotlib", "tqdm"}
    assert any(d.startswith("torch") for d in got_shared)


def test_a_trainer_only_name_that_is_no_dependency_stops_the_build(tmp_path: Path) -> None:
    """A typo would otherwise leave the package out of both images."""
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(
        '[project]\ndependencies = ["torch>=2", "Matplotlib>=3"]\n'
        '[tool.carvae]\ntrainer-only = ["matplotlb"]\n'
    )
    out = subprocess.run(
        [sys.executable, SPLIT, pyproject, tmp_path / "a", tmp_path / "b"], capture_output=True, text=True
    )
    assert out.returncode != 0 and "matplotlb" in out.stderr
    # Names match as PEP 503 has it: "matplotlib" is "Matplotlib".
    pyproject.write_text(pyproject.read_text().replace("matplotlb", "matplotlib"))
    subprocess.run([sys.executable, SPLIT, pyproject, tmp_path / "a", tmp_path / "b"], check=True)
    assert (tmp_path / "b").read_text() == "Matplotlib>=3\n"


def test_the_service_imports_no_trainer_only_package() -> None:
    """The service image has carvae/ and service/ but not the trainer-only packages: an import of one
    there would fail only in Docker (.ci/docker-test.sh checks the built images)."""
    import ast
    from importlib.metadata import packages_distributions

    trainer_only = {d.lower() for d in _trainer_only()}
    forbidden = {m for m, ds in packages_distributions().items() if {d.lower() for d in ds} & trainer_only}
    assert {"matplotlib", "tqdm"} <= forbidden
    for path in [*(ROOT / "carvae").rglob("*.py"), *(ROOT / "service").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for n in names:
                assert n.split(".")[0] not in forbidden, f"{path.relative_to(ROOT)} imports {n}"
