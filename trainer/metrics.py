"""Metrics over whole sets: batch-size-weighted epoch means, and per-image scores of a model on images.

Both the training loop (validation every epoch) and `trainer.evaluate` use `score_images`, so the PSNR a
run logs and the PSNR the evaluator prints are the same computation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from carvae.losses import LOG_2PI, kl_divergence, psnr, ssim
from carvae.model import VAE
from trainer.data import to_batch
from trainer.distributed import all_reduce_sum


class WeightedMeans:
    """Running Σ value·n and Σ n per key, kept as tensors on the device (no host sync per step); `means()`
    sums over processes, so an epoch's figures cover every batch of every rank."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.sums: dict[str, torch.Tensor] = {}
        self.count = torch.zeros((), dtype=torch.float64, device=device)

    def add(self, n: int, **values: torch.Tensor | float) -> None:
        for k, v in values.items():
            v = torch.as_tensor(v, dtype=torch.float64).to(self.device).detach()
            self.sums[k] = self.sums.get(k, torch.zeros((), dtype=torch.float64, device=self.device)) + v * n
        self.count += n

    def means(self) -> dict[str, float]:
        keys = sorted(self.sums)
        packed = torch.stack([self.count, *(self.sums[k] for k in keys)])
        packed = all_reduce_sum(packed).cpu()
        total = float(packed[0])
        return {k: float(packed[i + 1]) / max(total, 1.0) for i, k in enumerate(keys)}

    @property
    def n(self) -> int:
        return int(self.count)


@dataclass
class ImageScores:
    """Per-image figures (CPU float64 tensors, one value per image)."""

    psnr: torch.Tensor  # dB, reconstruction through μ (what the service returns)
    ssim: torch.Tensor  # same reconstruction
    kl: torch.Tensor  # nats, KL(q(z|x) || N(0, I))
    sq_err: torch.Tensor  # Σ squared error over pixels of a reconstruction from one posterior sample
    dims: int  # pixels × channels per image

    def nll(self, log_sigma: float) -> torch.Tensor:
        """Gaussian negative log-likelihood per image (nats) at a fixed decoder σ."""
        return 0.5 * self.sq_err * math.exp(-2 * log_sigma) + self.dims * (log_sigma + 0.5 * LOG_2PI)

    def elbo(self, log_sigma: float) -> torch.Tensor:
        return -(self.nll(log_sigma) + self.kl)


@torch.no_grad()
def score_images(
    model: VAE,
    images: torch.Tensor,
    indices: np.ndarray,
    device: torch.device,
    batch_size: int = 128,
    noise_seed: int = 0,
    channels_last: bool = False,
) -> ImageScores:
    """Scores in float32 whatever the training precision, with posterior noise from a fixed-seed CPU
    generator so two epochs (or two machines) are scored on the same draw."""
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(noise_seed)
    parts: dict[str, list[torch.Tensor]] = {"psnr": [], "ssim": [], "kl": [], "sq_err": []}
    dims = 3 * images.shape[1] * images.shape[2]
    for start in range(0, len(indices), batch_size):
        x = to_batch(images, indices[start : start + batch_size], device, channels_last)
        # The encoder's own coordinates, whose prior N(0, I) is the one trained with: KL and ELBO are the
        # training objective's, whatever prior the checkpoint samples from (VAE.fit_prior).
        mu, logvar = model.encoder(x)
        mean_recon = model.decoder(mu)
        eps = torch.randn(mu.shape, generator=gen).to(device)
        sample_recon = model.decoder(mu + eps * torch.exp(0.5 * logvar))
        parts["psnr"].append(psnr(mean_recon, x))
        parts["ssim"].append(ssim(mean_recon, x))
        parts["kl"].append(kl_divergence(mu.float(), logvar.float()))
        parts["sq_err"].append((sample_recon.float() - x).pow(2).flatten(1).sum(1))
    model.train(was_training)
    cat = {
        k: torch.cat(v).double().cpu() if v else torch.zeros(0, dtype=torch.float64) for k, v in parts.items()
    }
    return ImageScores(dims=dims, **cat)


def validation_summary(scores: ImageScores, recipe: str, beta: float) -> dict[str, float]:
    """Whole-validation-set figures, summed over processes. The loss is the training objective with σ set
    to its optimum for the whole set (sigma-vae), so it does not depend on how the set is batched."""
    packed = torch.stack(
        [
            torch.tensor(float(len(scores.psnr)), dtype=torch.float64),
            scores.psnr.sum(),
            scores.ssim.sum(),
            scores.kl.sum(),
            scores.sq_err.sum(),
        ]
    )
    n, psnr_sum, ssim_sum, kl_sum, se_sum = all_reduce_sum(packed).tolist()
    n = max(n, 1.0)
    mse = se_sum / (n * scores.dims)
    if recipe == "sigma-vae":
        # Σ_i NLL_i / n at σ² = mse collapses to this closed form.
        recon = 0.5 * scores.dims * (1.0 + LOG_2PI + math.log(max(mse, 1e-12)))
    else:
        recon = se_sum / n
    kl = kl_sum / n
    return {
        "loss": recon + beta * kl,
        "recon": recon,
        "kl": kl,
        "mse": mse,
        "psnr": psnr_sum / n,
        "ssim": ssim_sum / n,
        "images": int(n),
    }
