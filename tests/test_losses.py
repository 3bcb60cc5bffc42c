"""carvae.losses against hand computations: KL, Gaussian NLL, optimal σ, both recipes, PSNR, SSIM."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from carvae.losses import gaussian_nll, kl_divergence, optimal_log_sigma, psnr, ssim, vae_loss


def test_kl_matches_the_closed_form_by_hand() -> None:
    mu = torch.tensor([[0.5, -1.0], [0.0, 0.0]])
    logvar = torch.tensor([[0.0, math.log(0.25)], [0.0, 0.0]])
    # KL(N(μ, σ²) || N(0, 1)) = ½ (σ² + μ² − 1 − ln σ²) per dimension
    first = 0.5 * (1.0 + 0.25 - 1.0 - 0.0) + 0.5 * (0.25 + 1.0 - 1.0 - math.log(0.25))
    torch.testing.assert_close(kl_divergence(mu, logvar), torch.tensor([first, 0.0]))


def test_gaussian_nll_matches_the_density_by_hand() -> None:
    x = torch.tensor([[[[0.2, 0.9]]], [[[0.5, 0.5]]]])  # 2 images of 1×1×2 "pixels"
    x_hat = torch.tensor([[[[0.3, 0.7]]], [[[0.5, 0.1]]]])
    log_sigma = torch.tensor(math.log(0.2))
    want = []
    for xs, hs in (([0.2, 0.9], [0.3, 0.7]), ([0.5, 0.5], [0.5, 0.1])):
        # −ln N(x | x̂, σ²) = (x − x̂)² / (2σ²) + ln σ + ½ ln 2π, summed over pixels
        want.append(
            sum(
                (a - b) ** 2 / (2 * 0.04) + math.log(0.2) + 0.5 * math.log(2 * math.pi)
                for a, b in zip(xs, hs, strict=True)
            )
        )
    torch.testing.assert_close(gaussian_nll(x_hat, x, log_sigma), torch.tensor(want))


def test_optimal_sigma_is_the_rms_error_and_minimises_the_nll() -> None:
    torch.manual_seed(0)
    x, x_hat = torch.rand(4, 3, 8, 8), torch.rand(4, 3, 8, 8)
    best = optimal_log_sigma(x_hat, x)
    torch.testing.assert_close(best, 0.5 * torch.log(((x - x_hat) ** 2).mean()))
    at_best = gaussian_nll(x_hat, x, best).mean()
    for delta in (-0.05, 0.05):
        assert gaussian_nll(x_hat, x, best + delta).mean() > at_best


def test_sigma_vae_recipe_combines_terms_with_beta() -> None:
    torch.manual_seed(1)
    x, x_hat = torch.rand(3, 3, 8, 8), torch.rand(3, 3, 8, 8)
    mu, logvar = torch.randn(3, 5), torch.randn(3, 5) * 0.1
    t = vae_loss(x_hat, x, mu, logvar, "sigma-vae", beta=0.5)
    d = 3 * 8 * 8
    mse = float(((x - x_hat) ** 2).mean())
    # at the optimal σ² = mse each image's NLL is se_i/(2·mse) + d(½ ln mse + ½ ln 2π); their mean:
    expected_recon = d / 2 + d * (0.5 * math.log(mse) + 0.5 * math.log(2 * math.pi))
    assert float(t.recon) == pytest.approx(expected_recon, rel=1e-5)
    assert float(t.kl) == pytest.approx(float(kl_divergence(mu, logvar).mean()), rel=1e-6)
    assert float(t.loss) == pytest.approx(float(t.recon) + 0.5 * float(t.kl), rel=1e-6)
    assert float(t.log_sigma) == pytest.approx(0.5 * math.log(mse), rel=1e-5)


def test_mse_recipe_is_summed_squared_error_plus_kld() -> None:
    x = torch.zeros(2, 3, 4, 4)
    x_hat = torch.full((2, 3, 4, 4), 0.5)
    mu, logvar = torch.ones(2, 3), torch.zeros(2, 3)
    t = vae_loss(x_hat, x, mu, logvar, "mse", beta=1.0)
    assert float(t.recon) == pytest.approx(48 * 0.25)  # 48 pixels × 0.5², per image
    assert float(t.kl) == pytest.approx(3 * 0.5)  # ½ μ² per dim with unit variance
    assert float(t.loss) == pytest.approx(12.0 + 1.5)


def test_unknown_recipe_is_refused() -> None:
    with pytest.raises(ValueError, match="recipe"):
        vae_loss(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8), torch.zeros(1, 2), torch.zeros(1, 2), "l1")


def test_psnr_identical_and_known_noise() -> None:
    x = torch.full((2, 3, 8, 8), 0.5)
    assert (psnr(x, x) >= 99.9).all()  # clamped at mse 1e-10 instead of returning inf
    sign = torch.ones(2, 3, 8, 8)
    sign[..., ::2] = -1
    noisy = x + 0.1 * sign  # mse exactly 0.01 -> 20 dB
    torch.testing.assert_close(psnr(noisy, x), torch.tensor([20.0, 20.0]))
    noisier = x + 0.2 * sign  # 4× the mse -> 10·log10(4) ≈ 6.02 dB less
    torch.testing.assert_close(psnr(noisier, x), torch.tensor([20.0 - 10 * math.log10(4)] * 2))


def _ssim_by_hand(a: np.ndarray, b: np.ndarray, size: int = 11) -> float:
    """SSIM of two size×size single-window images (3 channels) with explicit weighted statistics."""
    coords = np.arange(size) - size // 2
    g = np.exp(-(coords**2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01**2, 0.03**2
    vals = []
    for ch in range(3):
        x, y = a[ch], b[ch]
        mx, my = (w * x).sum(), (w * y).sum()
        vx, vy = (w * x * x).sum() - mx**2, (w * y * y).sum() - my**2
        cov = (w * x * y).sum() - mx * my
        vals.append(((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


def test_ssim_matches_a_hand_computation_and_orders_noise() -> None:
    rng = np.random.default_rng(0)
    a = rng.random((3, 11, 11))
    b = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1)
    got = ssim(torch.tensor(b[None]), torch.tensor(a[None]))
    assert float(got[0]) == pytest.approx(_ssim_by_hand(b, a), abs=1e-5)

    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert float(ssim(x, x)[0]) == pytest.approx(1.0, abs=1e-6)
    noise = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    scores = [float(ssim((x + s * noise).clamp(0, 1), x)[0]) for s in (0.02, 0.1, 0.3)]
    assert scores[0] > scores[1] > scores[2]
    y = (x + 0.1 * noise).clamp(0, 1)
    torch.testing.assert_close(ssim(x, y), ssim(y, x))  # symmetric


def test_ssim_of_images_smaller_than_the_window_uses_the_largest_odd_window_that_fits() -> None:
    # --image-size 8 is a valid model size: validation must score it, not fail in conv2d.
    rng = np.random.default_rng(2)
    a = rng.random((3, 7, 7))
    b = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1)
    got = ssim(torch.tensor(b[None]), torch.tensor(a[None]))
    assert float(got[0]) == pytest.approx(_ssim_by_hand(b, a, size=7), abs=1e-5)
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(ssim(x, x), torch.ones(2), atol=1e-6)
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    assert bool((ssim((x + 0.3 * noise).clamp(0, 1), x) < ssim((x + 0.02 * noise).clamp(0, 1), x)).all())
