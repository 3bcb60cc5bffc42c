"""Device picker shared by trainer and service: `auto|cpu|cuda|cuda:N|mps`, and the CPU count both size
their thread pools by."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

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


CGROUP_ROOT = Path("/sys/fs/cgroup")


def _own_cgroup_v2(root: Path, proc_cgroup: Path) -> Path:
    """This process's cgroup v2 directory (`0::/path` in /proc/self/cgroup; `/` inside a container)."""
    try:
        for line in proc_cgroup.read_text().splitlines():
            if line.startswith("0::"):
                return root / line[3:].strip().lstrip("/")
    except OSError:
        pass
    return root


def cpu_quota(root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """CPUs' worth of time this process's cgroup may use per period (a container's `--cpus`, compose's
    `cpus:`), or None when unlimited. cgroup v2 `cpu.max`, else v1 `cpu.cfs_quota_us` / `cfs_period_us`."""
    try:
        quota, period = (_own_cgroup_v2(root, proc_cgroup) / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def available_cores() -> int:
    """CPUs this process can use: its affinity mask (cpusets), capped by its cgroup's CPU quota. A
    container limited to 2 CPUs on a 32-core host still sees 32 in its affinity mask; thread pools sized
    by that would oversubscribe the quota and be throttled (and OpenMP's spinning workers burn it idle)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no sched_getaffinity
        cores = os.cpu_count() or 1
    quota = cpu_quota()
    if quota is not None:
        cores = min(cores, math.floor(quota))  # rounded down, like Go's automaxprocs: never over the quota
    return max(1, cores)


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)
