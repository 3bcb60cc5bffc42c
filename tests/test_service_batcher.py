"""The batcher alone (no HTTP, no model): batching policy, bounds, deadlines, withdrawal, fault isolation."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from service.batcher import Abandoned, Batcher, BatchFailed, DeadlineExceeded, Overloaded


class Recorder:
    """A handler that records every call and doubles its payloads; optionally slow or blocked."""

    def __init__(self, delay_s: float = 0.0, fail_on: object = None) -> None:
        self.calls: list[list[Any]] = []
        self.delay_s = delay_s
        self.fail_on = fail_on
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, payloads: list[Any]) -> list[Any]:
        self.gate.wait(10)
        self.calls.append(list(payloads))
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail_on is not None and self.fail_on in payloads:
            raise RuntimeError("injected fault")
        return [p * 2 for p in payloads]


def run(coro_fn: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    return asyncio.run(coro_fn())


async def started(handlers: dict[str, Any], **kw: Any) -> Batcher:
    b = Batcher(handlers, **kw)
    await b.start()
    return b


def test_lone_request_does_not_wait_for_company() -> None:
    rec = Recorder()

    async def scenario() -> float:
        b = await started({"x": rec}, max_wait_s=1.0)
        t0 = time.perf_counter()
        assert await b.submit("x", 21) == 42
        elapsed = time.perf_counter() - t0
        await b.stop()
        return elapsed

    assert run(scenario) < 0.5  # far below max_wait_s: an idle worker runs a lone job at once


def test_concurrent_requests_form_batches_and_keep_order() -> None:
    rec = Recorder(delay_s=0.02)

    async def scenario() -> list[int]:
        b = await started({"x": rec}, max_batch_size=8, max_wait_s=0.01)
        results = await asyncio.gather(*(b.submit("x", i) for i in range(20)))
        await b.stop()
        return list(results)

    assert run(scenario) == [2 * i for i in range(20)]
    sizes = [len(c) for c in rec.calls]
    assert sum(sizes) == 20
    assert max(sizes) > 1, sizes
    assert max(sizes) <= 8, sizes


def test_waits_after_first_item_when_others_are_queued() -> None:
    rec = Recorder()

    async def scenario() -> None:
        b = await started({"x": rec}, max_batch_size=8, max_wait_s=0.2)
        first = asyncio.ensure_future(b.submit("x", 1))
        second = asyncio.ensure_future(b.submit("x", 2))  # queued together with the first
        await asyncio.sleep(0.05)
        late = asyncio.ensure_future(b.submit("x", 3))  # arrives within the wait window
        assert await asyncio.gather(first, second, late) == [2, 4, 6]
        await b.stop()

    run(scenario)
    assert rec.calls == [[1, 2, 3]]


def test_rows_count_toward_the_batch_limit() -> None:
    rec = Recorder()
    rec.gate.clear()

    async def scenario() -> None:
        b = await started({"x": rec}, max_batch_size=4, max_wait_s=0.05)
        blocker = asyncio.ensure_future(b.submit("x", 0))
        await asyncio.sleep(0.05)  # worker is now inside the handler
        jobs = [asyncio.ensure_future(b.submit("x", i, rows=3)) for i in (1, 2, 3)]
        await asyncio.sleep(0.01)
        rec.gate.set()
        await asyncio.gather(blocker, *jobs)
        await b.stop()

    run(scenario)
    assert rec.calls == [[0], [1], [2], [3]]  # 3 + 3 rows > 4: one job per batch


def test_then_finishes_each_result_in_the_model_thread_and_fails_alone() -> None:
    """`then` runs on each job's own result in the model thread, after the batch's one handler call; an
    error there is that job's alone, raised as itself, and the batch's other jobs succeed."""
    rec = Recorder()
    rec.gate.clear()
    threads: list[str] = []

    def finish(result: int) -> str:
        threads.append(threading.current_thread().name)
        if result == 4:
            raise ValueError("cannot encode 4")
        return f"<{result}>"

    async def scenario() -> list[Any]:
        b = await started({"x": rec}, max_batch_size=8, max_wait_s=0.05)
        blocker = asyncio.ensure_future(b.submit("x", 0, then=finish))
        await asyncio.sleep(0.05)  # the worker is inside the handler: the next three queue together
        jobs = [asyncio.ensure_future(b.submit("x", i, then=finish)) for i in (1, 2, 3)]
        plain = asyncio.ensure_future(b.submit("x", 5))  # no continuation: the handler's result
        await asyncio.sleep(0.01)
        rec.gate.set()
        out = await asyncio.gather(blocker, *jobs, plain, return_exceptions=True)
        await b.stop()
        return list(out)

    out = run(scenario)
    assert out[:2] == ["<0>", "<2>"] and out[3:] == ["<6>", 10], out
    assert isinstance(out[2], ValueError) and str(out[2]) == "cannot encode 4"
    assert rec.calls == [[0], [1, 2, 3, 5]]  # the failing continuation did not split or fail the batch
    assert len(threads) == 4 and all(t.startswith("carvae-model") for t in threads), threads


def test_compute_metric_is_the_handler_time_without_continuations() -> None:
    seen: list[float] = []

    class Observer:
        def queue_depth(self, depth: int) -> None:
            pass

        def batch(self, op: str, rows: int, wait: float, waits: Any, compute_s: float) -> None:
            seen.append(compute_s)

        def rejected(self, reason: str) -> None:
            pass

        def timed_out(self, stage: str) -> None:
            pass

    def slow_finish(result: int) -> int:
        time.sleep(0.2)
        return result

    async def scenario() -> None:
        b = await started({"x": Recorder(delay_s=0.01)}, observer=Observer())
        t0 = time.perf_counter()
        assert await b.submit("x", 1, then=slow_finish) == 2
        assert time.perf_counter() - t0 >= 0.2
        await b.stop()

    run(scenario)
    assert len(seen) == 1 and 0.01 <= seen[0] < 0.15, seen


def test_waits_are_measured_finer_than_the_event_loops_clock() -> None:
    """The service runs on uvloop, whose loop.time() counts whole milliseconds: every queue and batch wait
    the metrics reported was a multiple of 1 ms (mostly 0), under the 0.1 and 0.5 ms buckets."""
    uvloop = pytest.importorskip("uvloop")
    seen: list[float] = []

    class Observer:
        def queue_depth(self, depth: int) -> None:
            pass

        def batch(self, op: str, rows: int, wait: float, waits: Any, compute_s: float) -> None:
            seen.extend([wait, *waits])

        def rejected(self, reason: str) -> None:
            pass

        def timed_out(self, stage: str) -> None:
            pass

    async def scenario() -> None:
        b = await started({"x": Recorder()}, observer=Observer(), max_batch_size=4, max_wait_s=0.002)
        for _ in range(5):
            await asyncio.gather(*(b.submit("x", i) for i in range(3)))
        await b.stop()

    uvloop.run(scenario())
    assert len(seen) >= 10 and all(0 <= w < 1 for w in seen), seen
    assert any(abs(w * 1000 - round(w * 1000)) > 1e-6 for w in seen), seen


def test_one_forward_per_op_in_a_mixed_batch() -> None:
    a, b_ = Recorder(), Recorder()
    a.gate.clear()

    async def scenario() -> None:
        b = await started({"a": a, "b": b_}, max_batch_size=16, max_wait_s=0.05)
        blocker = asyncio.ensure_future(b.submit("a", 100))
        await asyncio.sleep(0.05)
        jobs = [asyncio.ensure_future(b.submit("ab"[i % 2], i)) for i in range(6)]
        await asyncio.sleep(0.01)
        a.gate.set()
        results = await asyncio.gather(*jobs)
        assert results == [2 * i for i in range(6)]
        await blocker
        await b.stop()

    run(scenario)
    assert a.calls == [[100], [0, 2, 4]]
    assert b_.calls == [[1, 3, 5]]


def test_full_queue_refuses_at_once() -> None:
    rec = Recorder()
    rec.gate.clear()

    async def scenario() -> None:
        b = await started({"x": rec}, queue_size=2, max_batch_size=1)
        running = asyncio.ensure_future(b.submit("x", 0))
        await asyncio.sleep(0.05)  # taken off the queue, blocked in the handler
        queued = [asyncio.ensure_future(b.submit("x", i)) for i in (1, 2)]
        await asyncio.sleep(0.01)
        t0 = time.perf_counter()
        with pytest.raises(Overloaded) as info:
            await b.submit("x", 3)
        assert time.perf_counter() - t0 < 0.05
        assert info.value.retry_after_s >= 1
        rec.gate.set()
        assert await asyncio.gather(running, *queued) == [0, 2, 4]
        await b.stop()

    run(scenario)


def test_expired_jobs_never_reach_the_handler() -> None:
    rec = Recorder()
    rec.gate.clear()

    async def scenario() -> None:
        b = await started({"x": rec}, max_batch_size=1)
        blocker = asyncio.ensure_future(b.submit("x", 0, timeout_s=5))
        await asyncio.sleep(0.05)
        with pytest.raises(DeadlineExceeded):
            await b.submit("x", 99, timeout_s=0.1)
        rec.gate.set()
        assert await blocker == 0
        assert await b.submit("x", 5) == 10
        await b.stop()

    run(scenario)
    assert all(99 not in c for c in rec.calls)


def test_withdrawn_job_costs_no_forward_pass() -> None:
    rec = Recorder()
    rec.gate.clear()

    async def scenario() -> None:
        b = await started({"x": rec}, max_batch_size=1)
        blocker = asyncio.ensure_future(b.submit("x", 0))
        await asyncio.sleep(0.05)
        gone = asyncio.Event()
        job = asyncio.ensure_future(b.submit("x", 77, cancel_on=gone.wait))
        await asyncio.sleep(0.01)
        gone.set()  # the caller disconnects while the job is queued
        with pytest.raises(Abandoned):
            await job
        rec.gate.set()
        await blocker
        await b.submit("x", 1)
        await b.stop()

    run(scenario)
    assert all(77 not in c for c in rec.calls)
    assert rec.calls == [[0], [1]]


def test_fault_fails_only_its_batch_and_worker_continues() -> None:
    rec = Recorder(fail_on=13)
    rec.gate.clear()

    async def scenario() -> None:
        b = await started({"x": rec}, max_batch_size=4, max_wait_s=0.05)
        blocker = asyncio.ensure_future(b.submit("x", 0))
        await asyncio.sleep(0.05)
        doomed = [asyncio.ensure_future(b.submit("x", v)) for v in (12, 13)]
        await asyncio.sleep(0.01)
        rec.gate.set()
        assert await blocker == 0
        for job in doomed:
            with pytest.raises(BatchFailed):
                await job
        assert await b.submit("x", 4) == 8  # the worker is still serving
        assert b.stats.failed_batches == 1
        await b.stop()

    run(scenario)


def test_stop_drains_queued_jobs_and_then_refuses() -> None:
    rec = Recorder(delay_s=0.01)

    async def scenario() -> None:
        b = await started({"x": rec}, max_batch_size=2)
        jobs = [asyncio.ensure_future(b.submit("x", i)) for i in range(6)]
        await asyncio.sleep(0)
        await b.stop(drain_timeout_s=5)
        assert [j.result() for j in jobs] == [2 * i for i in range(6)]
        with pytest.raises(Overloaded):
            await b.submit("x", 1)

    run(scenario)


def test_jobs_still_queued_when_the_stop_gives_up_are_refused_and_counted() -> None:
    rec = Recorder()
    rec.gate.clear()
    refused: list[str] = []

    class Observer:
        def queue_depth(self, depth: int) -> None:
            pass

        def batch(self, op: str, rows: int, wait: float, waits: Any, compute_s: float) -> None:
            pass

        def rejected(self, reason: str) -> None:
            refused.append(reason)

        def timed_out(self, stage: str) -> None:
            pass

    async def scenario() -> None:
        b = await started({"x": rec}, max_batch_size=1, observer=Observer())
        running = asyncio.ensure_future(b.submit("x", 0))
        await asyncio.sleep(0.05)  # in the handler, blocked
        queued = [asyncio.ensure_future(b.submit("x", i)) for i in (1, 2)]
        await asyncio.sleep(0.01)
        await b.stop(drain_timeout_s=0.1)
        rec.gate.set()
        for job in queued:
            with pytest.raises(Overloaded, match="shutting down"):
                await job
        running.cancel()

    run(scenario)
    assert refused == ["stopping", "stopping"]


def test_unknown_op_is_a_programming_error() -> None:
    async def scenario() -> None:
        b = await started({"x": Recorder()})
        with pytest.raises(ValueError, match="unknown op"):
            await b.submit("y", 1)
        await b.stop()

    run(scenario)


class Timeline:
    """A handler that logs (event, thread name, payloads) and holds any batch containing "hold" until
    `gate` is set."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, list[Any]]] = []
        self.gate = threading.Event()

    def __call__(self, payloads: list[Any]) -> list[Any]:
        name = threading.current_thread().name
        self.events.append(("start", name, list(payloads)))
        if "hold" in payloads:
            self.gate.wait(10)
        self.events.append(("end", name, list(payloads)))
        return payloads


