"""carvae.model: shapes at every supported size, separate μ / log σ² heads, batch independence, sampling."""

from __future__ import annotations

import pytest
import torch

from carvae.model import VAE, ConfigError, VAEConfig


def tiny(size: int = 32, latent: int = 8) -> VAE:
    torch.manual_seed(0)
    return VAE(VAEConfig(image_size=size, latent_dim=latent, channels=(8, 16, 16)))


@pytest.mark.parametrize("size", [16, 32, 64, 128])
def test_shapes_at_each_size(size: int) -> None:
    model = tiny(size, latent=12).eval()
    x = torch.rand(3, 3, size, size)
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (3, 12)
    assert model.decode(mu).shape == (3, 3, size, size)
    x_hat, mu2, logvar2 = model(x)
    assert x_hat.shape == x.shape and mu2.shape == (3, 12) and logvar2.shape == (3, 12)
    assert model.reconstruct(x).shape == x.shape
    assert model.sample(5).shape == (5, 3, size, size)
    # one stride-2 level per halving down to 4×4
    assert model.cfg.levels == {16: 2, 32: 3, 64: 4, 128: 5}[size]


def test_mu_and_logvar_come_from_separate_heads() -> None:
    model = tiny()
    enc = model.encoder
    assert enc.fc_mu is not enc.fc_logvar
    assert enc.fc_mu.weight.data_ptr() != enc.fc_logvar.weight.data_ptr()
    x = torch.rand(2, 3, 32, 32)
    mu_before, logvar_before = model.encode(x)
    with torch.no_grad():
        enc.fc_logvar.bias.add_(1.0)
    mu_after, logvar_after = model.encode(x)
    torch.testing.assert_close(mu_after, mu_before)
    torch.testing.assert_close(logvar_after, logvar_before + 1.0)


def test_output_is_in_the_data_range_even_for_extreme_codes() -> None:
    model = tiny().eval()
    out = model.decode(torch.randn(4, 8) * 100)
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_no_batchnorm_and_results_do_not_depend_on_the_batch() -> None:
    model = tiny()
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert any(isinstance(m, torch.nn.GroupNorm) for m in model.modules())
    x = torch.rand(6, 3, 32, 32)
    for mode in (True, False):  # GroupNorm behaves the same in train and eval mode
        model.train(mode)
        with torch.no_grad():
            together = model.reconstruct(x)
            alone = torch.cat([model.reconstruct(x[i : i + 1]) for i in range(6)])
        torch.testing.assert_close(alone, together, atol=1e-5, rtol=1e-5)


def test_reconstruct_is_deterministic_and_forward_samples() -> None:
    model = tiny()
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(model.reconstruct(x), model.reconstruct(x))
    with torch.no_grad():
        model.encoder.fc_logvar.bias.fill_(0.0)  # unit posterior variance: samples clearly differ
    torch.manual_seed(1)
    a, _, _ = model(x)
    b, _, _ = model(x)
    assert not torch.allclose(a, b)


def test_sampling_is_seeded_and_temperature_scales_the_prior() -> None:
    model = tiny().eval()
    s1 = model.sample(4, torch.Generator().manual_seed(3))
    s2 = model.sample(4, torch.Generator().manual_seed(3))
    s3 = model.sample(4, torch.Generator().manual_seed(4))
    torch.testing.assert_close(s1, s2)
    assert not torch.allclose(s1, s3)
    cold = model.sample(3, torch.Generator().manual_seed(3), temperature=0.0)
    torch.testing.assert_close(cold, model.decode(torch.zeros(3, 8)))


@pytest.mark.parametrize(
    ("kwargs", "at_fault"),
    [
        ({"image_size": 48}, {"image_size"}),
        ({"image_size": 4}, {"image_size"}),
        ({"latent_dim": 0}, {"latent_dim"}),
        ({"channels": (12, 16)}, {"channels"}),
        ({"channels": ()}, {"channels"}),
        ({"latent_grid": 2}, {"latent_grid", "image_size"}),  # grids start at 4×4
        ({"latent_grid": 6}, {"latent_grid", "image_size"}),  # not a power of two
        ({"latent_grid": 32}, {"latent_grid", "image_size"}),  # finer than image_size / 4
        ({"latent_grid": 8, "latent_dim": 100}, {"latent_dim", "latent_grid"}),  # 100 do not fill 8×8
    ],
)
def test_invalid_configs_are_refused_naming_the_fields_at_fault(kwargs: dict, at_fault: set[str]) -> None:
    with pytest.raises(ConfigError) as e:
        VAEConfig(**kwargs)
    # the fields, so that a command line can name its flags; str() names them as fields
    assert set(e.value.fields) == at_fault and all(f in str(e.value) for f in at_fault)
    assert all(f"<{f}>" in e.value.describe(lambda name: f"<{name}>") for f in at_fault)


