"""The three stages of /reconstruct as any server would run them: decode (upload bytes → the model's
uint8 view, `carvae.preprocess.prepare`), forward (a batch of views → reconstructions through μ),
encode (a reconstruction → PNG bytes at the service's default zlib level).

The forward pass is the service's own `service.inference.InferenceModel` (channels_last, traced), so the
limit and both peers run exactly the model code the service runs: every number in the benchmark costs
the same work per image and only the serving around it differs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from carvae.checkpoint import load_checkpoint
from carvae.device import pick_device
from carvae.preprocess import encode_image, prepare, to_tensor, to_uint8
from service.inference import InferenceModel

PNG_LEVEL = 1  # the service's default CARVAE_PNG_COMPRESS_LEVEL


class Stages:
    def __init__(self, checkpoint: Path, device: str = "cpu", torchscript: bool = True) -> None:
        ck = load_checkpoint(checkpoint, pick_device(device))
        self.policy = ck.policy
        self.image_size = ck.config.image_size
        self.model = InferenceModel(ck.model, ck.config, next(ck.model.parameters()).device, torchscript)

    def decode(self, data: bytes) -> np.ndarray:
        return prepare(data, self.policy)

    def forward(self, views: list[np.ndarray]) -> np.ndarray:
        """(S, S, 3) uint8 views → (N, S, S, 3) uint8 reconstructions, one pass, as VAE.reconstruct."""
        images, _ = self.model.reconstruct(to_tensor(np.stack(views)))
        return to_uint8(images)

    def encode(self, image: np.ndarray) -> bytes:
        return encode_image(image, "png", png_compress_level=PNG_LEVEL)
