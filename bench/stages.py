"""The three stages of /reconstruct as any server would run them, built only from carvae's own code:
decode (upload bytes → the model's uint8 view), forward (a batch of views → reconstructions through μ),
encode (a reconstruction → PNG bytes at the service's default zlib level).

The limit measurement and both peers use exactly these, so every number in the benchmark costs the same
work per image; only the serving around it differs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from carvae.checkpoint import load_checkpoint
from carvae.device import pick_device
from carvae.preprocess import encode_image, prepare, to_tensor, to_uint8

PNG_LEVEL = 1  # the service's default CARVAE_PNG_COMPRESS_LEVEL


class Stages:
    def __init__(self, checkpoint: Path, device: str = "cpu") -> None:
        ck = load_checkpoint(checkpoint, pick_device(device))
        self.model = ck.model.eval().requires_grad_(False)
        self.policy = ck.policy
        self.device = next(self.model.parameters()).device
        self.image_size = ck.config.image_size

    def decode(self, data: bytes) -> np.ndarray:
        return prepare(data, self.policy)

    @torch.inference_mode()
    def forward(self, views: list[np.ndarray]) -> np.ndarray:
        """(S, S, 3) uint8 views → (N, S, S, 3) uint8 reconstructions, one pass, as VAE.reconstruct."""
        mu, _ = self.model.encode(to_tensor(np.stack(views)).to(self.device))
        return to_uint8(self.model.decode(mu))

    def encode(self, image: np.ndarray) -> bytes:
        return encode_image(image, "png", png_compress_level=PNG_LEVEL)
