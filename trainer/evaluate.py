"""`python -m trainer.evaluate --checkpoint F --data DIR|synthetic`: print a checkpoint's scores as JSON.

VAE: PSNR and SSIM of the deterministic reconstruction (through μ, as served), and the ELBO in nats per
image under the checkpoint's calibrated decoder σ. Baseline: PCA with k = latent size, i.e. the best
linear autoencoder with the same code size, fitted on the checkpoint's own training split when the given
data is the training data (same fingerprint, same seeded split) — so the VAE is compared with what a
linear model learns from the same images, on the same held-out images.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from carvae.checkpoint import CheckpointError, load_checkpoint
from carvae.device import DeviceError, pick_device
from carvae.losses import psnr, ssim
from trainer.cli import HelpFormatter, setup_logging
from trainer.data import DataError, Dataset, load_data, make_split
from trainer.metrics import score_images
from trainer.train import default_workers

log = logging.getLogger("trainer")
PCA_NITER = 6  # power iterations of the randomized SVD: the top-k subspace is then exact to ~1e-4 dB PSNR


def _stats(values: torch.Tensor) -> dict[str, float]:
    return {"mean": float(values.mean()), "median": float(values.median())} if len(values) else {}


def pca_reconstruct(fit: torch.Tensor, target: torch.Tensor, k: int, batch: int = 512) -> torch.Tensor:
    """Fit PCA (k components, centred) on `fit` (N, D) and reconstruct `target` (M, D) through it,
    clamped to the data range. Randomized SVD (torch.pca_lowrank) keeps the fit to seconds on a CPU."""
    mean = fit.mean(0, keepdim=True)
    q = min(k + 10, *fit.shape)
    _, _, v = torch.pca_lowrank(fit - mean, q=q, center=False, niter=PCA_NITER)
    basis = v[:, :k]  # (D, k), orthonormal columns
    out = torch.empty_like(target)
    for s in range(0, len(target), batch):
        centred = target[s : s + batch] - mean
        out[s : s + batch] = (centred @ basis @ basis.T + mean).clamp(0, 1)
    return out


def _flat(images: torch.Tensor, idx: np.ndarray) -> torch.Tensor:
    """uint8 (N, S, S, 3) rows -> float (n, 3·S·S) in [0, 1], NCHW order like the model's input."""
    return images[torch.as_tensor(idx)].permute(0, 3, 1, 2).reshape(len(idx), -1).float().div_(255.0)


def _pca_scores(fit_x: torch.Tensor, eval_x: torch.Tensor, k: int, size: int) -> dict[str, Any]:
    recon = pca_reconstruct(fit_x, eval_x, k)
    shape = (-1, 3, size, size)
    ps = torch.cat([psnr(recon[s : s + 256], eval_x[s : s + 256]) for s in range(0, len(eval_x), 256)])
    ss = torch.cat(
        [
            ssim(recon[s : s + 256].view(shape), eval_x[s : s + 256].view(shape))
            for s in range(0, len(eval_x), 256)
        ]
    )
    return {"k": k, "psnr": _stats(ps), "ssim": _stats(ss)}


