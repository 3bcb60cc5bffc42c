"""The ceiling: how many images/s this machine can push through the model, and through the whole
/reconstruct pipeline, with no HTTP at all.

- model: forward passes only (views already decoded), at batch 1 and at the max batch size;
- pipeline: per image decode JPEG → preprocess → (one forward per max batch) → PNG encode, in one
  process at a given torch thread count; and `cores` such processes with one thread each side by side
  (started at the same instant), which is how a server that overlaps decode/encode with the model on
  every core would best use the machine.

Run as a worker by bench.run (`python -m bench.limit ...`, one JSON object on stdout) so that torch's
thread pools live in their own process, never in the load generator's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.stages import Stages


def _rate(step: Callable[[], int], seconds: float) -> float:
    """Images/s of `step` (returns images done) run repeatedly for `seconds` after one warm-up call."""
    step()
    done, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds or done == 0:
        done += step()
    return done / elapsed


def model_rate(stages: Stages, data: bytes, batch: int, seconds: float) -> float:
    views = [stages.decode(data)] * batch
    return _rate(lambda: len(stages.forward(views)), seconds)


def pipeline_rate(stages: Stages, data: bytes, batch: int, seconds: float) -> float:
    def step() -> int:
        out = stages.forward([stages.decode(data) for _ in range(batch)])
        for image in out:
            stages.encode(image)
        return batch

    return _rate(step, seconds)


def stage_ms(stages: Stages, data: bytes, batch: int, repeats: int = 30) -> dict[str, float]:
    """Median milliseconds per image of each stage (forward amortised over a max batch)."""
    view = stages.decode(data)
    out = stages.forward([view] * batch)
    timings: dict[str, list[float]] = {"decode": [], "forward": [], "encode": []}
    for _ in range(repeats):
        t0 = time.perf_counter()
        stages.decode(data)
        t1 = time.perf_counter()
        stages.forward([view] * batch)
        t2 = time.perf_counter()
        stages.encode(out[0])
        t3 = time.perf_counter()
        timings["decode"].append(t1 - t0)
        timings["forward"].append((t2 - t1) / batch)
        timings["encode"].append(t3 - t2)
    return {k: round(statistics.median(v) * 1000, 3) for k, v in timings.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.limit", description=__doc__)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--image", type=Path, required=True, help="the JPEG the service benchmark uploads")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--batch", type=int, default=32, help="max batch size")
    p.add_argument("--seconds", type=float, default=3.0, help="measuring time per figure")
    p.add_argument("--only-pipeline", action="store_true", help="just the pipeline figure")
    p.add_argument("--start-at", type=float, default=0.0, help="time.time() to start measuring at")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    stages = Stages(args.checkpoint)
    data = args.image.read_bytes()
    stages.forward([stages.decode(data)] * args.batch)  # first call allocates and picks kernels
    if args.start_at:
        time.sleep(max(0.0, args.start_at - time.time()))
    result: dict[str, object] = {"threads": args.threads, "batch": args.batch}
    result["pipeline_images_per_s"] = pipeline_rate(stages, data, args.batch, args.seconds)
    if not args.only_pipeline:
        result["model_b1_images_per_s"] = model_rate(stages, data, 1, args.seconds)
        result["model_bmax_images_per_s"] = model_rate(stages, data, args.batch, args.seconds)
        result["stage_ms_per_image"] = stage_ms(stages, data, args.batch)
    json.dump(result, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
