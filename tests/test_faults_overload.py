"""Overload, end to end: `python -m bench.overload --short` drives a real `python -m service` at 4× its
measured capacity on loopback. The excess is refused at once with 503 + Retry-After, nothing else fails,
the accepted requests keep a bounded latency, memory stays flat, and the service is back to normal when
the load drops."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from service_fixtures import ROOT, service_env

pytest_plugins = ["service_fixtures"]
pytestmark = pytest.mark.slow

REQUEST_TIMEOUT_S = 5  # the --short server's CARVAE_REQUEST_TIMEOUT_S
RSS_GROWTH_MIB = 150  # a tiny model: uploads and queued work are all that can grow


@pytest.fixture(scope="module")
def result(service_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("overload")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.overload",
            "--short",
            "--checkpoint",
            str(service_checkpoint),
            "--out",
            str(out),
        ],
        cwd=ROOT,
        env=service_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "overload.md").read_text().startswith("Overload run")
    data: dict[str, Any] = json.loads((out / "overload.json").read_text())
    return data


def phase(result: dict[str, Any], name: str) -> dict[str, Any]:
    return next(p for p in result["phases"] if p["phase"] == name)


def test_the_excess_gets_503_with_retry_after_quickly(result: dict[str, Any]) -> None:
    over = phase(result, "overload")
    assert over["offered_req_per_s"] >= 3.5 * result["capacity_req_per_s"]
    assert over["rejected_503"] > 0, over
    assert result["rejected_without_retry_after"] == 0
    assert all(int(v) >= 1 for v in result["retry_after_values"])
    # refused without queueing: on the wire (write to answer, without the load generator's own lag) most
    # 503s take milliseconds; the slowest are those caught behind a stall of the whole (2-core, shared)
    # machine, and even they come back before an accepted request's deadline
    assert over["rejected_wire_p50_ms"] < 100 and over["rejected_wire_p90_ms"] < 500, over
    assert over["rejected_wire_p99_ms"] < REQUEST_TIMEOUT_S * 1000, over


def test_nothing_fails_but_the_refusals(result: dict[str, Any]) -> None:
    for p in result["phases"]:
        assert set(p["statuses"]) <= {"200", "503"}, p["statuses"]  # no 500/504, no client timeouts
    assert phase(result, "baseline")["statuses"] == {"200": phase(result, "baseline")["requests"]}
    assert not any(k.startswith("carvae_timeouts_total") and v for k, v in result["server_counters"].items())


def test_accepted_requests_keep_a_bounded_latency(result: dict[str, Any]) -> None:
    over = phase(result, "overload")
    assert over["accepted"] > 0
    assert over["accepted_p99_ms"] < REQUEST_TIMEOUT_S * 1000, over
    # and it kept serving while refusing the rest. Not at full capacity: on a 2-core loopback run the load
    # generator and the refusals (thousands a second) take CPU from the model; a floor, not a target.
    assert over["accepted_req_per_s"] > 0.2 * result["capacity_req_per_s"], over


def test_memory_stays_flat(result: dict[str, Any]) -> None:
    if result["rss_growth_mib"] is None:
        pytest.skip("no /proc to sample the server's memory")
    assert result["rss_growth_mib"] < RSS_GROWTH_MIB, result["rss_growth_mib"]


def test_back_to_normal_when_the_load_drops(result: dict[str, Any]) -> None:
    assert result["recovery_after_s"] is not None, phase(result, "recovery")
    assert result["recovery_after_s"] <= 2.0
    assert result["after"]["ok"] == result["after"]["requests"] == 10
