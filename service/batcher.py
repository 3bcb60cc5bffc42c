"""Dynamic batching: many concurrent requests, one forward pass per batch.

Knows nothing about HTTP or about the model. Callers `submit(op, payload)`; asyncio worker tasks take
queued jobs, group them by `op` and call that op's handler once per group with the list of payloads, in
a dedicated model thread per worker so the event loop never runs model code. A handler returns one
result per payload, in order, and must be safe to call from several model threads at once.

Policy:
- `workers` batches may be in flight at once, each in its own model thread (on a CPU, two single-threaded
  passes side by side use two cores better than one pass on two threads); one worker at a time gathers
  the next batch while the others compute.
- A batch holds at most `max_batch_size` rows (a job may carry several rows, e.g. a 16-image sample; a
  job larger than the limit runs alone rather than being split).
- The worker waits at most `max_wait_s` after the FIRST job of a batch was queued for more to arrive, and
  not at all if nothing else is queued when it picks that job: an idle server answers a lone request at
  once, a busy one fills batches with whatever queued up during the previous forward pass.
- A batch that starts while no other worker holds jobs and nothing is queued is computed *alone*: on
  `alone_executor` when one is given (the service gives that thread more torch threads: every core on a
  small CPU), and the other workers' batches wait for it to finish instead of sharing the cores with it.
  An idle server's lone request gets the whole machine; under load batches rarely start alone, and the
  passes run side by side as before.
- The queue is bounded: a full queue refuses at once (`Overloaded`) instead of building latency.
- Every job has a deadline: an expired job is answered `DeadlineExceeded` and never reaches the model; a
  job whose caller went away (cancelled future) is skipped.
- An exception in a handler fails only the jobs of that group (`BatchFailed`); the worker carries on.
- A job may carry `then`, a continuation run in the same model thread on that job's result right after
  the batch (the service encodes its response there): the result reaches the event loop finished, with
  no further thread round trip, and the queue fills while the worker encodes, so batches grow. An
  exception in `then` fails that job alone, with the exception itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

log = logging.getLogger("carvae.batcher")

Handler = Callable[[list[Any]], Sequence[Any]]
T = TypeVar("T")


class Overloaded(RuntimeError):
    """The queue is full (or the batcher is stopping): try again later."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(TimeoutError):
    """The job's deadline passed before its result was ready."""


class Abandoned(RuntimeError):
    """The caller stopped waiting (e.g. the HTTP client disconnected); the job was withdrawn."""


class BatchFailed(RuntimeError):
    """The handler raised for the batch this job was in."""

    def __init__(self, op: str, cause: BaseException) -> None:
        super().__init__(f"{op} batch failed: {type(cause).__name__}: {cause}")
        self.op = op
        self.cause = cause


class BatchObserver(Protocol):
    """What the batcher reports (implemented by service.metrics; a no-op by default)."""

    def queue_depth(self, depth: int) -> None: ...

    def batch(
        self, op: str, rows: int, batch_wait_s: float, queue_waits_s: Sequence[float], compute_s: float
    ) -> None: ...

    def rejected(self, reason: str) -> None: ...

    def timed_out(self, stage: str) -> None: ...


class _NullObserver:
    def queue_depth(self, depth: int) -> None:
        pass

    def batch(
        self, op: str, rows: int, batch_wait_s: float, queue_waits_s: Sequence[float], compute_s: float
    ) -> None:
        pass

    def rejected(self, reason: str) -> None:
        pass

    def timed_out(self, stage: str) -> None:
        pass


@dataclass(eq=False)
class _Job:
    op: str
    payload: Any
    rows: int
    future: asyncio.Future[Any]
    enqueued: float  # loop.time()
    deadline: float
    tag: str | None = None
    then: Callable[[Any], Any] | None = None
    # The waits the metrics report, on perf_counter: uvloop's loop.time() counts whole milliseconds (and
    # is read once per loop iteration), so sub-millisecond waits read 0 or 1 ms and the histograms'
    # 0.1 and 0.5 ms buckets meant nothing.
    queued_at: float = field(default_factory=time.perf_counter)


@dataclass
class _Stats:
    """Plain counters for tests and logs (the Prometheus side goes through the observer)."""

    batches: int = 0
    jobs: int = 0
    max_rows: int = 0
    expired: int = 0
    skipped: int = 0
    failed_batches: int = 0
    rows_per_batch: list[int] = field(default_factory=list)


@dataclass
class _Failed:
    error: BaseException


