"""Checkpoint I/O: one self-describing `model.safetensors`.

Weights are stored as safetensors (never pickle); everything needed to rebuild and use the model lives in
the safetensors metadata as JSON strings: the model config, the preprocessing policy, training facts and
metrics, the package version and a SHA-256 content hash of the tensors, verified on load so a bit-flipped
or truncated file is refused with a clear message.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from carvae import __version__
from carvae.model import ARCHITECTURE, PRIOR_BUFFERS, VAE, VAEConfig
from carvae.preprocess import PreprocessPolicy

FORMAT = "carvae-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and the problem in one line."""


@dataclass
class Checkpoint:
    model: VAE
    config: VAEConfig
    policy: PreprocessPolicy
    content_hash: str
    training: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def model_id(self) -> str:
        return f"carvae-{self.config.image_size}px-z{self.config.latent_dim}-{self.content_hash[:12]}"

    def run_status(self) -> dict[str, Any]:
        """How far the run that wrote this file got. The trainer saves the best epoch so far as it goes
        (`complete` false: still training, or killed before its last planned epoch) and once more at the
        end (`complete` true: the learning rate annealed to the end of the plan, the sampling prior
        fitted). A run that `--max-minutes` ended is complete: the budget sets its plan. None where a file
        does not record it."""
        schedule = self.training.get("lr_schedule") or {}
        complete = self.training.get("complete")
        return {
            "complete": complete if isinstance(complete, bool) else None,
            "epochs_done": self.training.get("epochs_done"),  # of the weights in the file
            "epochs_planned": schedule.get("planned_epochs", self.training.get("epochs_requested")),
            "best_epoch": self.training.get("best_epoch"),
            # Partial checkpoints of earlier versions said true here, whatever was going to stop them.
            "stopped_by_budget": self.training.get("stopped_by_budget") if complete is True else None,
        }


def content_hash(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        # reshape(-1): a 0-d tensor (e.g. log_sigma) cannot be viewed as bytes; same bytes for the others.
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once at import; os.umask can only be read by setting it


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename over the target: a crash or a full disk
    leaves either the old file or the new one, never a half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file 0600; give it the mode a plain open() would, so another user (the
        # service's container user) can read a checkpoint the trainer wrote.
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_checkpoint(
    path: str | os.PathLike[str], model: VAE, policy: PreprocessPolicy, training: dict[str, Any] | None = None
) -> str:
    """Atomically write the model + its description. Returns the content hash."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    digest = content_hash(tensors)
    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "package_version": __version__,
        "architecture": model.cfg.architecture,
        "model_config": json.dumps(model.cfg.to_dict()),
        "preprocess": json.dumps(policy.to_dict()),
        "training": json.dumps(training or {}, default=str),
        "content_hash": digest,
    }
    atomic_write_bytes(path, st_save(tensors, metadata=meta))
    return digest


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """Only the header: cheap, used to decide whether a checkpoint matches a configuration."""
    path = Path(path)
    try:
        if path.is_dir():
            raise CheckpointError(
                f"checkpoint {path} is a directory, not a model.safetensors file (a container bind mount of "
                "a host file that does not exist creates an empty directory in its place)"
            )
        if not path.is_file():
            raise CheckpointError(f"checkpoint {path} does not exist")
        # safetensors reports a file it may not open as "No such file or directory": ask first.
        path.open("rb").close()
    except PermissionError:
        raise CheckpointError(
            f"checkpoint {path} is not readable by this process's user (uid {os.getuid()}): permission "
            "denied; make the file readable and its folders searchable for that user (chmod a+r, a+x)"
        ) from None
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:
        raise CheckpointError(
            f"checkpoint {path} is not a readable safetensors file ({_one_line(e)})"
        ) from None


def _one_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _state_mismatch(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> str:
    """What differs between the tensors the config's model has and those in the file, in one line
    (load_state_dict's own message lists every key over many lines); empty when they fit."""

    def some(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (", …" if len(keys) > 3 else "")

    def dims(t: torch.Tensor) -> str:
        return "×".join(map(str, t.shape)) or "scalar"

    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    reshaped = sorted(k for k in expected.keys() & found.keys() if expected[k].shape != found[k].shape)
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensor(s) missing: {some(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected: {some(unexpected)}")
    if reshaped:
        k = reshaped[0]
        parts.append(
            f"{len(reshaped)} of another shape, e.g. {k}: {dims(found[k])} in the file, "
            f"{dims(expected[k])} for the config"
        )
    return "; ".join(parts)


def load_checkpoint(
    path: str | os.PathLike[str], device: torch.device | str = "cpu", verify: bool = True
) -> Checkpoint:
    path = Path(path)
    meta = read_metadata(path)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a carvae checkpoint (no '{FORMAT}' metadata)")
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise CheckpointError(
            f"checkpoint {path} has format version {meta.get('format_version')!r}; "
            f"this carvae reads version {FORMAT_VERSION}"
        )
    if meta.get("architecture") != ARCHITECTURE:
        raise CheckpointError(
            f"checkpoint {path} is for architecture {meta.get('architecture')!r}; "
            f"this carvae builds {ARCHITECTURE!r}"
        )
    try:
        parsed = {k: json.loads(meta[k]) for k in ("model_config", "preprocess")}
        parsed["training"] = json.loads(meta.get("training", "{}"))
        for key, value in parsed.items():
            if not isinstance(value, dict):
                raise TypeError(f"{key} must be a JSON object, got {type(value).__name__}")
        cfg = VAEConfig.from_dict(parsed["model_config"])
        policy = PreprocessPolicy.from_dict(parsed["preprocess"])
        training = parsed["training"]
        if policy.image_size != cfg.image_size:
            # Inputs of another size than the model's would fail every request, not the start-up.
            raise ValueError(
                f"preprocess image_size {policy.image_size} != model_config image_size {cfg.image_size}"
            )
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path} has invalid metadata ({_one_line(e)})") from None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({_one_line(e)})") from None
    digest = content_hash(tensors)
    if verify and digest != meta.get("content_hash"):
        raise CheckpointError(
            f"checkpoint {path} failed its integrity check (content hash {digest[:12]} != recorded "
            f"{str(meta.get('content_hash'))[:12]}): the file is corrupt"
        )
    # The config comes from the file's metadata, which the content hash does not cover: a config far larger
    # than the weights (a tampered or foreign file) must be refused before a model of its size is allocated.
    with torch.device("meta"):
        shapes = VAE(cfg).state_dict()
    # Checkpoints written before the fitted prior existed sample from N(0, I): the defaults, filled in below.
    mismatch = _state_mismatch(shapes, {**{k: shapes[k] for k in PRIOR_BUFFERS}, **tensors})
    if mismatch:
        raise CheckpointError(f"checkpoint {path} does not match its model config ({mismatch})")
    model = VAE(cfg)
    defaults = model.state_dict()
    tensors.update({k: defaults[k] for k in PRIOR_BUFFERS if k not in tensors})
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path} does not match its model config ({_one_line(e)})") from None
    model.to(device).eval()
    return Checkpoint(
        model=model, config=cfg, policy=policy, content_hash=digest, training=training, metadata=meta
    )
