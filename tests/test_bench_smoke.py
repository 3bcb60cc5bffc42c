"""The benchmark's machinery, not its figures: the load generator against scripted servers, and a
`python -m bench.run --quick` smoke run against real servers (our service and the plain peer)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from bench.loadgen import PNG_SIGNATURE, multipart_request, run_closed_loop

ROOT = Path(__file__).resolve().parents[1]


def _serve(responses: Callable[[int], list[bytes]]) -> Callable[[], asyncio.Future[asyncio.Server]]:
    """A keep-alive server that reads whole requests (by Content-Length) and answers the n-th one with
    `responses(n)`: a list of chunks written with a pause between them (responses split across reads)."""
    count = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal count
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                count += 1
                for chunk in responses(count):
                    writer.write(chunk)
                    await writer.drain()
                    await asyncio.sleep(0.001)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    return lambda: asyncio.ensure_future(asyncio.start_server(handle, "127.0.0.1", 0))


def _response(status: int, body: bytes) -> bytes:
    return f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body


async def _load(responses: Callable[[int], list[bytes]], concurrency: int) -> dict[str, Any]:
    server = await _serve(responses)()
    port = server.sockets[0].getsockname()[1]
    request = multipart_request("127.0.0.1", "/reconstruct", "file", "car.jpg", b"\xff\xd8jpeg")
    try:
        result = await run_closed_loop("127.0.0.1", port, request, concurrency, seconds=0.5, warmup_s=0.1)
    finally:
        server.close()
    return result.summary()


def test_loadgen_counts_split_responses_and_errors() -> None:
    png = PNG_SIGNATURE + b"x" * 5000

    def responses(n: int) -> list[bytes]:
        if n % 4 == 0:
            return [_response(503, b'{"error": {}}')]
        if n % 4 == 1:
            return [_response(200, b"not a png")]
        whole = _response(200, png)
        return [whole[:10], whole[10:3000], whole[3000:]]  # header and body split across reads

    summary = asyncio.run(_load(responses, concurrency=3))
    assert summary["requests"] > 0 and summary["errors"] > 0
    kinds = summary["error_kinds"]
    assert isinstance(kinds, dict) and set(kinds) == {"http_503", "bad_body"}
    # half the answers are good PNGs, a quarter 503, a quarter not PNG
    assert 0.3 < summary["requests"] / (summary["requests"] + summary["errors"]) < 0.7
    assert 0 < summary["p50_ms"] <= summary["p95_ms"] <= summary["p99_ms"]


def test_multipart_request_is_well_formed() -> None:
    req = multipart_request("h", "/reconstruct", "file", "car.jpg", b"DATA")
    head, body = req.split(b"\r\n\r\n", 1)
    assert head.startswith(b"POST /reconstruct HTTP/1.1\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    assert length == len(body)
    boundary = head.split(b"boundary=")[1].split(b"\r\n")[0]
    assert body.startswith(b"--" + boundary) and body.endswith(b"--" + boundary + b"--\r\n")
    assert b'name="file"; filename="car.jpg"' in body and b"\r\n\r\nDATA\r\n" in body


@pytest.fixture(scope="module")
def quick_result(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARVAE_")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (out / "latest.md").read_text().count("| carvae |") == 2
    text = (out / "latest.json").read_text()
    assert str(ROOT) not in text  # results are shared: no paths of this machine
    return json.loads(text)


def test_quick_run_structure_and_sane_numbers(quick_result: dict) -> None:
    r = quick_result
    assert r["quick"] is True and r["machine"]["cores"] >= 1 and r["device"]
    assert r["limit"]["pipeline_limit"] > 0
    assert r["limit"]["model_bmax_images_per_s"]["1"] > 0
    servers = r["service"]["by_server"]
    assert set(servers) == {"carvae", "fastapi-plain"}
    for name, by_c in servers.items():
        assert set(by_c) == {"1", "4"}, name
        for c, row in by_c.items():
            assert row["errors"] == 0, (name, c)
            assert row["req_per_s"] > 0
            assert 0 < row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
            assert row["server_cpu_ms_per_request"] > 0
            assert row["rounds"] == 1
    # the batcher's own metrics: one row per forward at c=1, and never more than the concurrency
    assert servers["carvae"]["1"]["avg_batch"] == pytest.approx(1.0)
    assert 1.0 <= servers["carvae"]["4"]["avg_batch"] <= 4.0
    assert servers["fastapi-plain"]["1"]["avg_batch"] is None
    assert 0 < r["service"]["startup_s"]["carvae"] < 120
    starts = [rec for rec in r["raw"]["service"] if "startup_s" in rec]
    assert {rec["server"] for rec in starts} == {"carvae", "fastapi-plain"}
    for rec in starts:
        # the server's own CPU until ready (it imported torch and built a model: well over 0.2 s on any
        # CPU), at most every core for the whole start; the other load beside it is never negative
        assert 0.2 < rec["startup_cpu_s"] <= rec["startup_s"] * r["machine"]["cores"] + 0.1, rec
        assert rec["startup_other_cores"] >= 0 and rec["startup_attempts"] >= 1, rec
    names = [t["target"] for t in r["targets"]]
    assert "c=1 p50 vs plain FastAPI" in names and "start-up to /readyz (s)" in names
    # the peer LitServe is not part of a quick run: its targets are reported as not measured
    assert all(t["met"] is None for t in r["targets"] if "LitServe" in t["target"])


def test_a_start_slowed_by_other_load_is_measured_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """As a noisy window is: the start-up figure must be the server's, not the machine's other work."""
    from bench import run, servers

    started: list[Any] = []

    class FakeRunning:
        def __init__(self, spec: servers.ServerSpec, log: Path) -> None:
            self.startup_s, self.startup_cpu_s = (7.5, 3.1) if not started else (3.9, 3.2)
            self.startup_other_cores = 0.9 if not started else 0.02
            self.stopped = False
            started.append(self)

        def stop(self) -> None:
            self.stopped = True

    monkeypatch.setattr(servers, "Running", FakeRunning)
    monkeypatch.setattr(run.time, "sleep", lambda s: None)
    opt = run.parse_args(["--quick"])
    spec = servers.ServerSpec("x", ("true",), "/readyz")
    for retries, want in ((2, (3.9, 2, False)), (0, (7.5, 1, True))):
        started.clear()
        srv, rec = run.start_quietly(replace(opt, retries=retries), spec, Path("log"), "[test]")
        assert (rec["startup_s"], rec["startup_attempts"], rec["startup_noisy"]) == want
        assert srv is started[-1] and not srv.stopped
        assert all(s.stopped for s in started[:-1])  # the noisy start's server was stopped first


def test_the_start_up_figure_leaves_noisy_starts_out() -> None:
    from bench.report import summarise

    def start(server: str, s: float, noisy: bool) -> dict[str, Any]:
        return {"server": server, "startup_s": s, "startup_cpu_s": s - 0.5, "startup_noisy": noisy}

    records = [start("a", 3.9, False), start("a", 7.5, True), start("a", 4.1, False), start("a", 7.0, True)]
    records += [start("b", 6.0, True), start("b", 8.0, True)]  # none clean: all of them, as windows do
    summary = summarise(records)
    assert summary["startup_s"] == {"a": 4.0, "b": 7.0}
    assert summary["startup_cpu_s"] == {"a": 3.5, "b": 6.5}


def test_limit_is_the_median_of_its_samples_across_the_run() -> None:
    """One lucky (or unlucky) sample of the parallel pipeline must not set every ratio of the run."""
    from bench.run import parallel_label, settle_limit

    parallel = parallel_label()
    limit = {
        "pipeline_images_per_s": {"pipeline, 1 process × 1 thread(s)": 120.0, parallel: 278.0},
        "pipeline_limit": 278.0,
        "pipeline_limit_how": parallel,
        "parallel_samples": [278.0],
    }
    settled = settle_limit(limit, [278.0, 241.0, 250.0, 246.0])
    assert settled["pipeline_limit"] == 248.0 and settled["pipeline_limit_how"] == parallel
    assert settled["pipeline_images_per_s"][parallel] == 248.0
    assert settled["parallel_samples"] == [278.0, 241.0, 250.0, 246.0]
    # A single-process figure above the median becomes the limit instead.
    limit["pipeline_images_per_s"]["pipeline, 1 process × 2 thread(s)"] = 260.0
    assert settle_limit(limit, [278.0, 241.0, 250.0])["pipeline_limit"] == 260.0
    assert settle_limit(limit, []) is limit  # quick runs and one-core machines: unchanged


def test_micro_levers_run_and_the_multipart_bound_parses_the_same_file(tmp_path: Path) -> None:
    """`bench.micro` (the per-request levers) on the tiny model: it checks itself that Starlette's parser
    and the minimal split give back the uploaded JPEG, and every figure lands in the JSON and the table."""
    args = ["--quick", "--rounds", "1", "--seconds", "0.05", "--out", str(tmp_path)]
    proc = subprocess.run(
        [sys.executable, "-m", "bench.micro", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "micro.json").read_text())
    levers = result["levers"]
    assert set(levers["multipart parse"]) == {"starlette", "minimal"}
    assert {"pydantic_core", "json.dumps"} <= set(levers["/encode JSON body"])
    assert set(levers["grad mode (forward, per image)"]) == {"inference_mode", "no_grad", "grad enabled"}
    figures = [us for variants in levers.values() for us in variants.values()]
    assert all(us > 0 for us in figures)
    assert result["per_image_us"]["total"] > result["per_image_us"]["forward"] > 0
    table = (tmp_path / "micro.md").read_text()
    assert table.count("\n| ") == 1 + len(figures)  # the header and one row per variant


def test_recipes_starts_its_runs_where_no_runs_folder_exists_yet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's `python -m bench.recipes --data DIR` on a fresh clone: its logs go beside --out
    (runs/recipes-r0.log), in a runs/ folder nothing has made yet. The trainers are stand-ins that exit 1,
    so no training runs: what counts is that every recipe was started, with its log in place."""
    from bench import recipes

    started: list[list[str]] = []

    class FailedTrainer:
        def __init__(self, cmd: list[str], **kwargs: Any) -> None:
            started.append(cmd)

        def wait(self) -> int:
            return 1

    monkeypatch.setattr(recipes.subprocess, "Popen", FailedTrainer)
    out = tmp_path / "runs" / "recipes"
    rc = recipes.main(["--data", "synthetic", "--out", str(out), "--results", str(tmp_path / "results")])
    assert rc == 0
    assert len(started) == len(recipes.RECIPES)
    logs = sorted(p.name for p in out.parent.glob("*.log"))
    assert logs == [f"recipes-r{i}.log" for i in range(len(started))]
    assert json.loads((tmp_path / "results" / "recipes.json").read_text())["rows"] == []
