"""Bad checkpoints stop the service before it serves, with one line naming the file and the problem; and
loading never unpickles anything.

tests/test_service_server.py already runs `python -m service` on a missing, garbage, truncated and
bit-flipped file; here are the other ways a checkpoint goes wrong (wrong architecture or format version,
a foreign or pickled file, tampered metadata, weights that do not fit their config, a folder), checked
through `service.__main__.main` in-process, plus two of them end to end."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors import safe_open
from safetensors.torch import save as st_save
from service_fixtures import ROOT, make_settings, run_service, service_env

from carvae.checkpoint import content_hash, load_checkpoint
from service.__main__ import main
from service.main import create_app
from service.server import DrainingServer

pytest_plugins = ["service_fixtures"]


def _rewrite(
    good: Path, out: Path, edit: Callable[[dict[str, torch.Tensor], dict[str, str]], object]
) -> None:
    with safe_open(str(good), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        meta = dict(f.metadata() or {})
    edit(tensors, meta)
    out.write_bytes(st_save(tensors, metadata=meta))


def _config_edit(**changes: Any) -> Callable[[dict[str, torch.Tensor], dict[str, str]], None]:
    def edit(_: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
        meta["model_config"] = json.dumps({**json.loads(meta["model_config"]), **changes})

    return edit


def _preprocess_edit(**changes: Any) -> Callable[[dict[str, torch.Tensor], dict[str, str]], None]:
    def edit(_: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
        meta["preprocess"] = json.dumps({**json.loads(meta["preprocess"]), **changes})

    return edit


def _replace_first_tensor(rehash: bool) -> Callable[[dict[str, torch.Tensor], dict[str, str]], None]:
    def edit(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
        tensors[sorted(tensors)[0]] = torch.zeros(2, 2)
        if rehash:  # as a tool that re-signs whatever it is given would
            meta["content_hash"] = content_hash(tensors)

    return edit


def _edit_tensors(
    change: Callable[[dict[str, torch.Tensor]], object],
) -> Callable[[dict[str, torch.Tensor], dict[str, str]], None]:
    def edit(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
        change(tensors)
        meta["content_hash"] = content_hash(tensors)

    return edit


class _Payload:
    """Unpickling this creates a file: proof that something unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


