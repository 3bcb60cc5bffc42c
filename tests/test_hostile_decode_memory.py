"""Decompression bombs inside the limits: a flat 40 M-pixel RGBA PNG is ~0.1 MB on the wire (far under the
upload limit) and ~1 GB while it decodes. Several at once must not add up past the decode memory budget
(CARVAE_DECODE_MEMORY_MB): in a container with a memory limit the kernel would kill the service."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from service_fixtures import serving

from carvae.preprocess import DecodeLimits, FootprintExceeded, PreprocessPolicy, decode_footprint, prepare
from service.batcher import Abandoned
from service.budget import CallerGone, MemoryBudget
from service.pipeline import CallContext, Pipeline

pytest_plugins = ["service_fixtures"]

MiB = 2**20


def _flat_png(side: int, mode: str) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (side, side), "red").save(buf, "PNG")
    return buf.getvalue()


def test_footprint_from_the_header() -> None:
    rgba, rgb = _flat_png(2000, "RGBA"), _flat_png(2000, "RGB")
    assert decode_footprint(rgba) == 2000 * 2000 * 24  # measured peak bytes per pixel of each mode
    assert decode_footprint(rgb) == 2000 * 2000 * 8
    jpeg = io.BytesIO()
    Image.new("RGB", (2000, 1000), "red").save(jpeg, "JPEG")
    # decoded at 1/8 scale when that still covers the model's size: 250×125
    assert decode_footprint(jpeg.getvalue(), draft_size=64) == 250 * 125 * 8
    assert decode_footprint(jpeg.getvalue(), draft_size=200) == 500 * 250 * 8
    palette = io.BytesIO()
    Image.new("P", (1000, 1000)).save(palette, "PNG", transparency=0)
    assert decode_footprint(palette.getvalue()) == 1000 * 1000 * 24  # composited through RGBA
    assert decode_footprint(b"not an image") == 0


def test_prepare_stops_at_the_header_when_the_footprint_is_over_the_limit() -> None:
    policy = PreprocessPolicy()
    with pytest.raises(FootprintExceeded) as over:
        prepare(_flat_png(2000, "RGBA"), policy, max_footprint=32 * MiB)
    assert over.value.footprint == 2000 * 2000 * 24
    assert prepare(_flat_png(300, "RGB"), policy, max_footprint=32 * MiB).shape == (64, 64, 3)


def _holders(budget: MemoryBudget, sizes: list[int], timeout_s: float = 5) -> list[tuple[float, float]]:
    """One holder per size at once, each holding for 0.2 s; their (start, end) times, sorted."""

    async def hold(n: int) -> tuple[float, float]:
        async with budget.hold(n, timeout_s):
            start = time.monotonic()
            await asyncio.sleep(0.2)
            return start, time.monotonic()

    async def everyone() -> list[tuple[float, float]]:
        return list(await asyncio.gather(*(hold(n) for n in sizes)))

    return sorted(asyncio.run(everyone()))


def _overlap(spans: list[tuple[float, float]]) -> int:
    return max(sum(1 for s, e in spans if s <= t < e) for t, _ in spans)


def test_budget_serialises_what_does_not_fit_and_lets_small_ones_share() -> None:
    assert _overlap(_holders(MemoryBudget(100), [60, 60, 60])) == 1  # no two fit together
    assert _overlap(_holders(MemoryBudget(100), [30, 30, 30])) == 3
    assert _overlap(_holders(MemoryBudget(100), [500, 500])) == 1  # larger than the budget: alone, not never
    with pytest.raises(asyncio.TimeoutError):  # a wait for room has a deadline
        _holders(MemoryBudget(100), [100, 100], timeout_s=0.05)


def test_a_wait_for_room_ends_when_the_caller_goes_away() -> None:
    """A waiting caller whose client disconnects leaves the queue at once (CallerGone, nothing held),
    instead of decoding its bomb for nobody when its turn comes."""

    async def run() -> tuple[float, int]:
        budget = MemoryBudget(100)
        gone = asyncio.Event()
        async with budget.hold(100, 5):  # someone else is decoding
            waiter = asyncio.ensure_future(_hold_briefly(budget, 60, gone.wait))
            await asyncio.sleep(0.05)
            assert not waiter.done()
            t0 = time.monotonic()
            gone.set()
            with pytest.raises(CallerGone):
                await asyncio.wait_for(waiter, 1)
            elapsed = time.monotonic() - t0
        # A caller still there waits as before, and one with room is not watched at all.
        async with budget.hold(60, 5, gone.wait):
            held = budget.held
        return elapsed, held + budget.held

    elapsed, held = asyncio.run(run())
    assert elapsed < 0.5 and held == 60


async def _hold_briefly(budget: MemoryBudget, n: int, cancel_on: Callable[[], Awaitable[object]]) -> None:
    async with budget.hold(n, 5, cancel_on):
        await asyncio.sleep(0.01)


def test_a_disconnected_upload_waiting_for_the_budget_is_never_decoded() -> None:
    """Through the pipeline (as /reconstruct calls it): the request is withdrawn like a disconnect in the
    model queue (Abandoned: a 499 in the log), and its large image is not decoded."""
    decoded: list[int] = []

    class Spy(Pipeline):
        def _prepare_budgeted(self, data: bytes) -> np.ndarray:
            decoded.append(len(data))
            return super()._prepare_budgeted(data)

    bomb = _flat_png(3000, "RGBA")  # ~200 MB to decode: over BUDGETED_ABOVE, so it waits for room

    async def run() -> None:
        budget = MemoryBudget(64 * MiB)
        served = SimpleNamespace(policy=PreprocessPolicy())
        with ThreadPoolExecutor(1) as pool:
            pipeline = Spy(served, SimpleNamespace(), pool, DecodeLimits(), budget, 5)  # type: ignore[arg-type]
            gone = asyncio.Event()
            async with budget.hold(64 * MiB, 5):  # another bomb is decoding
                ctx = CallContext(tag="test", cancel_on=gone.wait)
                upload = asyncio.ensure_future(pipeline.decode_upload(bomb, ctx=ctx))
                await asyncio.sleep(0.2)  # read, header checked: waiting for room
                assert not upload.done()
                gone.set()
                with pytest.raises(Abandoned):
                    await asyncio.wait_for(upload, 1)
            assert budget.held == 0

    asyncio.run(run())
    assert decoded == []


def _memory_mib(pid: int, field: str) -> float:
    """A memory figure of /proc/PID/status in MiB: VmRSS (resident now) or VmHWM (its peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field}")