class Batcher:
    def __init__(
        self,
        handlers: Mapping[str, Handler],
        *,
        max_batch_size: int = 32,
        max_wait_s: float = 0.005,
        queue_size: int = 256,
        default_timeout_s: float = 10.0,
        observer: BatchObserver | None = None,
        workers: int = 1,
        executor: Executor | None = None,
        alone_executor: Executor | None = None,
    ) -> None:
        if max_batch_size < 1 or queue_size < 1 or max_wait_s < 0 or workers < 1:
            raise ValueError("max_batch_size, queue_size and workers must be >= 1 and max_wait_s >= 0")
        self.handlers = dict(handlers)
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.queue_size = queue_size
        self.default_timeout_s = default_timeout_s
        self.observer: BatchObserver = observer or _NullObserver()
        self.stats = _Stats()
        self._pending: deque[_Job] = deque()
        self._wakeup = asyncio.Event()
        self.workers = workers
        self._tasks: list[asyncio.Task[None]] = []
        self._collecting = asyncio.Lock()
        self._holding = 0  # workers holding jobs taken off the queue (gathering or computing them)
        self._closed = False
        # One thread per worker, off the event loop; torch's intra-op threads parallelise inside a pass.
        # Given executors (at least `workers` threads; one for `alone_executor`) are owned from here on.
        self._executor = executor or ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="carvae-model"
        )
        self._alone_executor = alone_executor
        # Set while no batch computes alone.
        self._alone_idle = asyncio.Event()
        self._alone_idle.set()

    # -- lifecycle ----------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._tasks:
            return
        self._closed = False
        self._tasks = [
            asyncio.create_task(self._run(), name=f"carvae-batcher-{i}") for i in range(self.workers)
        ]

    async def stop(self, drain_timeout_s: float = 10.0) -> None:
        """Refuse new jobs, let queued and running ones finish (up to the timeout), then stop."""
        self._closed = True
        loop = asyncio.get_running_loop()
        end = loop.time() + drain_timeout_s
        while (self._pending or self._holding) and loop.time() < end and self.worker_alive:
            await asyncio.sleep(0.01)
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        while self._pending:
            job = self._pending.popleft()
            if not job.future.done():
                self.observer.rejected("stopping")
                job.future.set_exception(Overloaded("the service is shutting down"))
        self.observer.queue_depth(0)
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._alone_executor is not None:
            self._alone_executor.shutdown(wait=False, cancel_futures=True)

    @property
    def worker_alive(self) -> bool:
        return bool(self._tasks) and not any(t.done() for t in self._tasks)

    def depth(self) -> int:
        return len(self._pending)

    @property
    def has_alone_executor(self) -> bool:
        return self._alone_executor is not None

    async def run_in_worker(self, fn: Callable[..., T], *args: Any, alone: bool = False) -> T:
        """Run `fn` in a model thread (with `alone`, in the alone executor's), outside any batch (warm-up)."""
        executor = self._alone_executor if alone and self._alone_executor is not None else self._executor
        return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)

    # -- submitting ---------------------------------------------------------------------------------
    def _enqueue(
        self,
        op: str,
        payload: Any,
        rows: int,
        timeout_s: float | None,
        tag: str | None,
        then: Callable[[Any], Any] | None = None,
    ) -> _Job:
        if op not in self.handlers:
            raise ValueError(f"unknown op {op!r}; known: {', '.join(sorted(self.handlers))}")
        if self._closed or not self._tasks:
            self.observer.rejected("not_running")
            raise Overloaded("the model worker is not running")
        if len(self._pending) >= self.queue_size:
            self.observer.rejected("queue_full")
            raise Overloaded(f"the model queue is full ({self.queue_size} waiting); retry shortly")
        loop = asyncio.get_running_loop()
        now = loop.time()
        timeout = self.default_timeout_s if timeout_s is None else timeout_s
        job = _Job(op, payload, max(1, rows), loop.create_future(), now, now + timeout, tag, then)
        self._pending.append(job)
        self._wakeup.set()
        self.observer.queue_depth(len(self._pending))
        return job

    async def submit(
        self,
        op: str,
        payload: Any,
        *,
        rows: int = 1,
        timeout_s: float | None = None,
        tag: str | None = None,
        cancel_on: Callable[[], Awaitable[Any]] | None = None,
        then: Callable[[Any], Any] | None = None,
    ) -> Any:
        """Queue one job and wait for its result (`then(result)` when `then` is given).

        `cancel_on` (optional) makes an awaitable that completes when the caller no longer wants the
        result, e.g. an HTTP client disconnect: the job is then withdrawn and `Abandoned` raised.
        Raises Overloaded at once when the queue is full, DeadlineExceeded after `timeout_s`.
        """
        job = self._enqueue(op, payload, rows, timeout_s, tag, then)
        fut = job.future
        watcher: asyncio.Future[Any] | None = asyncio.ensure_future(cancel_on()) if cancel_on else None
        waiting: set[asyncio.Future[Any]] = {fut} if watcher is None else {fut, watcher}
        remaining = max(0.0, job.deadline - asyncio.get_running_loop().time())
        try:
            done, _ = await asyncio.wait(waiting, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            fut.cancel()  # our own task was cancelled: the worker will skip the job
            raise
        finally:
            if watcher is not None:
                watcher.cancel()
        if fut in done:
            return fut.result()
        fut.cancel()
        if watcher is not None and watcher in done:
            raise Abandoned(f"{op} job withdrawn: the caller went away")
        self.observer.timed_out("wait")
        raise DeadlineExceeded(f"no result within {job.deadline - job.enqueued:g} s")

    # -- the worker ---------------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            holding = False
            try:
                async with self._collecting:
                    while not self._pending:
                        self._wakeup.clear()
                        await self._wakeup.wait()
                    self._holding += 1
                    holding = True
                    jobs = await self._collect()
                if jobs:
                    await self._execute(jobs)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not stop the service; handlers' errors are caught below
                log.exception("batcher worker error (continuing)")
            finally:
                if holding:
                    self._holding -= 1

    def _alive(self, job: _Job, now: float) -> bool:
        if job.future.done():  # cancelled: caller timed out or went away
            self.stats.skipped += 1
            return False
        if now >= job.deadline:
            job.future.set_exception(DeadlineExceeded("the request's deadline passed while it was queued"))
            self.stats.expired += 1
            self.observer.timed_out("queue")
            return False
        return True

    async def _collect(self) -> list[_Job]:
        """Take the next batch off the queue according to the waiting policy (module docstring)."""
        loop = asyncio.get_running_loop()
        batch: list[_Job] = []
        rows = 0
        while self._pending and not batch:
            job = self._pending.popleft()
            if self._alive(job, loop.time()):
                batch.append(job)
                rows = job.rows
        if not batch:
            self.observer.queue_depth(len(self._pending))
            return batch
        # Nothing else queued and we were idle: run now instead of waiting for company.
        wait_until = batch[0].enqueued + self.max_wait_s if self._pending else loop.time()
        while rows < self.max_batch_size:
            if not self._pending:
                remaining = wait_until - loop.time()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except TimeoutError:
                    break
                continue
            nxt = self._pending[0]
            if rows + nxt.rows > self.max_batch_size:
                break
            self._pending.popleft()
            if self._alive(nxt, loop.time()):
                batch.append(nxt)
                rows += nxt.rows
        self.observer.queue_depth(len(self._pending))
        return batch

    def _call(self, op: str, jobs: list[_Job]) -> tuple[list[Any], float]:
        """In the model thread: the handler for the batch, then each job's `then` on its own result.
        Returns the results and the handler's time alone (what the compute metric reports)."""
        t0 = time.perf_counter()
        results = list(self.handlers[op]([j.payload for j in jobs]))
        compute = time.perf_counter() - t0
        if len(results) != len(jobs):
            raise RuntimeError(f"handler returned {len(results)} results for {len(jobs)} jobs")
        for i, job in enumerate(jobs):
            if job.then is not None and not job.future.done():
                try:
                    results[i] = job.then(results[i])
                except Exception as e:  # this job's result could not be finished: its error alone
                    results[i] = _Failed(e)
        return results, compute

    async def _execute(self, jobs: list[_Job]) -> None:
        loop = asyncio.get_running_loop()
        groups: dict[str, list[_Job]] = {}
        for job in jobs:
            groups.setdefault(job.op, []).append(job)
        started = time.perf_counter()
        batch_wait = started - jobs[0].queued_at
        for op, group in groups.items():
            # Alone: this worker is the only one holding jobs (none gathering, computing or waiting for
            # an alone batch) and nobody is queued.
            alone_on = self._alone_executor if self._holding <= 1 and not self._pending else None
            if alone_on is None:
                await self._alone_idle.wait()
            now = loop.time()
            live = [j for j in group if self._alive(j, now)]
            if not live:
                continue
            rows = sum(j.rows for j in live)
            t0 = time.perf_counter()
            compute: float | None = None
            try:
                if alone_on is not None:
                    self._alone_idle.clear()
                    try:
                        results, compute = await loop.run_in_executor(alone_on, self._call, op, live)
                    finally:
                        self._alone_idle.set()
                else:
                    results, compute = await loop.run_in_executor(self._executor, self._call, op, live)
            except Exception as e:
                self.stats.failed_batches += 1
                tags = ", ".join(j.tag or "-" for j in live)
                log.error("%s batch of %d rows failed for request(s) %s", op, rows, tags, exc_info=e)
                for j in live:
                    if not j.future.done():
                        j.future.set_exception(BatchFailed(op, e))
                continue
            finally:
                if compute is None:  # the handler raised
                    compute = time.perf_counter() - t0
                self.observer.batch(op, rows, batch_wait, [started - j.queued_at for j in live], compute)
                self.stats.batches += 1
                self.stats.jobs += len(live)
                self.stats.max_rows = max(self.stats.max_rows, rows)
                self.stats.rows_per_batch.append(rows)
                del self.stats.rows_per_batch[:-1000]
            for j, result in zip(live, results, strict=True):
                if j.future.done():
                    continue
                if isinstance(result, _Failed):
                    j.future.set_exception(result.error)
                else:
                    j.future.set_result(result)