def evaluate(
    checkpoint: Path,
    data: str,
    split: str = "val",
    limit: int | None = None,
    device: str = "auto",
    batch_size: int = 128,
    workers: int = 1,
    cache_dir: Path | None = None,
    pca: bool = True,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    dev = pick_device(device)
    ck = load_checkpoint(checkpoint, dev)
    training = ck.training
    recorded = training.get("data") or {}
    count = int(recorded.get("count", 4000)) if recorded.get("source") == "synthetic" else 4000
    cache = cache_dir if cache_dir is not None else checkpoint.resolve().parent.parent / ".cache"
    ds: Dataset = load_data(data, ck.policy, synthetic_count=count, workers=workers, cache_dir=cache)

    # The recorded split is only meaningful for the very data it was drawn from.
    rec_split = training.get("split") or {}
    matches = ds.fingerprint == recorded.get("fingerprint") and "seed" in rec_split
    everything = np.arange(len(ds))
    if matches:
        sp = make_split(len(ds), float(rec_split["val_fraction"]), int(rec_split["seed"]))
        matches = sp.val_hash == rec_split.get("val_hash")
    if matches:
        eval_idx, fit_idx, fit_on = (sp.val if split == "val" else everything), sp.train, "training split"
    else:
        if split == "val":
            log.warning("the data is not this checkpoint's training data: evaluating all %d images", len(ds))
        eval_idx, fit_idx, fit_on = everything, everything, "evaluated images (training data not given)"
        split = "all"
    if limit is not None:
        eval_idx = eval_idx[:limit]

    model = ck.model
    channels_last = dev.type in ("cpu", "cuda")  # 2× faster convolutions on this kind of CPU
    if channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    scores = score_images(model, ds.images, eval_idx, dev, batch_size=batch_size, channels_last=channels_last)
    log_sigma = float(model.get_buffer("log_sigma"))
    elbo = scores.elbo(log_sigma)
    result: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "model_id": ck.model_id,
        "image_size": ck.config.image_size,
        "latent_dim": ck.config.latent_dim,
        "data": {
            **{k: ds.source.get(k) for k in ("source", "count", "skipped")},
            "fingerprint": ds.fingerprint,
            "matches_training": bool(matches),
        },
        "split": split,
        "images": len(eval_idx),
        "psnr": _stats(scores.psnr),
        "ssim": _stats(scores.ssim),
        "elbo_nats_per_image": _stats(elbo),
        "bits_per_dim": float(-elbo.mean() / (scores.dims * math.log(2))) if len(elbo) else None,
        "log_sigma": log_sigma,
        "kl_nats_per_image": float(scores.kl.mean()) if len(elbo) else None,
    }
    if pca and len(eval_idx):
        k = min(ck.config.latent_dim, len(fit_idx) - 1, scores.dims)
        fit_x, eval_x = _flat(ds.images, fit_idx), _flat(ds.images, eval_idx)
        result["pca"] = {
            **_pca_scores(fit_x, eval_x, k, ck.config.image_size),
            "fit_on": fit_on,
            "fit_images": len(fit_idx),
        }
        result["vae_minus_pca_psnr_db"] = result["psnr"]["mean"] - result["pca"]["psnr"]["mean"]
    result["seconds"] = round(time.perf_counter() - t0, 2)
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m trainer.evaluate",
        description="Score a checkpoint on a folder of images (or the synthetic cars) and print JSON: PSNR "
        "and SSIM (mean, median), ELBO in nats per image, and a PCA baseline with k = latent size.",
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--checkpoint", type=Path, required=True, help="a model.safetensors written by the trainer"
    )
    p.add_argument("--data", required=True, metavar="DIR|synthetic", help="images to score")
    p.add_argument(
        "--split",
        choices=("val", "all"),
        default="val",
        help="val = the checkpoint's recorded validation split (when --data is its training data)",
    )
    p.add_argument("--limit", type=int, default=None, help="score at most this many images (default: all)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--batch-size", type=int, default=128, help="images per forward pass")
    p.add_argument(
        "--workers",
        type=int,
        default=default_workers(),
        help="processes decoding images (default: the CPU count, at most 8)",
    )
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="decoded-image cache (default: the checkpoint's folder/../.cache, where the trainer puts it)",
    )
    p.add_argument("--no-pca", action="store_true", help="skip the PCA baseline")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.limit is not None and args.limit < 1:
        print("error: --limit must be >= 1", file=sys.stderr)
        return 2
    setup_logging("stderr")  # stdout carries only the JSON
    try:
        result = evaluate(
            args.checkpoint,
            args.data,
            args.split,
            args.limit,
            args.device,
            args.batch_size,
            args.workers,
            args.cache_dir,
            pca=not args.no_pca,
        )
    except (CheckpointError, DataError, DeviceError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
