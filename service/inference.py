"""The served model's three deterministic entry points, prepared for fast inference.

- `reconstruct(x) -> (images, mu)`: through the posterior mean, as `VAE.reconstruct` (no sampling);
- `encode(x) -> (mu, logvar)`; `decode(z) -> images`.

On CPU and CUDA the weights and inputs use the channels_last layout (oneDNN/cuDNN convolutions are
faster on it: ~30 % less CPU per image here). With `torchscript=True` the encoder and the decoder are
traced once and frozen: a pass then runs as one or two calls into TorchScript instead of ~150 Python-level
module calls, so the model threads hardly need the GIL and no longer queue behind the event loop for it.
The entry points share the two traced halves (the prior's coordinate change around them is a few small
eager ops), so start-up traces, checks and warms up two graphs, not three that repeat each other. Tracing
records operations, not Python control flow, which is exact here because both halves are deterministic
(the random reparameterisation is never traced); `check_matches_eager` verifies it at start-up, and any
failure falls back to the eager model.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from carvae.model import VAE, VAEConfig

log = logging.getLogger("carvae.service")


class InferenceModel:
    """Thread-safe: the model threads call it concurrently (no state changes during a pass)."""

    def __init__(self, model: VAE, config: VAEConfig, device: torch.device, torchscript: bool = True) -> None:
        self.device = device
        self.dtype = next(model.parameters()).dtype
        self.image_size = config.image_size
        self.latent_dim = config.latent_dim
        self.channels_last = device.type in ("cpu", "cuda")
        model = model.eval().requires_grad_(False)
        if self.channels_last:
            # Module.to takes memory_format at run time; its type stubs do not list it.
            model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self._vae = model
        self._encoder: Callable[..., Any] = model.encoder
        self._decoder: Callable[..., Any] = model.decoder
        self.traced = False
        if torchscript:
            try:
                self._encoder, self._decoder = self._trace()
                self.traced = True
            except Exception as e:  # an unusual model or backend: serve eagerly rather than not at all
                log.warning("TorchScript tracing failed (%s: %s); serving eagerly", type(e).__name__, e)

    def images_in(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) float in [0, 1] on any device → the model's device, dtype and layout."""
        x = x.to(self.device, self.dtype, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def latents_in(self, z: torch.Tensor) -> torch.Tensor:
        return z.to(self.device, self.dtype, non_blocking=True)

    @torch.inference_mode()
    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # As VAE.reconstruct (the encoder's own μ straight into the decoder), plus μ as encode reports it.
        mu, logvar = self._encoder(self.images_in(x))
        return self._decoder(mu), self._vae.standardise(mu, logvar)[0]

    @torch.inference_mode()
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._vae.standardise(*self._encoder(self.images_in(x)))

    @torch.inference_mode()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        images: torch.Tensor = self._decoder(self._vae.unstandardise(self.latents_in(z)))
        return images

    def _trace(self) -> list[Callable[..., Any]]:
        """The encoder and the decoder traced and frozen, checked against the eager ones."""
        s = self.image_size
        # Two rows, so nothing batch-size specific can be baked in as a constant (checked below at 1 and 3).
        x = self.images_in(torch.rand(2, 3, s, s, generator=torch.Generator().manual_seed(0)))
        z = self.latents_in(torch.randn(2, self.latent_dim, generator=torch.Generator().manual_seed(0)))
        eager: tuple[nn.Module, ...] = (self._vae.encoder, self._vae.decoder)
        # This torch marks TorchScript deprecated in favour of torch.compile, whose compile time (tens of
        # seconds on a CPU) does not fit a service that must be ready in seconds; if a later torch drops
        # it, the except in __init__ serves eagerly. GroupNorm's size check warns about a Python bool that
        # only matters for training with batch size 1.
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            traced = [
                torch.jit.freeze(torch.jit.trace(module, example, check_trace=False))
                for module, example in zip(eager, (x, z), strict=True)
            ]
        self.check_matches_eager(traced, eager)
        return traced

    @torch.inference_mode()
    def check_matches_eager(
        self, traced: Sequence[Callable[..., Any]], eager: Sequence[Callable[..., Any]]
    ) -> None:
        """The traced halves give the eager model's results at other batch sizes too."""
        s = self.image_size
        for n in (1, 3):
            x = self.images_in(torch.rand(n, 3, s, s, generator=torch.Generator().manual_seed(n)))
            z = self.latents_in(torch.randn(n, self.latent_dim, generator=torch.Generator().manual_seed(n)))
            pairs = zip(traced, eager, (x, z), strict=True)
            for fast, reference, example in pairs:
                got, want = fast(example), reference(example)
                for g, w in zip(_flat(got), _flat(want), strict=True):
                    if g.shape != w.shape or not torch.allclose(g, w, rtol=1e-4, atol=1e-5):
                        raise RuntimeError(f"traced model differs from the eager one at batch size {n}")


def _flat(out: Any) -> list[torch.Tensor]:
    return list(out) if isinstance(out, tuple) else [out]
