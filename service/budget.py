"""A memory budget shared by the decode threads.

An upload's bytes say little about what decoding it costs: a 10 MB PNG of a flat colour can be
40 M pixels, about a gigabyte while it decodes. With several decode threads, a few such uploads at once
would exceed a container's memory limit and the kernel would kill the process with every request in it.
Each decode therefore holds its estimated peak (`carvae.preprocess.decode_footprint`, from the header)
against this budget and waits while the others' holdings leave no room; one that is larger than the
whole budget runs alone. Ordinary photos hold a few megabytes and never wait.

Serialising is not enough on glibc: memory a thread freed stays in that thread's malloc arena, so a big
decode in each decode thread in turn still adds up (measured 2026-11-30, three flat 36 M-pixel PNGs one
after another in three threads: 1.6 GB resident, 0.8 GB for one). A large holding is therefore given
back to the system (`malloc_trim`) before the budget is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

TRIM_ABOVE_BYTES = 32 * 2**20  # below this, what an arena keeps is not worth a trim's few milliseconds


def _malloc_trim() -> Callable[[], object]:
    """glibc's malloc_trim(0), or a no-op where there is none (musl, macOS)."""
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0)


release_free_memory = _malloc_trim()


class MemoryBudget:
    def __init__(self, limit_bytes: int) -> None:
        self.limit = limit_bytes
        self.held = 0
        self._changed = threading.Condition()

    @contextmanager
    def hold(self, nbytes: int) -> Iterator[None]:
        """Block until `nbytes` (at most the whole budget) fit beside what others hold; hold it inside."""
        n = max(0, min(nbytes, self.limit))
        with self._changed:
            self._changed.wait_for(lambda: self.held + n <= self.limit)
            self.held += n
        try:
            yield
        finally:
            if nbytes > TRIM_ABOVE_BYTES:
                release_free_memory()
            with self._changed:
                self.held -= n
                self._changed.notify_all()
