"""carvae.checkpoint: round trip, metadata, integrity (bit flip, truncation, junk), atomic writes."""

from __future__ import annotations

import errno
import json
import os
import stat
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import carvae.checkpoint as ckpt_mod
from carvae import __version__
from carvae.checkpoint import CheckpointError, load_checkpoint, read_metadata, save_checkpoint
from carvae.model import ARCHITECTURE, VAE, VAEConfig
from carvae.preprocess import PreprocessPolicy

CFG = VAEConfig(image_size=16, latent_dim=4, channels=(8, 8))
POLICY = PreprocessPolicy(image_size=16, resize="pad")


def _model(seed: int = 0) -> VAE:
    torch.manual_seed(seed)
    model = VAE(CFG)
    model.get_buffer("log_sigma").fill_(-1.5)
    return model


def test_round_trip_restores_weights_config_policy_and_training(tmp_path: Path) -> None:
    model = _model()
    training = {
        "data": {"fingerprint": "abc"},
        "split": {"seed": 3},
        "epochs_done": 7,
        "best_val": {"psnr": 21.5},
    }
    digest = save_checkpoint(tmp_path / "m.safetensors", model, POLICY, training)
    ck = load_checkpoint(tmp_path / "m.safetensors")
    assert ck.config == CFG and ck.policy == POLICY and ck.training == training
    assert ck.content_hash == digest and ck.model_id == f"carvae-16px-z4-{digest[:12]}"
    for name, tensor in model.state_dict().items():
        assert torch.equal(ck.model.state_dict()[name], tensor), name
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(ck.model.reconstruct(x), model.eval().reconstruct(x))
    assert float(ck.model.get_buffer("log_sigma")) == pytest.approx(-1.5)


def test_metadata_is_self_describing(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "m.safetensors", _model(), POLICY, {"recipe": "sigma-vae"})
    meta = read_metadata(tmp_path / "m.safetensors")
    assert meta["format"] == "carvae-checkpoint" and meta["format_version"] == "1"
    assert meta["package_version"] == __version__ and meta["architecture"] == ARCHITECTURE
    assert json.loads(meta["model_config"]) == CFG.to_dict()
    assert json.loads(meta["preprocess"])["resize"] == "pad"
    assert json.loads(meta["training"]) == {"recipe": "sigma-vae"}
    assert len(meta["content_hash"]) == 64


def _data_offset(path: Path) -> int:
    (header_len,) = struct.unpack("<Q", path.read_bytes()[:8])
    return 8 + header_len


def test_a_flipped_bit_in_the_weights_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, _model(), POLICY)
    raw = bytearray(path.read_bytes())
    raw[_data_offset(path) + 101] ^= 0x04
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="integrity"):
        load_checkpoint(path)


@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_a_truncated_file_is_refused(tmp_path: Path, keep: float) -> None:
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, _model(), POLICY)
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"\x00" * 64])
def test_junk_and_missing_files_are_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "m.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.safetensors")


def test_a_foreign_safetensors_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(3)}, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="not a carvae checkpoint"):
        load_checkpoint(path)


def test_a_failure_mid_write_leaves_the_old_file_and_no_temp_file(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "m.safetensors"
    old_hash = save_checkpoint(path, _model(0), POLICY, {"v": "old"})

    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    # fsync runs after the bytes were written to the temp file: the worst moment for a crash.
    monkeypatch.setattr(ckpt_mod.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(path, _model(1), POLICY, {"v": "new"})
    monkeypatch.undo()
    ck = load_checkpoint(path)
    assert ck.content_hash == old_hash and ck.training == {"v": "old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_written_checkpoint_is_readable_by_other_users(tmp_path: Path) -> None:
    # mkstemp creates 0600 files; the service may run as another user than the trainer.
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, _model(), POLICY)
    umask = os.umask(0)
    os.umask(umask)
    mode = stat.S_IMODE(path.stat().st_mode)
    assert mode == 0o666 & ~umask
