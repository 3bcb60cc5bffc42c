"""`python -m trainer.evaluate --checkpoint F --data DIR|synthetic`: print a checkpoint's scores as JSON.

VAE: PSNR and SSIM of the deterministic reconstruction (through μ, as served), and the ELBO in nats per
image under the checkpoint's calibrated decoder σ. Baseline: PCA with k = latent size, i.e. the best
linear autoencoder with the same code size, fitted on the checkpoint's own training split when the given
data is the training data (same fingerprint, same seeded split) — so the VAE is compared with what a
linear model learns from the same images, on the same held-out images. On other data it is fitted on the
scored images themselves, and left out (null, with `pca_skipped` saying why) when they are too few
(≤ k): k components reproduce k + 1 images exactly.

Two optional diagnostics say where a missed quality target is lost. `--pca-k 128,256,…` adds PCA at
larger code sizes: how many linear components the VAE's 128 numbers are worth. `--refine-steps N`
optimises each evaluated image's latent directly against the image (the decoder fixed), starting from
the encoder's μ: the gain is what a better encoder could at least win; if it is small, the shortfall is
the decoder's (a local optimum, so a lower bound on what latents alone could give).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
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
from carvae.model import VAE
from trainer.cli import WORKERS_HELP, HelpFormatter, int_at_least, refuse_empty_paths, setup_logging
from trainer.data import (
    DataError,
    Dataset,
    load_data,
    load_synthetic_rows,
    make_split,
    synthetic_fingerprint,
    to_batch,
)
from trainer.metrics import score_images
from trainer.train import default_workers

log = logging.getLogger("trainer")
PCA_NITER = 6  # power iterations of the randomized SVD: the top-k subspace is then exact to ~1e-4 dB PSNR


def _stats(values: torch.Tensor) -> dict[str, float]:
    return {"mean": float(values.mean()), "median": float(values.median())} if len(values) else {}


def pca_basis(fit: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PCA of `fit` (N, D): its mean (1, D) and the top-k components (D, k), orthonormal columns in order,
    so `basis[:, :j]` is the PCA with j < k components. Randomized SVD (torch.pca_lowrank) keeps the fit
    to seconds on a CPU."""
    mean = fit.mean(0, keepdim=True)
    q = min(k + 10, *fit.shape)
    _, _, v = torch.pca_lowrank(fit - mean, q=q, center=False, niter=PCA_NITER)
    return mean, v[:, :k]


def pca_reconstruct(
    mean: torch.Tensor, basis: torch.Tensor, target: torch.Tensor, batch: int = 512
) -> torch.Tensor:
    """`target` (M, D) through the PCA (mean, basis), clamped to the data range."""
    out = torch.empty_like(target)
    for s in range(0, len(target), batch):
        centred = target[s : s + batch] - mean
        out[s : s + batch] = (centred @ basis @ basis.T + mean).clamp(0, 1)
    return out


