"""The whole VAE in one file: `VAEConfig` + `VAE`.

Images are float tensors in [0, 1], NCHW. The decoder ends in a sigmoid so its output range is the data
range. GroupNorm (never BatchNorm) keeps every image's result independent of what else is in its batch,
which the service's dynamic batching relies on.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

ARCHITECTURE = "carvae-resconv-v1"
PRIOR_BUFFERS = ("prior_loc", "prior_scale_tril", "prior_whiten")


class ConfigError(ValueError):
    """A configuration that is refused, naming the settings at fault: `template` refers to each of
    `fields` as {field}, so a command line can name its flags where str() names the fields."""

    def __init__(self, template: str, *fields: str) -> None:
        self.template, self.fields = template, fields
        super().__init__(self.describe(str))

    def describe(self, name: Callable[[str], str]) -> str:
        return self.template.format(**{f: name(f) for f in self.fields})


@dataclass(frozen=True)
class VAEConfig:
    image_size: int = 64
    latent_dim: int = 128
    # channels per resolution level, from the first downsampled level (size/2) to the 4×4 bottleneck;
    # the number of levels follows from image_size, so the list is stretched/cut to fit.
    channels: tuple[int, ...] = field(default=(32, 64, 128, 256))
    blocks_per_level: int = 1
    # 1: the latent is one vector, reached through a fully connected layer from the 4×4 feature map (the
    # seeds' design). G > 1: the latent is a G×G map of latent_dim / G² channels, reached by convolutions
    # (weights shared across positions instead of one large matrix). latent_dim numbers either way.
    latent_grid: int = 1
    architecture: str = ARCHITECTURE

    def __post_init__(self) -> None:
        # A config also comes from a checkpoint's JSON metadata, where 64.0, "64" or true can stand in for 64.
        for name in ("image_size", "latent_dim", "blocks_per_level", "latent_grid"):
            value = getattr(self, name)
            if type(value) is not int:
                raise ConfigError(f"{{{name}}} must be an integer, got {value!r}", name)
        if not isinstance(self.channels, (tuple, list)) or any(type(c) is not int for c in self.channels):
            raise ConfigError(f"{{channels}} must be integers, got {self.channels!r}", "channels")
        if self.blocks_per_level < 0:
            raise ConfigError(
                f"{{blocks_per_level}} must be >= 0, got {self.blocks_per_level}", "blocks_per_level"
            )
        size, g = self.image_size, self.latent_grid
        if size < 8 or size & (size - 1):
            raise ConfigError(f"{{image_size}} must be a power of two >= 8, got {size}", "image_size")
        if self.latent_dim < 1:
            raise ConfigError(f"{{latent_dim}} must be >= 1, got {self.latent_dim}", "latent_dim")
        # _norm's GroupNorm must be able to split every level's channels into its groups.
        if not self.channels or any(c < 8 or c % 8 or c % _norm_groups(c) for c in self.channels):
            raise ConfigError(
                f"{{channels}} must be multiples of 8 (of 32 from 128 up), got {self.channels}", "channels"
            )
        if g != 1 and (g < 4 or g & (g - 1) or g > size // 4):
            raise ConfigError(
                f"{{latent_grid}} must be 1 or a power of two from 4 to {{image_size}}/4 ({size // 4} at "
                f"{size} px), got {g}",
                "latent_grid",
                "image_size",
            )
        if self.latent_dim % (g * g):
            raise ConfigError(
                f"{{latent_dim}} {self.latent_dim} is not a multiple of {{latent_grid}}² = {g * g}",
                "latent_dim",
                "latent_grid",
            )
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))

    @property
    def levels(self) -> int:
        """Number of stride-2 steps from image_size down to 4×4."""
        return int(math.log2(self.image_size // 4))

    def level_channels(self) -> list[int]:
        """Channels of the levels the encoder and decoder use: from size/2 down to the latent grid (or to
        4×4 for a latent vector)."""
        chans = list(self.channels)
        while len(chans) < self.levels:
            chans.append(chans[-1])
        chans = chans[-self.levels :] if len(chans) > self.levels else chans
        return chans[: self.levels - int(math.log2(max(self.latent_grid, 4) // 4))]

    @property
    def grid_channels(self) -> int:
        """Channels of a latent grid (latent_dim for a latent vector)."""
        return self.latent_dim // (self.latent_grid * self.latent_grid)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> VAEConfig:
        known = {
            k: d[k]
            for k in (
                "image_size",
                "latent_dim",
                "channels",
                "blocks_per_level",
                "latent_grid",
                "architecture",
            )
            if k in d
        }
        if "channels" in known:
            known["channels"] = tuple(known["channels"])
        return cls(**known)


def _norm_groups(ch: int) -> int:
    return min(32, ch // 4)


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=_norm_groups(ch), num_channels=ch, eps=1e-5)


class ResBlock(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.norm1 = _norm(ch)
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.norm2 = _norm(ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)
        # Zero-init the last conv so each block starts as the identity: deep stacks train from step one.
        nn.init.zeros_(self.conv2.weight)
        if self.conv2.bias is not None:
            nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return x + h


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        chans = cfg.level_channels()
        layers: list[nn.Module] = [nn.Conv2d(3, chans[0], 3, stride=2, padding=1)]  # size -> size/2
        for i, ch in enumerate(chans):
            if i > 0:
                layers.append(nn.Conv2d(chans[i - 1], ch, 3, stride=2, padding=1))
            layers.extend(ResBlock(ch) for _ in range(cfg.blocks_per_level))
        layers.extend([_norm(chans[-1]), nn.SiLU()])
        self.body = nn.Sequential(*layers)
        # Two separate heads: μ and log σ² are different quantities and must not share one tensor.
        vector = cfg.latent_grid == 1

        def head() -> nn.Linear | nn.Conv2d:
            if vector:
                return nn.Linear(chans[-1] * 4 * 4, cfg.latent_dim)
            return nn.Conv2d(chans[-1], cfg.grid_channels, 3, padding=1)

        mu_head, logvar_head = head(), head()
        # Start with a small posterior variance so early reconstructions are not drowned in noise.
        nn.init.zeros_(logvar_head.weight)
        if logvar_head.bias is not None:
            nn.init.constant_(logvar_head.bias, -4.0)
        self.fc_mu: nn.Module = mu_head
        self.fc_logvar: nn.Module = logvar_head
        if vector:
            self.body.append(nn.Flatten())
        else:  # a grid is flattened after the heads: the latent is a vector of latent_dim numbers either way
            self.fc_mu = nn.Sequential(mu_head, nn.Flatten())
            self.fc_logvar = nn.Sequential(logvar_head, nn.Flatten())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)
        return self.fc_mu(h), self.fc_logvar(h)


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        chans = cfg.level_channels()
        self.bottom = chans[-1]
        self.grid = cfg.latent_grid
        self.grid_channels = cfg.grid_channels
        self.fc: nn.Module = (
            nn.Linear(cfg.latent_dim, chans[-1] * 4 * 4)
            if cfg.latent_grid == 1
            else nn.Conv2d(cfg.grid_channels, chans[-1], 3, padding=1)
        )
        layers: list[nn.Module] = []
        for i in range(len(chans) - 1, -1, -1):
            layers.extend(ResBlock(chans[i]) for _ in range(cfg.blocks_per_level))
            out_ch = chans[i - 1] if i > 0 else chans[0]
            # Nearest upsample + conv instead of ConvTranspose2d: no checkerboard artefacts.
            layers.extend(
                [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(chans[i], out_ch, 3, padding=1)]
            )
        layers.extend([_norm(chans[0]), nn.SiLU(), nn.Conv2d(chans[0], 3, 3, padding=1)])
        self.body = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.grid == 1:
            h = self.fc(z).view(z.shape[0], self.bottom, 4, 4)
        else:
            h = self.fc(z.view(z.shape[0], self.grid_channels, self.grid, self.grid))
        return torch.sigmoid(self.body(h))


class VAE(nn.Module):
    prior_loc: torch.Tensor
    prior_scale_tril: torch.Tensor
    prior_whiten: torch.Tensor

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        # Calibrated decoder noise (log σ of the Gaussian likelihood), tracked during training so ELBO in
        # nats can be reported for a checkpoint. Not used by reconstruct/sample.
        self.register_buffer("log_sigma", torch.tensor(0.0))
        # The prior that samples are drawn from, N(loc, L Lᵀ). Training uses N(0, I) (these buffers at their
        # defaults); afterwards the trainer fits a Gaussian to the training set's posterior means
        # (`fit_prior`), because the codes a VAE actually uses fill N(0, I) unevenly and its samples from
        # N(0, I) land in regions no car was encoded to ("ex-post density estimation", Ghosh et al. 2020).
        # encode/decode speak the prior's standardised coordinates, so N(0, I) stays the prior for every
        # user of the public API: a sample is decode(randn), a latent slider spans ±3 standard deviations.
        d = cfg.latent_dim
        self.register_buffer("prior_loc", torch.zeros(d))
        # Identities, made without torch.eye: on the meta device (load_checkpoint's shape check) eye goes
        # through torch._refs, whose first call imports torch._dynamo — over a second of start-up.
        self.register_buffer("prior_scale_tril", torch.zeros(d, d).fill_diagonal_(1))
        # the inverse of prior_scale_tril
        self.register_buffer("prior_whiten", torch.zeros(d, d).fill_diagonal_(1))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (N, 3, H, W) in [0, 1] -> (mu, logvar), each (N, latent_dim), in the prior's standardised
        coordinates; logvar is the per-dimension (marginal) posterior variance there."""
        return self.standardise(*self.encoder(x))

    def standardise(self, mu: torch.Tensor, logvar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder's (mu, logvar) -> the prior's standardised coordinates (identity until fitted)."""
        w = self.prior_whiten
        var = torch.exp(logvar) @ (w * w).T
        return (mu - self.prior_loc) @ w.T, torch.log(var.clamp_min(torch.finfo(var.dtype).tiny))

    def unstandardise(self, z: torch.Tensor) -> torch.Tensor:
        """The prior's standardised coordinates -> the decoder's own (the inverse of standardise's μ)."""
        return self.prior_loc + z @ self.prior_scale_tril.T

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: (N, latent_dim) in the prior's standardised coordinates -> images (N, 3, H, W) in [0, 1]."""
        return self.decoder(self.unstandardise(z))

    @torch.no_grad()
    def fit_prior(self, mus: torch.Tensor, shrinkage: float = 1e-3) -> None:
        """Set the sampling prior to the Gaussian of the given posterior means (N, latent_dim), raw
        encoder coordinates. A small ridge keeps the covariance invertible.

        Raises ValueError, leaving the prior as it was, when the means define no Gaussian: fewer than two
        of them, non-finite values (a diverged model), or no spread at all (identical training images)."""
        m = mus.double()
        if m.ndim != 2 or len(m) < 2:
            raise ValueError(f"a prior needs at least 2 posterior means, got {len(m)}")
        if not torch.isfinite(m).all():
            raise ValueError("the posterior means are not all finite")
        loc = m.mean(0)
        cov = torch.cov(m.T).reshape(len(loc), len(loc))
        cov = cov + shrinkage * cov.diagonal().mean() * torch.eye(len(loc), dtype=cov.dtype)
        tril, info = torch.linalg.cholesky_ex(cov)
        if int(info) != 0:
            raise ValueError("the posterior means have no spread (their covariance is singular)")
        whiten = torch.linalg.solve_triangular(tril, torch.eye(len(loc), dtype=cov.dtype), upper=False)
        if not torch.isfinite(whiten).all():
            raise ValueError("the covariance of the posterior means cannot be inverted")
        for name, value in (("prior_loc", loc), ("prior_scale_tril", tril), ("prior_whiten", whiten)):
            self.get_buffer(name).copy_(value.to(self.get_buffer(name)))

    @property
    def prior_is_fitted(self) -> bool:
        return bool(self.prior_loc.any()) or not torch.equal(
            self.prior_scale_tril, torch.eye(self.cfg.latent_dim, device=self.prior_loc.device)
        )

    @staticmethod
    def reparameterize(
        mu: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + eps * torch.exp(0.5 * logvar)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass in the encoder's own coordinates, whose prior is N(0, I): (reconstruction from a
        posterior sample, mu, logvar)."""
        mu, logvar = self.encoder(x)
        return self.decoder(self.reparameterize(mu, logvar)), mu, logvar

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic reconstruction through μ (what the service returns)."""
        mu, _ = self.encoder(x)
        return self.decoder(mu)

    def sample(
        self, n: int, generator: torch.Generator | None = None, temperature: float = 1.0
    ) -> torch.Tensor:
        """n images from the prior (N(0, temperature² I) in decode's coordinates). The noise is drawn on
        the generator's device (CPU by default) so a seed gives the same cars on every device."""
        z = torch.randn(n, self.cfg.latent_dim, generator=generator) * temperature
        p = next(self.parameters())
        return self.decode(z.to(device=p.device, dtype=p.dtype))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
