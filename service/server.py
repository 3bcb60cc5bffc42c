"""uvicorn's server with a readiness drain before its graceful stop.

Behind a load balancer or in Kubernetes, a server that closes its port the moment SIGTERM arrives races
the balancer's next probe: requests routed to it in between are refused. So the first SIGTERM/SIGINT
only marks the app not ready (/readyz 503, `carvae_ready` 0) and keeps serving for `delay_s`; then uvicorn
stops as usual (closes the port, finishes accepted requests, runs the lifespan shutdown). A second signal
during the delay starts that stop at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from types import FrameType

import uvicorn

log = logging.getLogger("carvae.service")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, begin_drain: Callable[[], None], delay_s: float) -> None:
        super().__init__(config)
        self._begin_drain = begin_drain
        self._delay_s = delay_s
        self._draining_since: float | None = None
        self._reported = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler interrupts the event loop thread anywhere, even inside a metric's lock: only
        # note the time here; on_tick (on the loop, within 0.1 s) does the rest.
        # Not started yet (loading, warming up): nobody routes traffic here, so stop without a delay.
        if self._draining_since is None and self._delay_s > 0 and self.started:
            self._draining_since = time.monotonic()
            self._captured_signals.append(sig)  # re-raised after the stop, like uvicorn's own
            return
        if self._draining_since is None:
            self._draining_since = time.monotonic()
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self._draining_since is not None:
            if not self._reported:
                self._reported = True
                self._begin_drain()
                if self._delay_s > 0:
                    log.info("draining: /readyz answers 503, still serving for %g s", self._delay_s)
            if time.monotonic() - self._draining_since >= self._delay_s:
                self.should_exit = True
        return await super().on_tick(counter)
