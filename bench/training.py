"""Training speed of the default recipe: one epoch of `python -m trainer` with every default, on the real
development photos from `../shared/` when present (else the synthetic cars), figures read back from the
run's metrics.jsonl and run.json.

The decoded-image cache lives in bench/.cache/train-cache, so the first `make bench` pays the decode
(reported as data_seconds) and later ones measure only training.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.assets import PHOTOS, ROOT


def measure(cache: Path, timeout_s: float = 1800) -> dict[str, Any]:
    run_dir = cache / "train-run"
    shutil.rmtree(run_dir, ignore_errors=True)
    data = str(PHOTOS) if PHOTOS.is_dir() else "synthetic"
    argv = [
        sys.executable,
        "-m",
        "trainer",
        "--data",
        data,
        "--out",
        str(run_dir),
        "--epochs",
        "1",
        "--cache-dir",
        str(cache / "train-cache"),
        "--no-progress",
    ]
    print("training: one epoch of the default recipe ...", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(
        argv,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    wall = time.perf_counter() - t0
    if proc.returncode:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"trainer exited with {proc.returncode}: {tail[0]}"}
    row = json.loads((run_dir / "metrics.jsonl").read_text().strip().splitlines()[-1])
    run = json.loads((run_dir / "run.json").read_text())
    config = run.get("config", {})
    return {
        "data": "stanford-cars-dev (../shared)" if data != "synthetic" else "synthetic",
        "images": run.get("split", {}).get("train"),
        "batch_size": config.get("batch_size"),
        "threads": config.get("threads"),
        "device": run.get("device"),
        "images_per_s": row.get("images_per_s"),
        "epoch_seconds": row.get("seconds"),
        "train_seconds": row.get("train_seconds"),
        # start-up, data loading (decoded-image cache: built on the first run only), plots and saving
        "outside_epoch_seconds": round(wall - (row.get("seconds") or 0.0), 1),
        "wall_seconds": round(wall, 1),
    }
