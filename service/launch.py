"""What a server process does before anything heavy is imported: `python -m service` and the
`carvae-serve` console script both start here.

Kept free of torch and FastAPI imports on purpose: everything in `begin` must be in place before the ~2 s
of importing them (service.__main__ imports them at module level).
"""

from __future__ import annotations

import gc
import os
import signal
import sys

serving = False  # set by service.__main__.main once uvicorn runs; see stop_cleanly


def stop_cleanly(signum: int, frame: object) -> None:
    if serving:  # uvicorn has stopped gracefully and re-raised the signal: a requested stop is a success
        sys.exit(0)
    # Still starting: nothing to finish or flush but the streams. Not sys.exit: unwinding out of a
    # half-done `import torch` can hang the interpreter's shutdown (seen: >10 s in 4 of 6 tries).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def begin() -> None:
    """Only in a process that is about to become the server: a caller importing service.__main__ (tests,
    tools) keeps its own signal handlers and collector."""
    # A stop requested during start-up ends the process at once with status 0. First thing: importing
    # torch takes ~2 s, and Python as a container's PID 1 (no init) ignores a signal it has no handler for.
    # Once serving, uvicorn handles SIGTERM/SIGINT itself (drain, stop accepting, finish accepted
    # requests, run the lifespan shutdown), restores these handlers and re-raises the signal: status 0.
    signal.signal(signal.SIGTERM, stop_cleanly)
    signal.signal(signal.SIGINT, stop_cleanly)
    # No cyclic garbage collection while starting: importing torch and FastAPI and tracing the model
    # create ~2·10^5 long-lived objects, and the collector's passes over them were ~9 % of start-up
    # (0.3 s on a 2-core Zen 1). The lifespan freezes what is loaded and turns it back on (service.main);
    # a start-up that fails ends the process anyway.
    gc.disable()


def serve() -> int:
    """The `carvae-serve` console script: the same start as `python -m service`."""
    begin()
    from service.__main__ import main

    return main()
