"""carvae.device: the device picker and the CPU count that trainer and service size their threads by."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import carvae.device
from carvae.device import DeviceError, available_cores, cpu_quota, pick_device


def _cgroup_v2(tmp_path: Path, cpu_max: str, own: str = "/") -> tuple[Path, Path]:
    directory = tmp_path / own.strip("/")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "cpu.max").write_text(cpu_max + "\n")
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text(f"0::{own}\n")
    return tmp_path, proc


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [("200000 100000", 2.0), ("150000 100000", 1.5), ("50000 100000", 0.5), ("max 100000", None)],
)
def test_cgroup_v2_quota(tmp_path: Path, cpu_max: str, expected: float | None) -> None:
    assert cpu_quota(*_cgroup_v2(tmp_path, cpu_max)) == expected


def test_cgroup_v2_quota_is_read_from_the_process_own_cgroup(tmp_path: Path) -> None:
    root, proc = _cgroup_v2(tmp_path, "300000 100000", own="/system.slice/carvae.service")
    (root / "cpu.max").write_text("max 100000\n")  # the root's: not this process's limit
    assert cpu_quota(root, proc) == 3.0


def test_cgroup_v1_quota_and_no_limit(tmp_path: Path) -> None:
    cpu = tmp_path / "cpu"
    cpu.mkdir()
    (cpu / "cpu.cfs_period_us").write_text("100000\n")
    (cpu / "cpu.cfs_quota_us").write_text("400000\n")
    missing = tmp_path / "no-proc"
    assert cpu_quota(tmp_path, missing) == 4.0
    (cpu / "cpu.cfs_quota_us").write_text("-1\n")  # v1's "unlimited"
    assert cpu_quota(tmp_path, missing) is None
    assert cpu_quota(tmp_path / "nothing-here", missing) is None
    (cpu / "cpu.cfs_quota_us").write_text("garbage\n")
    assert cpu_quota(tmp_path, missing) is None


def test_available_cores_is_capped_by_the_quota(monkeypatch: pytest.MonkeyPatch) -> None:
    affinity = len(os.sched_getaffinity(0))
    monkeypatch.setattr(carvae.device, "cpu_quota", lambda: None)
    assert available_cores() == affinity
    monkeypatch.setattr(carvae.device, "cpu_quota", lambda: 1.7)  # rounded down: never over the quota
    assert available_cores() == 1
    monkeypatch.setattr(carvae.device, "cpu_quota", lambda: 0.25)  # still one thread
    assert available_cores() == 1
    monkeypatch.setattr(carvae.device, "cpu_quota", lambda: 1000.0)  # the affinity mask is the other cap
    assert available_cores() == affinity


def test_service_and_trainer_threads_follow_the_quota(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.config import Settings
    from trainer.distributed import default_threads

    monkeypatch.setattr(carvae.device, "cpu_quota", lambda: 1.0)
    settings = Settings(CHECKPOINT=Path("x"))
    assert settings.model_workers("cpu") == 1
    assert settings.torch_threads(1) == 1
    assert settings.decode_workers == 2  # cores + 1, at least 2
    assert default_threads() == 1


@pytest.mark.parametrize(("threads", "said"), [(1, "cpu (1 thread, fp32,"), (2, "cpu (2 threads, fp32,")])
def test_the_trainers_device_line_counts_threads_in_words(
    monkeypatch: pytest.MonkeyPatch, threads: int, said: str
) -> None:
    from trainer.distributed import describe_device

    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    assert describe_device(torch.device("cpu"), amp=False).startswith(said)


def test_pick_device() -> None:
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device(" CPU ") == torch.device("cpu")
    assert pick_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(DeviceError, match="unknown device"):
        pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="CUDA is not available"):
            pick_device("cuda:0")