def test_config_round_trip_and_level_channels() -> None:
    cfg = VAEConfig(image_size=128, latent_dim=64, channels=(16, 32), blocks_per_level=2)
    assert VAEConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.level_channels() == [16, 32, 32, 32, 32]  # stretched to 5 levels
    assert VAEConfig(image_size=16, channels=(8, 16, 32, 64)).level_channels() == [32, 64]  # cut to 2


@pytest.mark.parametrize(("size", "grid"), [(32, 4), (32, 8), (64, 8), (128, 16)])
def test_a_latent_grid_is_still_a_flat_latent_vector(size: int, grid: int) -> None:
    torch.manual_seed(0)
    cfg = VAEConfig(image_size=size, latent_dim=grid * grid * 2, channels=(8, 16, 16), latent_grid=grid)
    model = VAE(cfg).eval()
    assert cfg.grid_channels == 2
    # the encoder stops at the grid's resolution: one stride-2 level per halving from size to grid
    assert len(cfg.level_channels()) == (size // grid).bit_length() - 1
    x = torch.rand(3, 3, size, size)
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (3, cfg.latent_dim)
    assert model.reconstruct(x).shape == x.shape and model.sample(2).shape == (2, 3, size, size)
    # separate heads here too
    assert model.encoder.fc_mu is not model.encoder.fc_logvar
    assert VAEConfig.from_dict(cfg.to_dict()) == cfg


def test_a_fitted_prior_standardises_the_latent_coordinates() -> None:
    model = tiny().eval()
    x = torch.rand(5, 3, 32, 32)
    raw_mu, raw_logvar = model.encoder(x)
    # Until fitted, encode/decode are the encoder/decoder themselves and the prior is N(0, I).
    assert not model.prior_is_fitted
    mu, logvar = model.encode(x)
    assert torch.equal(mu, raw_mu) and torch.allclose(logvar, raw_logvar)
    # Codes spread unevenly, off-centre and correlated, as a trained encoder's are.
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(8, 8, generator=g)
    codes = torch.randn(4000, 8, generator=g) @ mix + torch.linspace(-2, 2, 8)
    model.fit_prior(codes)
    assert model.prior_is_fitted
    std = (codes - model.prior_loc) @ model.prior_whiten.T  # the coordinates encode() reports them in
    torch.testing.assert_close(std.mean(0), torch.zeros(8), atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.cov(std.T), torch.eye(8), atol=2e-2, rtol=0)  # up to the small ridge
    # encode and decode are inverse maps of the same coordinates: reconstruct is unchanged.
    mu, logvar = model.encode(x)
    torch.testing.assert_close(model.decode(mu), model.reconstruct(x), atol=1e-5, rtol=0)
    torch.testing.assert_close(mu @ model.prior_scale_tril.T + model.prior_loc, raw_mu, atol=1e-4, rtol=0)
    torch.testing.assert_close(model.unstandardise(mu), raw_mu, atol=1e-4, rtol=0)
    # a sample is a decode of N(0, I) in these coordinates, i.e. of N(loc, L Lᵀ) for the decoder
    z = torch.randn(3, 8, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(
        model.sample(3, torch.Generator().manual_seed(5)),
        model.decoder(model.prior_loc + z @ model.prior_scale_tril.T),
    )
    # per-dimension posterior variance in the new coordinates: diag(W diag(σ²) Wᵀ)
    w = model.prior_whiten
    expected = torch.stack([torch.diag(w @ torch.diag(v) @ w.T) for v in raw_logvar.exp()])
    torch.testing.assert_close(logvar.exp(), expected, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize(
    ("codes", "why"),
    [
        (torch.randn(1, 8), "at least 2"),  # a training split of one image
        (torch.ones(5, 8) * 0.3, "no spread"),  # identical training images
        (torch.full((5, 8), float("nan")), "not all finite"),  # a diverged model
    ],
)
def test_fit_prior_refuses_codes_that_define_no_gaussian_and_keeps_n01(codes: torch.Tensor, why: str) -> None:
    model = tiny()
    with pytest.raises(ValueError, match=why):
        model.fit_prior(codes)
    assert not model.prior_is_fitted and torch.equal(model.prior_whiten, torch.eye(8))
