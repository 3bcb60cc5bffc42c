"""Process-group plumbing for `torchrun`, and CPU thread defaults.

A single process is a world of size 1, so the training loop calls the same helpers either way and never
branches on "distributed or not" beyond what is here.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, TypeVar, cast

import torch
import torch.distributed as dist

from carvae.device import available_cores, pick_device

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def setup(device_spec: str) -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1): NCCL on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    device = pick_device(device_spec)
    if world > 1:
        if device.type == "cuda":
            # One GPU per process: the local rank picks it, whatever index the user typed.
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world, local_rank, local_world, device)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """End the process with `code`; a torchrun worker (WORLD_SIZE > 1) skips the interpreter's finalization.

    DistributedDataParallel keeps gloo's process group, and with it its worker threads, alive past
    destroy_process_group (torch 2.13). The final barrier's work holds the broadcasts queued before it,
    whose tensors Python has already let go of, and a worker frees it after the barrier returns: that needs
    the GIL. When a busy machine delays that worker until the interpreter is finalizing, CPython ends the
    thread inside a C++ destructor and the rank aborts ("terminate called without an active exception"),
    so torchrun reports a finished run as failed. Without finalization the worker never meets a dying
    interpreter. Logs and output are flushed first; nothing else the trainer needs runs at exit."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        sys.exit(code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all processes (in place, returned for chaining); a no-op in a single process.
    gloo only reduces CPU tensors and NCCL only CUDA ones, so the tensor is moved to the backend's device."""
    if not (dist.is_available() and dist.is_initialized()):
        return t
    backend_device = (
        torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    )
    work = t.to(backend_device) if backend_device is not None else t.cpu()
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    t.copy_(work.to(t.device))
    return t


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def from_main(value: T) -> T:
    """Rank 0's value on every rank (the value itself in a single process): for decisions that every
    rank must take the same way, such as how many epochs are left, which each would otherwise make from
    its own clock."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return cast(T, box[0])


def broadcast_error(message: str | None) -> str | None:
    """Rank 0's error (or None) reaches every rank, so all of them stop together instead of the others
    waiting forever in the next collective."""
    return from_main(message)


def physical_cores() -> int:
    """Physical cores this process may run on, within its container's CPU quota: hyper-threads share one
    core's FPU and only add contention for conv kernels. Falls back to the logical count where
    /proc/cpuinfo is not there."""
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return available_cores()
    cores: set[tuple[str, str]] = set()
    phys = core = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            phys = value.strip()
        elif key == "core id":
            core = value.strip()
            cores.add((phys, core))
    threads_per_core = max(1, (os.cpu_count() or 1) // max(1, len(cores))) if cores else 1
    return max(1, min(logical // threads_per_core, available_cores()))


def default_threads(local_world_size: int = 1) -> int:
    """Threads per process: the physical cores shared out between the processes on this machine."""
    return max(1, physical_cores() // max(1, local_world_size))


PRECISIONS = ("auto", "fp32", "bf16")


def use_bf16(precision: str, device: torch.device) -> bool:
    """Whether the forward pass runs under bf16 autocast. `auto` takes it only where the hardware does bf16
    natively; emulated bf16 on an older CPU is slower than fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def describe_device(device: torch.device, amp: bool) -> str:
    """e.g. "cpu (2 threads, bf16 autocast, channels_last)" or "cuda:0 (NVIDIA H100, bf16 autocast)"."""
    if device.type == "cuda":
        precision = "bf16 autocast" if amp else "fp32"
        return f"{device} ({torch.cuda.get_device_name(device)}, {precision}, channels_last)"
    if device.type == "cpu":
        n = torch.get_num_threads()
        return f"cpu ({n} thread{'s' if n != 1 else ''}, {'bf16 autocast' if amp else 'fp32'}, channels_last)"
    return str(device)