def test_a_batch_alone_runs_on_the_alone_executor_and_nothing_runs_beside_it() -> None:
    """A batch that starts while no other worker holds jobs and nothing is queued runs on the alone
    executor (the service's thread on every core); one that arrives meanwhile waits for it to finish
    instead of sharing the cores, and runs on a model thread, not alone, since it found company."""
    tl = Timeline()
    alone = ThreadPoolExecutor(1, thread_name_prefix="alone")

    async def scenario() -> None:
        b = await started({"x": tl}, workers=2, alone_executor=alone, max_wait_s=0.0)
        first = asyncio.ensure_future(b.submit("x", "hold"))
        await asyncio.sleep(0.05)
        second = asyncio.ensure_future(b.submit("x", "next"))
        await asyncio.sleep(0.2)  # the second worker has taken "next" by now, and must still wait
        assert [e[0] for e in tl.events] == ["start"]
        tl.gate.set()
        assert await asyncio.gather(first, second) == ["hold", "next"]
        assert await b.submit("x", "idle again") == "idle again"
        await b.stop()

    run(scenario)
    (s1, t1, p1), (e1, _, _), (s2, t2, p2), (e2, _, _), (s3, t3, p3), _ = tl.events
    assert (s1, e1, s2, e2, s3) == ("start", "end", "start", "end", "start")
    assert (p1, p2, p3) == (["hold"], ["next"], ["idle again"])
    assert t1.startswith("alone") and t3.startswith("alone")
    assert t2.startswith("carvae-model")
    with pytest.raises(RuntimeError):  # the batcher owns the alone executor and shut it down
        alone.submit(int)


def test_without_an_alone_executor_two_workers_compute_side_by_side() -> None:
    tl = Timeline()

    async def scenario() -> None:
        b = await started({"x": tl}, workers=2, max_wait_s=0.0)
        first = asyncio.ensure_future(b.submit("x", "hold"))
        await asyncio.sleep(0.05)
        assert await b.submit("x", "next") == "next"  # finishes while "hold" is still computing
        tl.gate.set()
        assert await first == "hold"
        await b.stop()

    run(scenario)
    assert [(e, p) for e, _, p in tl.events] == [
        ("start", ["hold"]),
        ("start", ["next"]),
        ("end", ["next"]),
        ("end", ["hold"]),
    ]
