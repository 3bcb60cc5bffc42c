"""torch's CPU threads in the service: one count for every thread, a larger one for one dedicated thread.

PyTorch parallelises CPU ops with OpenMP (libgomp in the Linux wheels), one team of worker threads per
calling thread that ever ran a parallel region on more than one thread. libgomp lets those workers spin
between regions only while the process has no more OpenMP threads than cores; past that, they sleep
after every region, and each of a pass's ~40 regions first waits for them to wake. Measured here
(2026-11-30, 2 cores, batch 1): a two-thread pass took 13 ms from a thread started after the main thread
had run two-thread ops, and 7.5–8 ms when the main thread never had (one thread: 10 ms). Hence:
`use_threads` before any torch work (loading the checkpoint included), and at most one thread with more.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch


def use_threads(n: int) -> None:
    """torch intra-op threads for the calling thread and every thread that first uses torch after this."""
    torch.set_num_threads(n)


def dedicated_thread(threads: int, name: str, others: int) -> ThreadPoolExecutor:
    """A one-thread executor whose thread computes on `threads` torch threads, while threads that first
    use torch later still get `others`.

    torch.set_num_threads sets the calling thread's count and the default for threads that have not used
    torch yet, which read it once, on first use. So the new thread reads the default first, sets its
    own count, and the default goes back to `others` once it has."""

    def init() -> None:
        torch.get_num_threads()  # this thread's first use: reads the default now, not after our set
        torch.set_num_threads(threads)

    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name, initializer=init)
    executor.submit(int).result()  # start the thread (and run `init`) now, before the default returns
    torch.set_num_threads(others)
    return executor
