"""The levers too small for the end-to-end benchmark, measured in CPU time per request instead.

A lever worth 1 % of the server's CPU is invisible in req/s (round-to-round noise here is several per
cent), so these are timed in isolation, on one thread, alternating the variants over several rounds, and
reported against the same run's whole per-image cost (decode + forward + encode, the limit's stages):
that bounds what each could give end to end. `python -m bench.micro` prints a table and writes
`bench/results/micro.json` and `micro.md`.

- multipart: Starlette's form parser (what FastAPI runs for `UploadFile`) on the benchmark's upload,
  against the least any Python parser must do (find the boundary, split the head from the bytes);
- JSON: the `/encode` response body through `pydantic_core.to_json` (the service's), `json.dumps`, and
  orjson when it is installed;
- grad mode: the traced forward pass at the c=32 batch size under `torch.inference_mode` (the service's),
  `torch.no_grad`, and neither;
- copies: every conversion between PIL, numpy and torch on /reconstruct's path, per image.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydantic_core
import torch
from PIL import Image
from starlette.requests import Request

from bench import assets, machine
from bench.loadgen import multipart_request
from bench.stages import Stages
from carvae.preprocess import decode_image, to_tensor, to_uint8
from service.schemas import EncodeResponse

RESULTS = Path(__file__).resolve().parent / "results"
BATCH = 10  # the average batch of the service at c=32 in the full runs


# A variant: the call to time and how many images (requests) one call handles.
Variant = tuple[Callable[[], object], int]


def per_request(fn: Callable[[], object]) -> Variant:
    return fn, 1


def per_batch(fn: Callable[[], object]) -> Variant:
    return fn, BATCH


def cpu_us(variant: Variant, seconds: float) -> float:
    """Median thread CPU µs per image of a variant over 5 slices of `seconds`/5 (after a warm-up call)."""
    fn, images = variant
    fn()
    slices = []
    for _ in range(5):
        n, t0 = 0, time.thread_time()
        while (spent := time.thread_time() - t0) < seconds / 5 or n < 3:
            fn()
            n += 1
        slices.append(spent / (n * images) * 1e6)
    return statistics.median(slices)


def alternate(variants: dict[str, Variant], rounds: int, seconds: float) -> dict[str, float]:
    """Median µs per image of each variant, measured in turn for `rounds` rounds so drift hits all alike."""
    samples: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for name, variant in variants.items():
            samples[name].append(cpu_us(variant, seconds))
    return {k: round(statistics.median(v), 2) for k, v in samples.items()}


def multipart_variants(jpeg: bytes) -> dict[str, Variant]:
    raw = multipart_request("127.0.0.1", "/reconstruct", "file", "car.jpg", jpeg)
    head, body = raw.split(b"\r\n\r\n", 1)
    headers = dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:])
    headers = {k.lower(): v for k, v in headers.items()}
    scope = {"type": "http", "method": "POST", "path": "/reconstruct", "headers": list(headers.items())}
    ctype = headers[b"content-type"]
    loop = asyncio.new_event_loop()

    async def starlette_form() -> bytes:
        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        form = await Request(scope, receive).form()
        data: bytes = await form["file"].read()  # type: ignore[union-attr]
        await form.close()
        return data

    def minimal() -> bytes:
        boundary = b"--" + ctype.split(b"boundary=", 1)[1]
        part = body.split(boundary, 2)[1]
        _, content = part.split(b"\r\n\r\n", 1)
        return content[:-2]

    assert loop.run_until_complete(starlette_form()) == minimal() == jpeg
    return {
        "starlette": per_request(lambda: loop.run_until_complete(starlette_form())),
        "minimal": per_request(minimal),
    }


def json_variants(latent_dim: int) -> dict[str, Variant]:
    rng = np.random.default_rng(0)
    mu, logvar = (rng.standard_normal(latent_dim).astype(np.float32).tolist() for _ in range(2))
    response = EncodeResponse(model_id="0123456789ab", latent_dim=latent_dim, mu=mu, logvar=logvar)
    plain = response.model_dump()
    variants = {
        "pydantic_core": per_request(lambda: pydantic_core.to_json(response)),
        "json.dumps": per_request(lambda: json.dumps(response.model_dump()).encode()),
        "json.dumps (dict ready)": per_request(lambda: json.dumps(plain).encode()),
    }
    if importlib.util.find_spec("orjson"):
        import orjson

        variants["orjson (dict ready)"] = per_request(lambda: orjson.dumps(plain))
    return variants


def grad_variants(stages: Stages, jpeg: bytes) -> dict[str, Variant]:
    x = to_tensor(np.stack([stages.decode(jpeg)] * BATCH))
    model = stages.model

    def under(mode: Callable[[], contextlib.AbstractContextManager[Any]]) -> Variant:
        def run() -> object:
            with mode():
                mu, _ = model._encoder(model.images_in(x))
                return model._decoder(mu)

        return per_batch(run)

    return {
        "inference_mode": under(torch.inference_mode),
        "no_grad": under(torch.no_grad),
        "grad enabled": under(contextlib.nullcontext),
    }


def copy_steps(stages: Stages, jpeg: bytes) -> dict[str, Variant]:
    """Each conversion on the /reconstruct path alone."""
    size = stages.image_size
    small = decode_image(jpeg).resize((size, size))
    view = np.asarray(small, dtype=np.uint8).copy()
    views = [view] * BATCH
    stacked = np.stack(views)
    tensor = to_tensor(stacked)
    with torch.inference_mode():
        out, _ = stages.model.reconstruct(tensor)
    images = to_uint8(out)
    return {
        "PIL → numpy view (asarray + copy)": per_request(lambda: np.asarray(small, dtype=np.uint8).copy()),
        f"stack {BATCH} views": per_batch(lambda: np.stack(views)),
        f"uint8 → float tensor, {BATCH} rows": per_batch(lambda: to_tensor(stacked)),
        f"channels_last input, {BATCH} rows": per_batch(lambda: stages.model.images_in(tensor)),
        f"float → uint8 numpy, {BATCH} rows": per_batch(lambda: to_uint8(out)),
        "numpy → PIL for PNG (fromarray)": per_request(lambda: Image.fromarray(images[0], "RGB")),
    }


def whole_image_us(stages: Stages, jpeg: bytes, rounds: int, seconds: float) -> dict[str, float]:
    views = [stages.decode(jpeg)] * BATCH
    recon = stages.forward(views)
    per = alternate(
        {
            "decode": per_request(lambda: stages.decode(jpeg)),
            "forward": per_batch(lambda: stages.forward(views)),
            "encode": per_request(lambda: stages.encode(recon[0])),
        },
        rounds,
        seconds,
    )
    per["total"] = round(per["decode"] + per["forward"] + per["encode"], 2)
    return per


def markdown(result: dict[str, Any]) -> str:
    total = result["per_image_us"]["total"]
    lines = [
        f"Measured {result['measured_at']} on {result['machine']['cpu']}, 1 torch thread, "
        f"median of {result['rounds']} alternating rounds; batch steps per image at batch {BATCH}; "
        "1-minute load average {:.1f} before, {:.1f} after.".format(*result["load_average"]),
        "",
        f"Whole per-image cost (decode + forward + PNG, the limit's stages): **{total:.0f} µs** "
        f"(decode {result['per_image_us']['decode']:.0f}, forward {result['per_image_us']['forward']:.0f}, "
        f"encode {result['per_image_us']['encode']:.0f}).",
        "",
        "| lever | variant | µs CPU per request | share of the per-image cost |",
        "|---|---|---:|---:|",
    ]
    for lever, variants in result["levers"].items():
        for name, us in variants.items():
            lines.append(f"| {lever} | {name} | {us:.1f} | {us / total:.2%} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=1.0, help="seconds per variant per round")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument(
        "--quick", action="store_true", help="tiny model, for the smoke test; figures mean nothing"
    )
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    ck, ck_desc = assets.checkpoint(quick=args.quick)
    jpeg, jpeg_desc = assets.car_jpeg()
    stages = Stages(ck)
    r, s = args.rounds, args.seconds
    load_before = machine.load_average()
    result = {
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine.describe(),
        "checkpoint": ck_desc,
        "upload": jpeg_desc,
        "rounds": r,
        # CPU time per call barely moves with other load, but caches and SMT siblings are shared.
        "load_average": [load_before, machine.load_average()],
        "per_image_us": whole_image_us(stages, jpeg, r, s),
        "levers": {
            "multipart parse": alternate(multipart_variants(jpeg), r, s),
            "/encode JSON body": alternate(json_variants(stages.model.latent_dim), r, s),
            "grad mode (forward, per image)": alternate(grad_variants(stages, jpeg), r, s),
            "copies (per image)": alternate(copy_steps(stages, jpeg), r, s),
        },
    }
    md = markdown(result)
    print(md)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "micro.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "micro.md").write_text(md)


if __name__ == "__main__":
    main()
