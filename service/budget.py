"""A memory budget for decoding uploads.

An upload's bytes say little about what decoding it costs: a 10 MB PNG of a flat colour can be
40 M pixels, about a gigabyte while it decodes. With several decode threads, a few such uploads at once
would exceed a container's memory limit and the kernel would kill the process with every request in it.
So an upload whose decode would take more than `BUDGETED_ABOVE` bytes (estimated from the header:
`carvae.preprocess.prepare(..., max_footprint=)` stops before decoding with FootprintExceeded) holds
that much of the budget while it decodes; one that does not fit waits on the event loop — not in a
decode thread, so ordinary photos (a few megabytes, never budgeted) keep every thread — until the others
leave room, or until its deadline. One larger than the whole budget runs alone.

Serialising is not enough on glibc: memory a thread freed stays in that thread's malloc arena, so a big
decode in each decode thread in turn still adds up (measured 2026-11-30, three flat 36 M-pixel PNGs one
after another in three threads: 1.6 GB resident, 0.8 GB for one). A budgeted decode therefore gives its
memory back to the system (`release_free_memory`) before it gives back its holding.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

BUDGETED_ABOVE = 32 * 2**20  # below: a photo, decoded at once; what an arena keeps is not worth a trim


def _malloc_trim() -> Callable[[], object]:
    """glibc's malloc_trim(0), or a no-op where there is none (musl, macOS)."""
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0)


release_free_memory = _malloc_trim()


class CallerGone(Exception):
    """The caller stopped waiting for room (e.g. its HTTP client disconnected); nothing is held."""


class MemoryBudget:
    def __init__(self, limit_bytes: int) -> None:
        self.limit = limit_bytes
        self.held = 0
        self._changed = asyncio.Condition()

    @asynccontextmanager
    async def hold(
        self, nbytes: int, timeout_s: float, cancel_on: Callable[[], Awaitable[object]] | None = None
    ) -> AsyncIterator[None]:
        """Wait (at most `timeout_s`: TimeoutError) until `nbytes`, at most the whole budget, fit beside
        what others hold; hold them inside. `cancel_on` (optional) makes an awaitable that completes when
        the caller no longer wants the decode (its client went away): the wait then ends with CallerGone,
        rather than the decode taking its turn — up to a second and a gigabyte — for nobody."""
        n = max(0, min(nbytes, self.limit))
        gone = False

        async def watch(until_gone: Callable[[], Awaitable[object]]) -> None:
            nonlocal gone
            await until_gone()
            gone = True
            async with self._changed:
                self._changed.notify_all()

        async with self._changed:
            fits = self.held + n <= self.limit
            # Only a wait is watched: a decode that has room starts at once, as before.
            watcher = asyncio.ensure_future(watch(cancel_on)) if cancel_on and not fits else None
            try:
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: gone or self.held + n <= self.limit), timeout_s
                )
            finally:
                if watcher is not None:
                    watcher.cancel()
            if gone:
                raise CallerGone("the caller went away while waiting for room to decode")
            self.held += n
        try:
            yield
        finally:
            async with self._changed:
                self.held -= n
                self._changed.notify_all()