@pytest.mark.slow
def test_concurrent_bombs_stay_within_the_budget(service_checkpoint: Path) -> None:
    side = 6000  # 36 M pixels: under the default 40 M limit; ~820 MB while it decodes
    bomb = _flat_png(side, "RGBA")
    assert len(bomb) < 1 * MiB and decode_footprint(bomb) > 800 * MiB
    with serving(service_checkpoint, WORKERS_DECODE=3, DECODE_MEMORY_MB=256) as srv:
        pid = srv.proc.pid
        before = _memory_mib(pid, "VmRSS")

        def post(_: int) -> int:
            files = {"file": ("bomb.png", bomb, "image/png")}
            return httpx.post(srv.url + "/reconstruct", files=files, timeout=120).status_code

        with ThreadPoolExecutor(3) as pool:
            statuses = list(pool.map(post, range(3)))
        grew = _memory_mib(pid, "VmHWM") - before
        small = httpx.post(srv.url + "/reconstruct", files={"file": ("c.png", _flat_png(64, "RGB"))})
    assert statuses == [200, 200, 200]  # served, one after another
    assert small.status_code == 200
    # One decode at a time, its memory returned before the next: ~825 MiB measured. Three at once: ~2 GiB;
    # one at a time but each kept in its thread's malloc arena: ~1.6 GiB.
    assert grew < 1300, f"peak RSS grew by {grew:.0f} MiB"