def refine_latents(
    model: VAE, x: torch.Tensor, steps: int, lr: float = 0.02
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reconstructions of x (N, 3, H, W) through μ and through a latent optimised for `steps` Adam steps
    on the squared error, starting from μ, with the model's weights fixed. Raw encoder coordinates."""
    params = [p.requires_grad_(False) for p in model.parameters()]
    try:
        with torch.no_grad():
            mu, _ = model.encoder(x)
            start = model.decoder(mu)
        z = mu.detach().clone().requires_grad_(True)
        opt = torch.optim.Adam([z], lr=lr)
        for _ in range(steps):
            # A sum over images: each image's latent gets its own gradient, unscaled by the batch size.
            loss = (model.decoder(z) - x).pow(2).flatten(1).mean(1).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            return start, model.decoder(z)
    finally:
        for p in params:
            p.requires_grad_(True)


def _refined_scores(
    model: VAE,
    images: torch.Tensor,
    idx: np.ndarray,
    dev: torch.device,
    steps: int,
    batch_size: int,
    channels_last: bool,
) -> dict[str, Any]:
    before, after = [], []
    for s in range(0, len(idx), batch_size):
        x = to_batch(images, idx[s : s + batch_size], dev, channels_last)
        start, refined = refine_latents(model, x, steps)
        before.append(psnr(start, x).cpu())
        after.append(psnr(refined, x).cpu())
    b, a = torch.cat(before), torch.cat(after)
    return {
        "steps": steps,
        "images": len(idx),
        "psnr": _stats(a),
        "gain_over_mu_db": float(a.mean() - b.mean()),
    }


def _flat(images: torch.Tensor, idx: np.ndarray) -> torch.Tensor:
    """uint8 (N, S, S, 3) rows -> float (n, 3·S·S) in [0, 1], NCHW order like the model's input."""
    return images[torch.as_tensor(idx)].permute(0, 3, 1, 2).reshape(len(idx), -1).float().div_(255.0)


def _pca_scores(mean: torch.Tensor, basis: torch.Tensor, eval_x: torch.Tensor, size: int) -> dict[str, Any]:
    recon = pca_reconstruct(mean, basis, eval_x)
    shape = (-1, 3, size, size)
    ps = torch.cat([psnr(recon[s : s + 256], eval_x[s : s + 256]) for s in range(0, len(eval_x), 256)])
    ss = torch.cat(
        [
            ssim(recon[s : s + 256].view(shape), eval_x[s : s + 256].view(shape))
            for s in range(0, len(eval_x), 256)
        ]
    )
    return {"k": basis.shape[1], "psnr": _stats(ps), "ssim": _stats(ss)}


def _choose(
    n: int, fingerprint: str, training: dict[str, Any], split: str, limit: int | None
) -> tuple[np.ndarray, np.ndarray, str, str, bool]:
    """(images to score, images to fit the PCA on, what those are, the split scored, whether the data is
    the checkpoint's training data) for a dataset of n images with this fingerprint."""
    # The recorded split is only meaningful for the very data it was drawn from.
    recorded = training.get("data") or {}
    rec_split = training.get("split") or {}
    matches = fingerprint == recorded.get("fingerprint") and "seed" in rec_split
    everything = np.arange(n)
    if matches:
        sp = make_split(n, float(rec_split["val_fraction"]), int(rec_split["seed"]))
        matches = sp.val_hash == rec_split.get("val_hash")
    if matches:
        eval_idx, fit_idx, fit_on = (sp.val if split == "val" else everything), sp.train, "training split"
    else:
        if split == "val":
            log.warning("the data is not this checkpoint's training data: evaluating all %d images", n)
        eval_idx = fit_idx = everything
        fit_on = "all images given (not the checkpoint's training data)"
        split = "all"
    if limit is not None:
        eval_idx = eval_idx[:limit]
    return eval_idx, fit_idx, fit_on, split, bool(matches)


def _warn_if_unfinished(run: dict[str, Any], checkpoint: Path) -> None:
    if run["complete"] is not False:
        return
    planned = f" of {run['epochs_planned']} planned" if run["epochs_planned"] else ""
    log.warning(
        "warning: %s is from a run that did not finish (weights of epoch %s%s: killed, stopped or still "
        "training), so these are not the run's final figures; if it was stopped, `python -m trainer "
        "--resume %s` finishes it",
        checkpoint,
        run["epochs_done"],
        planned,
        checkpoint.parent,
    )


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
    pca_k: Sequence[int] = (),
    refine_steps: int = 0,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    dev = pick_device(device)
    ck = load_checkpoint(checkpoint, dev)
    training = ck.training
    run = ck.run_status()
    _warn_if_unfinished(run, checkpoint)  # first: a long evaluation must not bury it
    recorded = training.get("data") or {}
    count = int(recorded.get("count", 4000)) if recorded.get("source") == "synthetic" else 4000
    cache = cache_dir if cache_dir is not None else checkpoint.resolve().parent.parent / ".cache"
    if data == "synthetic":
        # The synthetic set's fingerprint and split need no pixels: render only the cars that are used.
        size = ck.policy.image_size
        chosen = _choose(count, synthetic_fingerprint(count, size), training, split, limit)
        used = np.concatenate([chosen[0], chosen[1]]) if pca and len(chosen[0]) else chosen[0]
        ds: Dataset = load_synthetic_rows(count, size, used, cache, workers)
    else:
        # The checkpoint's folder is its run's --out, which training left out of the photos.
        ds = load_data(data, ck.policy, count, workers, cache, run_dir=checkpoint.parent)
        chosen = _choose(len(ds), ds.fingerprint, training, split, limit)
    eval_idx, fit_idx, fit_on, split, matches = chosen

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
        "training_run": run,
        "split": split,
        "images": len(eval_idx),
        "psnr": _stats(scores.psnr),
        "ssim": _stats(scores.ssim),
        "elbo_nats_per_image": _stats(elbo),
        "bits_per_dim": float(-elbo.mean() / (scores.dims * math.log(2))) if len(elbo) else None,
        "log_sigma": log_sigma,
        "kl_nats_per_image": float(scores.kl.mean()) if len(elbo) else None,
    }
    if pca and len(eval_idx) and len(fit_idx) <= ck.config.latent_dim and np.isin(eval_idx, fit_idx).any():
        # k components reproduce k + 1 images exactly: fitted on the images it scores, a PCA would score
        # 100 dB, a baseline in name only.
        result.update(pca=None, vae_minus_pca_psnr_db=None)
        result["pca_skipped"] = (
            f"only {len(fit_idx)} images to fit the PCA on, and they are the scored images: it would "
            "reproduce them exactly (give the checkpoint's training data, or more than "
            f"{ck.config.latent_dim} images)"
        )
    elif pca and len(eval_idx):
        k = min(ck.config.latent_dim, len(fit_idx) - 1, scores.dims)
        more = sorted({min(int(j), len(fit_idx) - 1, scores.dims) for j in pca_k} - {k})
        fit_x, eval_x = _flat(ds.images, fit_idx), _flat(ds.images, eval_idx)
        # One fit at the largest k serves every smaller k: the components come in order.
        mean, basis = pca_basis(fit_x, max([k, *more]))
        size = ck.config.image_size
        result["pca"] = {
            **_pca_scores(mean, basis[:, :k], eval_x, size),
            "fit_on": fit_on,
            "fit_images": len(fit_idx),
        }
        result["vae_minus_pca_psnr_db"] = result["psnr"]["mean"] - result["pca"]["psnr"]["mean"]
        if more:
            result["pca_more"] = [_pca_scores(mean, basis[:, :j], eval_x, size) for j in more]
    if refine_steps > 0 and len(eval_idx):
        result["refined_latent"] = _refined_scores(
            model, ds.images, eval_idx, dev, refine_steps, batch_size, channels_last
        )
    result["seconds"] = round(time.perf_counter() - t0, 2)
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m trainer.evaluate",
        description="Score a checkpoint on a folder of images (or the synthetic cars) and print JSON: PSNR "
        "and SSIM (mean, median), ELBO in nats per image, and a PCA baseline with k = latent size.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="a model.safetensors written by the trainer")
    p.add_argument("--data", required=True, metavar="DIR|synthetic", help="images to score")
    p.add_argument(
        "--split",
        choices=("val", "all"),
        default="val",
        help="val = the checkpoint's recorded validation split (when --data is its training data)",
    )
    p.add_argument(
        "--limit", type=int_at_least(1), default=None, help="score at most this many images (default: all)"
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--batch-size", type=int_at_least(1), default=128, help="images per forward pass")
    p.add_argument("--workers", type=int_at_least(1), default=default_workers(), help=WORKERS_HELP)
    p.add_argument(
        "--cache-dir",
        default=None,
        help="decoded-image cache (default: the checkpoint's folder/../.cache, where the trainer puts it)",
    )
    p.add_argument("--no-pca", action="store_true", help="skip the PCA baseline")
    p.add_argument(
        "--pca-k",
        type=_int_list,
        default=(),
        metavar="K[,K...]",
        help="PCA at these code sizes too (pca_more): how many linear components the latent is worth "
        "(default: none)",
    )
    p.add_argument(
        "--refine-steps",
        type=int_at_least(0),
        default=0,
        metavar="N",
        help="also optimise each image's latent for N Adam steps against the image, decoder fixed "
        "(refined_latent): what a better encoder could at least win; ~100 steps converge, use --limit",
    )
    return p


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        refuse_empty_paths(args, ("checkpoint", "data", "cache_dir"))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    setup_logging("stderr")  # stdout carries only the JSON
    try:
        result = evaluate(
            Path(args.checkpoint),
            args.data,
            args.split,
            args.limit,
            args.device,
            args.batch_size,
            args.workers,
            Path(args.cache_dir) if args.cache_dir is not None else None,
            pca=not args.no_pca,
            pca_k=args.pca_k,
            refine_steps=args.refine_steps,
        )
    except (CheckpointError, DataError, DeviceError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C in a long scoring (--refine-steps, a big folder): no traceback
        print("interrupted", file=sys.stderr)
        return 130
    try:
        print(json.dumps(result, indent=2), flush=True)
    except BrokenPipeError:
        # The reader left early (`| head`). Python would print a traceback here and, flushing stdout at
        # exit, another one; stdout goes to /dev/null instead, and the status says the output is cut.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
