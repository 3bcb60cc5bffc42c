"""Device picker shared by trainer and service: `auto|cpu|cuda|cuda:N|mps`."""

from __future__ import annotations

import re

import torch

DEVICE_PATTERN = r"^(auto|cpu|mps|cuda(:\d+)?)$"


class DeviceError(RuntimeError):
    pass


def pick_device(spec: str = "auto") -> torch.device:
    """`auto` takes CUDA if available, then MPS, else CPU. An explicit device that is not there is an
    error, never a silent fallback: a user who asked for a GPU must know they are not getting one."""
    spec = spec.strip().lower()
    if not re.match(DEVICE_PATTERN, spec):
        raise DeviceError(f"unknown device {spec!r}; use auto, cpu, cuda, cuda:N or mps")
    mps = getattr(torch.backends, "mps", None)
    mps_ok = bool(mps and mps.is_available())
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if mps_ok else torch.device("cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"device {spec!r} requested but CUDA is not available on this machine")
        idx = int(spec.split(":")[1]) if ":" in spec else 0
        if idx >= torch.cuda.device_count():
            raise DeviceError(
                f"device {spec!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
        return torch.device(spec)
    if spec == "mps" and not mps_ok:
        raise DeviceError("device 'mps' requested but MPS is not available on this machine")
    return torch.device(spec)


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)
