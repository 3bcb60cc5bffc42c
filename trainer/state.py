"""Files a run writes besides the checkpoint: train_state.pt (resume), metrics.jsonl, run.json.

Everything is written whole and atomically (temp file + rename, via carvae.checkpoint.atomic_write_bytes),
so a kill or a full disk leaves the previous version of a file, never half of a new one. A failed write
becomes an `OutputError` with one line saying which file and why.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path
from typing import IO, Any

import torch

from carvae.checkpoint import atomic_write_bytes

STATE_FILE = "train_state.pt"
METRICS_FILE = "metrics.jsonl"
RUN_FILE = "run.json"
CHECKPOINT_FILE = "model.safetensors"
LOCK_FILE = ".lock"


class OutputError(RuntimeError):
    """The run folder cannot be written (read-only, full disk, permissions)."""


class ResumeError(RuntimeError):
    """The run folder holds nothing this trainer can resume from, or it belongs to different data."""


def write_bytes(path: Path, data: bytes) -> None:
    try:
        atomic_write_bytes(path, data)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None


def check_writable(out: Path) -> None:
    """Fail before any work is done when the run folder cannot take files."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create output folder {out}: {e.strerror or e}") from None
    probe = out / ".write-test"
    write_bytes(probe, b"ok")
    probe.unlink(missing_ok=True)
    if not os.access(out, os.W_OK):
        raise OutputError(f"output folder {out} is not writable")


def lock_run(out: Path) -> IO[str] | None:
    """Hold out/.lock for as long as the returned file is open. Two trainers in one run folder (a --resume,
    --overwrite or second fresh run typed while the first still trains) overwrote each other's state,
    checkpoint and metrics epoch by epoch. An flock dies with its process, so a killed run leaves no stale
    lock. None where there is no flock (Windows)."""
    try:
        import fcntl
    except ImportError:
        return None
    path = out / LOCK_FILE
    try:
        f = path.open("a+")
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip()
        f.close()
        who = f"pid {holder}" if holder else "another process"
        msg = f"{out} is in use by another trainer ({who}); wait for it to end or stop it"
        raise OutputError(msg) from None
    except OSError:  # a file system without locks (some network mounts): train unguarded, as before
        f.close()
        return None
    try:
        held = os.fstat(f.fileno()).st_ino == path.stat().st_ino
    except OSError:
        held = False
    if not held:  # locked a file that the previous holder removed on its way out: the folder is taken
        f.close()
        raise OutputError(f"{out} is in use by another trainer; wait for it to end or stop it")
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def unlock_run(lock: IO[str], out: Path) -> None:
    """Let go of the folder lock_run took, removing the file (a run folder holds only the run's files)."""
    # A folder made read-only meanwhile keeps the file; the lock still ends with the file's closing.
    with contextlib.suppress(OSError):
        (out / LOCK_FILE).unlink(missing_ok=True)
    lock.close()


def check_no_run(out: Path) -> None:
    """Refuse a fresh run into a folder holding another run's resume point or model: starting over there
    would destroy it, and a forgotten --resume must not throw away hours of training."""
    held = [name for name in (STATE_FILE, CHECKPOINT_FILE) if (out / name).exists()]
    if held:
        raise ValueError(
            f"{out} already holds a run ({', '.join(held)}); continue or extend it with --resume {out}, "
            "or pass --overwrite to replace it"
        )


def save_state(out: Path, state: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    write_bytes(out / STATE_FILE, buf.getvalue())


def load_state(out: Path) -> dict[str, Any]:
    path = out / STATE_FILE
    if not path.is_file():
        raise ResumeError(f"no {STATE_FILE} in {out}: nothing to resume (no epoch was completed there)")
    try:
        # weights_only: the state holds tensors and plain containers only, never pickled code.
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ResumeError(f"{path} is unreadable ({type(e).__name__}: {e})") from None


def write_metrics(out: Path, rows: list[dict[str, Any]]) -> None:
    write_bytes(out / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in rows).encode())


def read_metrics(out: Path) -> list[dict[str, Any]]:
    path = out / METRICS_FILE
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except ValueError:
                break  # a torn last line from an older, non-atomic writer: everything before it is good
    return rows


def write_json(path: Path, obj: Any) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, default=str) + "\n").encode())


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())
