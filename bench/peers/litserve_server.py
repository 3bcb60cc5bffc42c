"""Peer: the same model and the same pre/post-processing served by LitServe with its dynamic batching.

LitServe runs an HTTP server process and an inference worker process joined by a queue; the worker takes
up to `max_batch_size` requests within `batch_timeout`, runs decode_request on each, one `predict` for the
batch, then encode_response on each. Its best settings on a 2-core CPU (bench/README.md): max batch 32,
a few ms window, one torch thread, one worker, the ZeroMQ queue.

    python -m bench.peers.litserve_server --checkpoint PATH --port 8102
"""

# No `from __future__ import annotations` here: LitServe reads decode_request's and encode_response's
# annotations at run time to build its endpoint, and needs real classes, not strings.
import argparse
import sys
from pathlib import Path
from typing import Any

import litserve as ls
import numpy as np
import torch
from fastapi import Request
from fastapi.responses import Response

from bench.stages import Stages


class ReconstructAPI(ls.LitAPI):
    def __init__(self, checkpoint: Path, threads: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.checkpoint = checkpoint
        self.threads = threads

    def setup(self, device: str) -> None:
        torch.set_num_threads(self.threads)
        self.stages = Stages(self.checkpoint)
        s = self.stages.image_size
        self.stages.forward([np.full((s, s, 3), 127, dtype=np.uint8)] * 2)

    def decode_request(self, request: Request) -> np.ndarray:
        return self.stages.decode(request["file"].file.read())

    def batch(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        return inputs

    def predict(self, x: list[np.ndarray]) -> np.ndarray:
        return self.stages.forward(x)

    def unbatch(self, output: np.ndarray) -> list[np.ndarray]:
        return list(output)

    def encode_response(self, output: np.ndarray) -> Response:
        return Response(self.stages.encode(output), media_type="image/png")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.peers.litserve_server")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8102)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads in the worker")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--batch-timeout-ms", type=float, default=5.0)
    p.add_argument("--api-servers", type=int, default=1, help="HTTP server processes")
    p.add_argument("--slow-queue", action="store_true", help="multiprocessing queue instead of ZeroMQ")
    args = p.parse_args(argv)
    api = ReconstructAPI(
        args.checkpoint,
        args.threads,
        max_batch_size=args.max_batch_size,
        batch_timeout=args.batch_timeout_ms / 1000,
        api_path="/reconstruct",
    )
    server = ls.LitServer(
        api, accelerator="cpu", devices=1, workers_per_device=1, timeout=30, fast_queue=not args.slow_queue
    )
    server.run(
        host=args.host,
        port=args.port,
        num_api_servers=args.api_servers,
        log_level="warning",
        generate_client_file=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
