"""Two CPU processes under torchrun (DistributedDataParallel over gloo) for one short epoch."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from carvae.checkpoint import load_checkpoint
from trainer.evaluate import evaluate
from trainer.state import read_metrics


@pytest.mark.slow
def test_torchrun_two_processes_one_epoch(tmp_path: Path, cli_env: dict[str, str]) -> None:
    out = tmp_path / "run"
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not installed next to this Python")
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", "-m", "trainer", "--smoke", "--image-size", "32"]
    cmd += ["--synthetic-count", "64", "--out", str(out), "--no-progress", "--threads", "1", "--workers", "1"]
    proc = subprocess.run(cmd, env=cli_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    # only rank 0 narrates and writes
    assert proc.stdout.count("epoch 1/1") == 1 and "2 process(es)" in proc.stdout
    rows = read_metrics(out)
    assert len(rows) == 1
    t = load_checkpoint(out / "model.safetensors").training
    assert t["world_size"] == 2 and t["complete"]
    # the metrics are all-reduced: the validation set is scored whole (both shards), once
    assert t["split"]["val"] == 6 and t["best_val"]["psnr"] == pytest.approx(rows[0]["val_psnr"])
    single = evaluate(out / "model.safetensors", "synthetic", device="cpu", pca=False)
    assert single["images"] == 6 and single["psnr"]["mean"] == pytest.approx(rows[0]["val_psnr"], abs=1e-4)
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