# (case, how to make the file, words the one line must contain)
CASES: dict[str, tuple[Callable[[Path, Path], object], str]] = {
    "wrong-architecture": (
        lambda g, p: _rewrite(g, p, lambda t, m: m.update(architecture="carvae-transformer-v9")),
        "is for architecture 'carvae-transformer-v9'",
    ),
    "wrong-format-version": (
        lambda g, p: _rewrite(g, p, lambda t, m: m.update(format_version="2")),
        "has format version '2'; this carvae reads version 1",
    ),
    "foreign-safetensors": (
        lambda g, p: p.write_bytes(st_save({"weight": torch.zeros(3)}, metadata={"framework": "other"})),
        "is not a carvae checkpoint",
    ),
    "torch-pickle-named-safetensors": (
        lambda g, p: torch.save(_Payload(p.with_name("unpickled.marker")), p),
        "is not a readable safetensors file",
    ),
    "plain-pickle": (
        lambda g, p: p.write_bytes(pickle.dumps(_Payload(p.with_name("unpickled.marker")))),
        "is not a readable safetensors file",
    ),
    "tampered-hash": (
        lambda g, p: _rewrite(g, p, lambda t, m: m.update(content_hash="0" * 64)),
        "failed its integrity check",
    ),
    "weights-replaced": (
        lambda g, p: _rewrite(g, p, _replace_first_tensor(rehash=False)),
        "failed its integrity check",
    ),
    "weights-of-another-shape-rehashed": (
        lambda g, p: _rewrite(g, p, _replace_first_tensor(rehash=True)),
        "does not match its model config (1 of another shape, e.g. ",
    ),
    "a-tensor-missing-rehashed": (
        lambda g, p: _rewrite(g, p, _edit_tensors(lambda t: t.pop("decoder.fc.weight"))),
        "does not match its model config (1 tensor(s) missing: decoder.fc.weight)",
    ),
    "an-extra-tensor-rehashed": (
        lambda g, p: _rewrite(g, p, _edit_tensors(lambda t: t.update({"extra.weight": torch.ones(1)}))),
        "does not match its model config (1 unexpected: extra.weight)",
    ),
    "config-does-not-fit-weights": (
        lambda g, p: _rewrite(g, p, _config_edit(latent_dim=64)),
        "does not match its model config (",
    ),
    # The hash covers the weights, not the metadata: a config a million times the weights' size is refused
    # by shape, before a model of that size is allocated (it was: "can't allocate 4096000000000 bytes").
    "config-far-larger-than-weights": (
        lambda g, p: _rewrite(g, p, _config_edit(latent_dim=1_000_000_000)),
        "does not match its model config (",
    ),
    # 136 channels pass "multiples of 8" but not GroupNorm's 32 groups: was a ValueError traceback
    "channels-groupnorm-cannot-split": (
        lambda g, p: _rewrite(g, p, _config_edit(channels=[32, 64, 136, 256])),
        "has invalid metadata (channels must be multiples of 8 (of 32 from 128 up)",
    ),
    # Each of these loaded before, and then every /reconstruct was a 500 (another input size than the
    # model's), or the start-up a traceback (a float where an int belongs, a list for the training record),
    # or the service would have composited transparent photos on a colour no training photo had.
    "preprocess-size-differs-from-the-model": (
        lambda g, p: _rewrite(g, p, _preprocess_edit(image_size=4096)),
        "has invalid metadata (preprocess image_size 4096 != model_config image_size ",
    ),
    "preprocess-version-unknown": (
        lambda g, p: _rewrite(g, p, _preprocess_edit(version=2)),
        "has invalid metadata (preprocessing version 2 is not the one this carvae implements (1))",
    ),
    "preprocess-background-out-of-range": (
        lambda g, p: _rewrite(g, p, _preprocess_edit(background=[300, -1, 5])),
        "has invalid metadata (background must be three integers from 0 to 255, got [300, -1, 5])",
    ),
    "config-a-float-for-an-int": (
        lambda g, p: _rewrite(g, p, _config_edit(latent_dim=4.0)),
        "has invalid metadata (latent_dim must be an integer, got 4.0)",
    ),
    "training-record-not-an-object": (
        lambda g, p: _rewrite(g, p, lambda t, m: m.update(training="[]")),
        "has invalid metadata (training must be a JSON object, got list)",
    ),
    "metadata-not-json": (
        lambda g, p: _rewrite(g, p, lambda t, m: m.update(model_config="{not json")),
        "has invalid metadata",
    ),
    "metadata-missing": (
        lambda g, p: _rewrite(g, p, lambda t, m: m.pop("preprocess")),
        "has invalid metadata",
    ),
    "empty-file": (lambda g, p: p.write_bytes(b""), "is not a readable safetensors file"),
    "a-folder": (lambda g, p: p.mkdir(), "is a directory, not a model.safetensors file"),
}


def _make(case: str, good: Path, tmp_path: Path) -> Path:
    path = tmp_path / "model.safetensors"
    CASES[case][0](good, path)
    return path


