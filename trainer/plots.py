"""The three pictures of a run: loss.png, reconstructions.png, samples.png.

Image grids go through carvae.preprocess (to_uint8, make_grid, encode_image), the same code the service
uses for its responses; matplotlib (Agg, no display needed) only draws the curves.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch

from carvae.model import VAE
from carvae.preprocess import encode_image, make_grid, to_uint8
from trainer.data import to_batch
from trainer.state import write_bytes

SAMPLE_SEED = 0  # samples.png is drawn from the same noise every time, so two runs compare side by side


def loss_png(rows: list[dict[str, Any]]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    val_rows = [r for r in rows if r.get("val_loss") is not None]
    style = {"marker": "o", "markersize": 3} if len(rows) < 40 else {}  # a 1-epoch run still shows a point
    fig, (ax_loss, ax_psnr) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    ax_loss.plot(epochs, [r["train_loss"] for r in rows], label="train", **style)
    ax_loss.plot(
        [r["epoch"] for r in val_rows], [r["val_loss"] for r in val_rows], label="validation", **style
    )
    ax_loss.set(title="loss (nats per image)", xlabel="epoch")
    ax_loss.xaxis.get_major_locator().set_params(integer=True)
    ax_psnr.xaxis.get_major_locator().set_params(integer=True)
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_psnr.plot(epochs, [r["train_psnr"] for r in rows], label="train (posterior sample)", **style)
    ax_psnr.plot(
        [r["epoch"] for r in val_rows], [r["val_psnr"] for r in val_rows], label="validation (μ)", **style
    )
    ax_psnr.set(title="PSNR (dB)", xlabel="epoch")
    ax_psnr.legend()
    ax_psnr.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


@torch.no_grad()
def reconstructions_png(model: VAE, images: torch.Tensor, indices: np.ndarray, device: torch.device) -> bytes:
    """Up to 16 validation originals in the top row, their reconstructions (through μ) below."""
    idx = indices[:16]
    x = to_batch(images, idx, device, channels_last=False)
    model.eval()
    recon = model.reconstruct(x)
    both = np.concatenate([to_uint8(x), to_uint8(recon)])
    return encode_image(make_grid(both, nrow=len(idx)))


@torch.no_grad()
def samples_png(model: VAE, n: int = 64, seed: int = SAMPLE_SEED) -> bytes:
    model.eval()
    return encode_image(make_grid(to_uint8(model.sample(n, torch.Generator().manual_seed(seed))), nrow=8))


def write_loss(out: Path, rows: list[dict[str, Any]]) -> None:
    write_bytes(out / "loss.png", loss_png(rows))


def write_all(
    out: Path, model: VAE, images: torch.Tensor, val: np.ndarray, rows: list[dict[str, Any]]
) -> None:
    """All three pictures, drawn on the CPU from `model` (the best epoch's weights)."""
    model = model.cpu()
    write_loss(out, rows)
    write_bytes(
        out / "reconstructions.png", reconstructions_png(model, images.cpu(), val, torch.device("cpu"))
    )
    write_bytes(out / "samples.png", samples_png(model))
