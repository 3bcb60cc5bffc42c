"""Peer: the plain FastAPI handler a user would write first — no batching, no queue, no pools of our own.

A sync `def` endpoint, so FastAPI runs each request in its thread pool: decode, a forward pass of one
image and the PNG encode, through the same `bench.stages` code as everything else in the benchmark.

    python -m bench.peers.plain_fastapi --checkpoint PATH --port 8101 [--threads N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Annotated

import torch
import uvicorn
from fastapi import FastAPI, File, UploadFile
from fastapi.responses import Response

from bench.stages import Stages


def create_app(checkpoint: Path) -> FastAPI:
    stages = Stages(checkpoint)
    stages.forward([stages.decode(_warm_up_image(stages.image_size))])
    app = FastAPI()

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/reconstruct")
    def reconstruct(file: Annotated[UploadFile, File()]) -> Response:
        view = stages.decode(file.file.read())
        return Response(stages.encode(stages.forward([view])[0]), media_type="image/png")

    return app


def _warm_up_image(size: int) -> bytes:
    import numpy as np

    from carvae.preprocess import encode_image

    return encode_image(np.full((size, size, 3), 127, dtype=np.uint8))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.peers.plain_fastapi")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8101)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    uvicorn.run(
        create_app(args.checkpoint), host=args.host, port=args.port, log_level="warning", access_log=False
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
