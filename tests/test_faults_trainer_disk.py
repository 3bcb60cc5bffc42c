"""The trainer when the disk refuses a write for real (not a mocked writer, as in test_trainer_cli.py):
a `python -m trainer --resume` whose file-size limit (RLIMIT_FSIZE, the kernel's per-process quota) is
too small for its checkpoint state fails with one clear line, leaves no temp file and no half-written
file, keeps the previous complete checkpoint, and a later run without the limit carries on."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from carvae.checkpoint import load_checkpoint
from trainer.__main__ import main
from trainer.state import load_state, read_metrics

resource = pytest.importorskip("resource")  # POSIX only
pytestmark = pytest.mark.slow

TINY = "--data synthetic --synthetic-count 64 --image-size 16 --channels 8,16 --latent-dim 8 --batch-size 16"
TINY_ARGS = [*TINY.split(), "--warmup-steps", "2", "--no-progress", "--threads", "1", "--workers", "1"]


def test_a_write_the_disk_refuses_keeps_the_previous_complete_run(
    tmp_path: Path, cli_env: dict[str, str]
) -> None:
    out = tmp_path / "run"
    assert main([*TINY_ARGS, "--epochs", "1", "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    limit = len(before["train_state.pt"]) // 2  # any file this large can no longer be written

    def limit_file_size() -> None:  # runs in the child: CPython ignores SIGXFSZ, so write() gets EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run(
        [sys.executable, "-m", "trainer", "--resume", str(out), "--epochs", "2", "--no-progress"],
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit_file_size,  # only a setrlimit call between fork and exec
    )
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert err.startswith("error: cannot write") and "File too large" in err and "\n" not in err, err
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    # every file is whole: either untouched or, if written before the failure, the new complete version
    load_checkpoint(out / "model.safetensors")
    state = load_state(out)
    assert state["progress"]["epochs_done"] in (1, 2)
    for name in ("model.safetensors", "train_state.pt"):
        assert len((out / name).read_bytes()) <= limit or (out / name).read_bytes() == before[name]

    assert main(["--resume", str(out), "--epochs", "2", "--no-progress"]) == 0  # the disk is fine again
    assert [r["epoch"] for r in read_metrics(out)] == [1, 2]
    assert load_checkpoint(out / "model.safetensors").training["epochs_done"] == 2
