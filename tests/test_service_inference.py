"""How the service runs the model: the traced channels_last entry points (service.inference), several
model workers in the batcher, and the defaults that pick workers and torch threads."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from carvae.model import VAE, VAEConfig
from service.batcher import Batcher, BatchFailed
from service.config import Settings, available_cores
from service.inference import InferenceModel

CONFIG = VAEConfig(image_size=32, latent_dim=8, channels=(8, 16, 16))


@pytest.fixture
def vae() -> VAE:
    torch.manual_seed(0)
    return VAE(CONFIG).eval()


@pytest.mark.parametrize("torchscript", [True, False])
@pytest.mark.parametrize("batch", [1, 5])
def test_entry_points_give_the_eager_models_results(vae: VAE, torchscript: bool, batch: int) -> None:
    # A fitted prior, as every trained checkpoint has: the entry points change coordinates around the
    # traced encoder and decoder, which the identity prior of a fresh model would not show.
    g = torch.Generator().manual_seed(0)
    vae.fit_prior(torch.randn(500, 8, generator=g) @ torch.randn(8, 8, generator=g) + 1.5)
    x = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
    z = torch.randn(batch, 8, generator=torch.Generator().manual_seed(batch))
    with torch.inference_mode():
        want_images = vae.reconstruct(x)
        want_mu, want_logvar = vae.encode(x)
        want_decoded = vae.decode(z)
    model = InferenceModel(vae, CONFIG, torch.device("cpu"), torchscript=torchscript)
    assert model.traced is torchscript
    images, mu = model.reconstruct(x)
    torch.testing.assert_close(images, want_images, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mu, want_mu, rtol=1e-4, atol=1e-5)
    mu2, logvar = model.encode(x)
    torch.testing.assert_close(mu2, want_mu, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logvar, want_logvar, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.decode(z), want_decoded, rtol=1e-4, atol=1e-5)


def test_reconstruct_goes_through_the_mean_not_a_sample(vae: VAE) -> None:
    model = InferenceModel(vae, CONFIG, torch.device("cpu"))
    x = torch.rand(3, 3, 32, 32)
    a, _ = model.reconstruct(x)
    b, _ = model.reconstruct(x)
    assert torch.equal(a, b)  # nothing random was traced in


def test_a_model_that_cannot_be_traced_is_served_eagerly(vae: VAE, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("tracing is not supported here")

    monkeypatch.setattr(torch.jit, "trace", refuse)
    model = InferenceModel(vae, CONFIG, torch.device("cpu"))
    assert not model.traced
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(model.reconstruct(x)[0], vae.reconstruct(x))


def test_two_workers_compute_two_batches_at_once() -> None:
    """Each of the first two jobs runs alone (nothing else queued) and waits until the other batch is in
    its handler too: with one worker this would never happen."""
    both_inside = threading.Barrier(2, timeout=1)

    def handler(payloads: list[int]) -> list[int]:
        both_inside.wait()
        return [p + 1 for p in payloads]

    async def scenario(workers: int) -> list[int]:
        b = Batcher({"x": handler}, workers=workers, max_wait_s=0.0, default_timeout_s=3)
        await b.start()
        try:
            first = asyncio.ensure_future(b.submit("x", 1))
            await asyncio.sleep(0.05)  # the first job is in its handler before the second is queued
            return list(await asyncio.gather(first, b.submit("x", 2)))
        finally:
            await b.stop(drain_timeout_s=1)

    assert asyncio.run(scenario(2)) == [2, 3]
    with pytest.raises(BatchFailed):  # one worker: the first batch waits alone until the barrier breaks
        asyncio.run(scenario(1))


def test_stop_drains_every_workers_batch() -> None:
    gate = threading.Event()

    def handler(payloads: list[int]) -> list[int]:
        gate.wait(5)
        return payloads

    async def scenario() -> list[int]:
        b = Batcher({"x": handler}, workers=3, max_batch_size=1, max_wait_s=0.0)
        await b.start()
        jobs = [asyncio.ensure_future(b.submit("x", i)) for i in range(5)]
        await asyncio.sleep(0.05)
        stopping = asyncio.ensure_future(b.stop(drain_timeout_s=5))
        await asyncio.sleep(0.05)
        gate.set()
        await stopping
        return list(await asyncio.gather(*jobs))

    assert asyncio.run(scenario()) == [0, 1, 2, 3, 4]


def test_workers_and_threads_defaults_share_the_cores() -> None:
    cores = available_cores()
    s = Settings(MODEL_WORKERS=None, TORCH_THREADS=None)
    assert s.model_workers("cuda") == 1
    cpu_workers = s.model_workers("cpu")
    assert cpu_workers == min(2, cores)
    assert s.torch_threads(cpu_workers) == max(1, cores // cpu_workers)
    explicit = Settings(MODEL_WORKERS=3, TORCH_THREADS=5)
    assert explicit.model_workers("cpu") == 3 and explicit.torch_threads(3) == 5

    # A batch computed alone gets what keeps libgomp's workers spinning (service.threads): 1 + every
    # team's workers <= cores. All cores when the model threads use one thread each; a GPU pass gets the
    # usual share; an explicit value wins.
    def spinning(workers: int, threads: int, alone: int) -> bool:
        return 1 + workers * (threads - 1) + (alone - 1) <= cores

    alone = s.torch_threads_alone("cpu", cpu_workers)
    per_worker = s.torch_threads(cpu_workers)
    assert spinning(cpu_workers, per_worker, alone) and not spinning(cpu_workers, per_worker, alone + 1)
    if per_worker == 1:
        assert alone == cores
    assert Settings(MODEL_WORKERS=2, TORCH_THREADS=1).torch_threads_alone("cpu", 2) == cores
    assert Settings(MODEL_WORKERS=1, TORCH_THREADS=cores).torch_threads_alone("cpu", 1) == 1  # none left
    assert s.torch_threads_alone("cuda", 1) == s.torch_threads(1)
    assert Settings(TORCH_THREADS_ALONE=3).torch_threads_alone("cpu", 2) == 3


def test_startup_freezes_the_gc_and_stop_unfreezes_it(tmp_path: Path) -> None:
    import gc

    from fastapi.testclient import TestClient
    from service_fixtures import make_settings

    from carvae.checkpoint import save_checkpoint
    from carvae.preprocess import PreprocessPolicy
    from service.main import create_app

    torch.manual_seed(0)
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, VAE(CONFIG), PreprocessPolicy(image_size=CONFIG.image_size))
    gc.unfreeze()
    with TestClient(create_app(make_settings(path))) as client:
        assert client.get("/readyz").status_code == 200
        assert gc.get_freeze_count() > 0  # start-up's objects are out of the collector's way
    assert gc.get_freeze_count() == 0
