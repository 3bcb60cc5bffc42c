"""torch's CPU threads in the service: one for every thread by default, more only for the model threads.

PyTorch parallelises CPU ops with OpenMP (libgomp in the Linux wheels): every thread that once runs an op
on n > 1 threads keeps a team of n - 1 OpenMP workers for good. libgomp lets those workers spin between
parallel regions only while 1 + all teams' workers <= cores; past that, they sleep after every region and
each of a pass's ~40 regions first waits for them to wake. Measured here (2026-11-30, 2 cores, batch 1):
a two-thread pass took 13 ms from a thread started after the main thread had run two-thread ops, and
7.5–8 ms when it had not (one thread: 10 ms). So every thread computes on one torch thread — loading the
checkpoint, tracing, decoding — except the model threads, which get their count when they start
(`model_threads`), and the service keeps their teams within that budget (`Settings.torch_threads_alone`).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch

# Start-up waits this long at most for a new executor's threads to start.
START_TIMEOUT_S = 30.0
# How long a thread may hold the GIL while another waits for it (Python's default: 5 ms). The event loop
# runs long stretches of Python (HTTP, multipart, FastAPI) and a model or decode thread that needs the
# GIL for a moment, between native calls that release it, waited up to that long while its core idled.
# 2026-11-30 A/B, 5 alternating rounds of 5 s: c=1 105.6 vs 99.4 req/s (ahead in all 5), c=64 252.8 vs
# 240.0 (4 of 5), c=32 234.2 vs 231.4 (within noise).
GIL_SWITCH_INTERVAL_S = 0.001


@contextmanager
def gil_switch_interval(seconds: float = GIL_SWITCH_INTERVAL_S) -> Iterator[None]:
    """sys.setswitchinterval for the served app's lifetime; the previous value afterwards."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(seconds)
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


def use_one_thread() -> None:
    """One torch thread for the calling thread and for every thread that first uses torch after this.
    Call before any torch work."""
    torch.set_num_threads(1)


def _take(threads: int) -> None:
    torch.get_num_threads()  # a thread's first torch call reads the default: make it now, not after ours
    torch.set_num_threads(threads)


def model_threads(count: int, threads: int, name: str) -> ThreadPoolExecutor:
    """An executor of `count` threads that compute on `threads` torch threads each, started now.

    torch.set_num_threads sets the calling thread's count and also the default that threads read on
    their first torch call; so every thread of the executor is started here, and the default goes back
    to one thread afterwards."""
    executor = ThreadPoolExecutor(count, thread_name_prefix=name, initializer=_take, initargs=(threads,))
    # `count` tasks that wait for each other need `count` threads: all of them start (and set their count).
    barrier = threading.Barrier(count)
    for f in [executor.submit(barrier.wait, START_TIMEOUT_S) for _ in range(count)]:
        f.result()
    use_one_thread()
    return executor
