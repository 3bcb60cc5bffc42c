"""What the machine is and what else is running on it, from /proc (Linux).

`CpuWindow` reads the machine's busy CPU time and a server's process tree CPU time at the start and end
of a measuring window; what is left after the server and the load generator is other load. A round with
more than a small share of a core of other load is marked noisy and not reported as clean.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def describe() -> dict[str, object]:
    """CPU model, core count, OS and Python, without any path or host name."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }


def machine_busy_s() -> float:
    """CPU-seconds all cores have spent busy since boot (everything but idle and iowait)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return 0.0
    values = [int(v) for v in fields]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    # guest time is already counted in user time
    return (sum(values[:8]) - idle) / TICK


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds user+system) of one process, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name may contain spaces and parentheses: fields start after the last ')'
    rest = raw[raw.rindex(")") + 2 :].split()
    return int(rest[1]), (int(rest[11]) + int(rest[12])) / TICK


def tree_cpu_s(root: int) -> float:
    """CPU seconds of `root` and all its living descendants (LitServe runs several processes)."""
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (st := _stat(int(entry.name))) is not None:
            parents[int(entry.name)], cpu[int(entry.name)] = st
    members, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [p for p, pp in parents.items() if pp == parent and p not in members]
        members.update(children)
        frontier.extend(children)
    return sum(cpu.get(p, 0.0) for p in members)


@dataclass
class CpuWindow:
    """Start with `CpuWindow.open(server_pid)`, end with `.close(client_cpu_s)`."""

    server_pid: int
    t0: float
    machine0: float
    server0: float
    elapsed_s: float = 0.0
    machine_s: float = 0.0
    server_s: float = 0.0
    other_s: float = 0.0

    @classmethod
    def open(cls, server_pid: int) -> CpuWindow:
        return cls(server_pid, time.perf_counter(), machine_busy_s(), tree_cpu_s(server_pid))

    def close(self, client_cpu_s: float) -> CpuWindow:
        self.elapsed_s = time.perf_counter() - self.t0
        self.machine_s = machine_busy_s() - self.machine0
        self.server_s = tree_cpu_s(self.server_pid) - self.server0
        self.other_s = max(0.0, self.machine_s - self.server_s - client_cpu_s)
        return self

    @property
    def other_cores(self) -> float:
        """Average cores used by everything except the server and the load generator."""
        return self.other_s / self.elapsed_s if self.elapsed_s else 0.0


def load_average() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return 0.0