def _one_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == 1, text
    assert lines[0].startswith("carvae: error: ") and "Traceback" not in text
    return lines[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_checkpoint_is_one_line_and_exit_2(
    case: str,
    service_checkpoint: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = _make(case, service_checkpoint, tmp_path)
    for name, value in {"CHECKPOINT": path, "DEVICE": "cpu", "API_KEY": "", "LOG_LEVEL": "warning"}.items():
        monkeypatch.setenv(f"CARVAE_{name}", str(value))
    # main() installs the service's SIGTERM/SIGINT handlers: not in pytest's own process.
    monkeypatch.setattr(signal, "signal", lambda *args: None)

    # A checkpoint that slips through would start a server in pytest's own process and block forever:
    # fail at once instead.
    def served(*_: Any) -> None:
        raise AssertionError(f"{case}: the bad checkpoint was loaded and the server started")

    monkeypatch.setattr(DrainingServer, "run", served)
    with pytest.raises(SystemExit) as stopped:
        main([])
    assert stopped.value.code == 2
    line = _one_line(capsys.readouterr().err)
    assert str(path) in line and CASES[case][1] in line, line
    assert not (tmp_path / "unpickled.marker").exists(), "the checkpoint was unpickled"


@pytest.mark.slow
@pytest.mark.parametrize("case", ["torch-pickle-named-safetensors", "wrong-architecture"])
def test_bad_checkpoint_end_to_end(case: str, service_checkpoint: Path, tmp_path: Path) -> None:
    path = _make(case, service_checkpoint, tmp_path)
    proc = run_service(CHECKPOINT=path, DEVICE="cpu")
    assert proc.returncode == 2, proc.stderr
    assert CASES[case][1] in _one_line(proc.stderr)
    assert not (tmp_path / "unpickled.marker").exists(), "the checkpoint was unpickled"


def test_the_pickle_payload_would_run_if_anyone_unpickled_it(tmp_path: Path) -> None:
    """The control for the tests above: the payload file really executes code when unpickled."""
    path = _make("torch-pickle-named-safetensors", Path(), tmp_path)
    with path.open("rb") as f:  # (a path ending in .safetensors would make torch.load use safetensors)
        torch.load(f, weights_only=False)  # what a careless loader would do
    assert (tmp_path / "unpickled.marker").exists()


def test_loading_and_serving_never_unpickle(
    service_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def forbidden(*_: Any, **__: Any) -> Any:
        raise AssertionError("something unpickled during load or serving")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    load_checkpoint(service_checkpoint)
    with TestClient(create_app(make_settings(service_checkpoint))) as client:
        assert client.get("/v1/model").status_code == 200
        assert client.post("/sample", json={"n": 2, "seed": 1}).status_code == 200


@pytest.fixture
def as_another_user() -> Iterator[tuple[Path, list[str]]]:
    """A folder anyone may enter, and the command prefix that runs as a user who does not own it (the
    container's uid 10001 reading a checkpoint another uid wrote); chmod then locks that user out."""
    drop: list[str] = []
    if os.geteuid() == 0:  # root reads anything: become someone else
        if shutil.which("setpriv") is None:
            pytest.skip("as root, needs setpriv to run as another user")
        drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]
    base = Path(tempfile.mkdtemp(prefix="carvae-unreadable-"))
    base.chmod(0o755)
    yield base, drop
    for path in (base, *base.rglob("*")):
        path.chmod(0o755)
    shutil.rmtree(base)


@pytest.mark.parametrize("locked", ["file", "folder"])
def test_an_unreadable_checkpoint_says_permission_denied(
    locked: str, service_checkpoint: Path, as_another_user: tuple[Path, list[str]]
) -> None:
    """safetensors reports a file it may not open as 'No such file or directory', and a folder that may
    not be searched ended in a PermissionError's repr: neither told the user what to fix."""
    base, drop = as_another_user
    folder = base / "current"
    folder.mkdir(mode=0o755)
    path = folder / "model.safetensors"
    shutil.copyfile(service_checkpoint, path)
    (path if locked == "file" else folder).chmod(0o600 if locked == "file" else 0o700)
    if not drop:  # not root: the owner itself is locked out
        (path if locked == "file" else folder).chmod(0)
    proc = subprocess.run(
        [*drop, sys.executable, "-m", "service"],
        cwd=ROOT,
        env=service_env(CHECKPOINT=path, DEVICE="cpu"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    line = _one_line(proc.stderr)
    assert f"checkpoint {path} is not readable" in line and "permission denied" in line, line
    assert "No such file" not in line and "PermissionError" not in line and "train one" not in line, line
