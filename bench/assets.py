"""What every benchmark round sends and serves: a 64×64 latent-128 checkpoint and a real car JPEG.

Speed does not depend on the weights, so without a trained `runs/default/model.safetensors` an untrained
default `VAE(VAEConfig())` is saved instead. The photo is a real Stanford Cars image from `../shared/`
upscaled to a few hundred pixels (what a user uploads), or a synthetic car when that folder is absent.
"""

from __future__ import annotations

import io
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAINED = ROOT / "runs" / "default" / "model.safetensors"
CACHE = ROOT / "bench" / ".cache"
PHOTOS = ROOT.parent / "shared" / "datasets" / "stanford-cars-dev" / "images"
PHOTO_SIDE = 400  # longer side of the uploaded photo, px
JPEG_QUALITY = 90


def checkpoint(quick: bool = False) -> tuple[Path, str]:
    """(path, description). `quick` uses a tiny model so a smoke run needs no real compute."""
    if TRAINED.is_file() and not quick:
        return TRAINED, "runs/default (trained)"
    import torch

    from carvae.checkpoint import save_checkpoint
    from carvae.model import VAE, VAEConfig
    from carvae.preprocess import PreprocessPolicy

    config = VAEConfig(image_size=32, latent_dim=8, channels=(8, 16, 16)) if quick else VAEConfig()
    name = "tiny" if quick else "default-untrained"
    path = CACHE / f"{name}-{config.image_size}px-z{config.latent_dim}.safetensors"
    if not path.is_file():
        torch.manual_seed(0)
        save_checkpoint(path, VAE(config), PreprocessPolicy(image_size=config.image_size), {"epochs": 0})
    return (
        path,
        f"untrained VAE {config.image_size}px z{config.latent_dim} (speed does not depend on weights)",
    )


def car_jpeg() -> tuple[bytes, str]:
    """(JPEG bytes, description) of one car photo, longer side PHOTO_SIDE px."""
    from PIL import Image

    photos = sorted(PHOTOS.glob("*.jpg")) if PHOTOS.is_dir() else []
    if photos:
        with Image.open(photos[0]) as src:
            img = src.convert("RGB")
        source = f"Stanford Cars dev photo {photos[0].name} ({img.width}×{img.height})"
    else:
        from carvae.synthetic import render_car

        img = render_car(seed=0, index=0, size=PHOTO_SIDE)
        source = "synthetic car (../shared dataset absent)"
    scale = PHOTO_SIDE / max(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=JPEG_QUALITY)
    data = buf.getvalue()
    return data, f"{source} upscaled to {img.width}×{img.height}, JPEG q{JPEG_QUALITY}, {len(data)} bytes"
