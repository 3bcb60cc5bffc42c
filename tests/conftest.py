"""Shared fixtures: one tiny checkpoint per session, and the environment for CLI subprocesses."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from carvae.checkpoint import save_checkpoint
from carvae.model import VAE, VAEConfig
from carvae.preprocess import PreprocessPolicy

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = VAEConfig(image_size=32, latent_dim=8, channels=(8, 16, 16))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained 32 px, z=8 model saved as a real carvae checkpoint, with a trained one's metadata."""
    torch.manual_seed(0)
    model = VAE(TINY_CONFIG)
    model.get_buffer("log_sigma").fill_(-2.0)
    # A fitted prior (as the trainer writes by default), so every service test goes through it.
    codes = torch.randn(200, TINY_CONFIG.latent_dim) @ torch.randn(
        TINY_CONFIG.latent_dim, TINY_CONFIG.latent_dim
    )
    model.fit_prior(codes + 0.5)
    path = tmp_path_factory.mktemp("tiny-checkpoint") / "model.safetensors"
    training = {
        "complete": True,
        "data": {"source": "synthetic", "count": 16, "skipped": 0, "fingerprint": "test"},
        "split": {"seed": 0, "val_fraction": 0.25, "train": 12, "val": 4, "val_hash": "test"},
        "recipe": "sigma-vae",
        "beta": 1.0,
        "epochs_done": 0,
        "log_sigma": -2.0,
    }
    save_checkpoint(path, model, PreprocessPolicy(image_size=TINY_CONFIG.image_size), training)
    return path


@pytest.fixture(scope="session")
def cli_env() -> dict[str, str]:
    """Environment for `python -m trainer ...` subprocesses: the project importable without installing it,
    one thread each (the suite must stay fast on a 2-core machine)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env