@pytest.mark.slow
def test_photos_pass_waiting_bombs_and_a_bomb_waits_no_longer_than_its_deadline(
    service_checkpoint: Path,
) -> None:
    """Bombs wait for the budget on the event loop, not in a decode thread: a photo sent behind eight of
    them is answered at once, and a bomb that gets no room within REQUEST_TIMEOUT_S is a 504."""
    bomb = _flat_png(4000, "RGBA")  # ~370 MB to decode, ~0.5 s: eight in a row take longer than 2 s
    with serving(service_checkpoint, WORKERS_DECODE=2, DECODE_MEMORY_MB=64, REQUEST_TIMEOUT_S=2) as srv:

        def post(data: bytes) -> tuple[int, float, str]:
            t0 = time.monotonic()
            r = httpx.post(srv.url + "/reconstruct", files={"file": ("x.png", data)}, timeout=60)
            code = r.json()["error"]["code"] if r.status_code != 200 else ""
            return r.status_code, time.monotonic() - t0, code

        with ThreadPoolExecutor(9) as pool:
            bombs = [pool.submit(post, bomb) for _ in range(8)]
            time.sleep(0.5)  # every bomb is decoding or waiting for room
            photo = post(_flat_png(300, "RGB"))
            results = [b.result() for b in bombs]
        metrics = httpx.get(srv.url + "/metrics").text
    assert photo[0] == 200 and photo[1] < 1.5, photo
    assert {status for status, _, _ in results} == {200, 504}, results
    assert all(code == "timeout" for status, _, code in results if status == 504)
    assert max(elapsed for _, elapsed, _ in results) < 2 + 3  # the deadline, plus one decode in progress
    assert 'carvae_timeouts_total{stage="decode"} 0.0' not in metrics


def _decode_timeouts(client: TestClient) -> float:
    samples = (s for fam in text_string_to_metric_families(client.get("/metrics").text) for s in fam.samples)
    return next(
        s.value for s in samples if s.name == "carvae_timeouts_total" and s.labels["stage"] == "decode"
    )


def test_one_request_whose_two_uploads_run_out_of_time_counts_one_decode_timeout(make_client: Any) -> None:
    """/interpolate decodes its two uploads side by side: when both waited for the budget past the
    deadline, each counted a decode timeout, and carvae_timeouts_total said two requests where one got
    its 504."""
    client = make_client(DECODE_MEMORY_MB=64, REQUEST_TIMEOUT_S=0.3)
    budget = client.app.state.pipeline.decode_budget  # type: ignore[attr-defined]
    budget.held = budget.limit  # another decode holds all the room until the deadline passes
    bomb = _flat_png(2000, "RGBA")  # 96 MB to decode: over BUDGETED_ABOVE, so it waits for room
    try:
        files = {"file_a": ("a.png", bomb, "image/png"), "file_b": ("b.png", bomb, "image/png")}
        both = client.post("/interpolate", files=files)
        assert both.status_code == 504 and both.json()["error"]["code"] == "timeout", both.text
        assert _decode_timeouts(client) == 1
        one = client.post("/reconstruct", files={"file": ("a.png", bomb, "image/png")})
        assert one.status_code == 504
        assert _decode_timeouts(client) == 2
    finally:
        budget.held = 0
    photos = {"file_a": ("a.png", _flat_png(64, "RGB")), "file_b": ("b.png", _flat_png(64, "RGB"))}
    assert client.post("/interpolate", files=photos).status_code == 200


def test_when_one_upload_of_two_fails_the_other_stops_waiting_for_room(
    make_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/interpolate with a broken file_a and a large file_b: the answer is file_a's 4xx, and file_b's wait
    for decode room must end with it (the caller has its answer: the wait is abandoned like a disconnected
    client's), not wait out the deadline and then decode for nobody when room comes."""
    client = make_client(DECODE_MEMORY_MB=64, REQUEST_TIMEOUT_S=5)
    budget = client.app.state.pipeline.decode_budget  # type: ignore[attr-defined]
    outcomes: list[tuple[str, float]] = []
    real_hold = budget.hold

    @asynccontextmanager
    async def hold(*args: Any, **kwargs: Any) -> AsyncIterator[None]:
        try:
            async with real_hold(*args, **kwargs):
                outcomes.append(("held", time.monotonic()))
                yield
        except BaseException as e:
            outcomes.append((type(e).__name__, time.monotonic()))
            raise

    monkeypatch.setattr(budget, "hold", hold)
    budget.held = budget.limit  # another decode holds all the room until the deadline
    try:
        files = {
            "file_a": ("a.png", b"this is not an image", "image/png"),
            "file_b": ("b.png", _flat_png(2000, "RGBA"), "image/png"),
        }
        started = time.monotonic()
        answer = client.post("/interpolate", files=files)
        assert 400 <= answer.status_code < 500 and "file_a" in answer.json()["error"]["message"], answer.text
        # Polled for at most half the deadline: a wait that was not withdrawn ends with TimeoutError at 5 s.
        while not outcomes and time.monotonic() < started + 2.5:
            time.sleep(0.02)
    finally:
        budget.held = 0
    assert [name for name, _ in outcomes] == ["CallerGone"], outcomes
    assert outcomes[0][1] - started < 2.5, "file_b waited for room after file_a had failed"
