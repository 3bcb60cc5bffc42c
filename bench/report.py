"""Medians over rounds, the targets as same-run ratios, and the Markdown table."""

from __future__ import annotations

import re
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

MEDIAN_FIELDS = (
    "req_per_s",
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "server_cpu_ms_per_request",
    "avg_batch",
    "client_cpu_ms_per_request",
    "server_cores",
)
README_START = "<!-- bench:latest:start -->"
README_END = "<!-- bench:latest:end -->"


def _median(values: list[Any]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 2) if present else None


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per server: the median start-up (and the server's CPU for it) over its clean starts, and per
    concurrency the median of each figure over its clean windows (all of them when none was clean)."""
    startups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    windows: dict[str, dict[int, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for rec in records:
        if "startup_s" in rec:
            startups[rec["server"]].append(rec)
        else:
            windows[rec["server"]][rec["concurrency"]].append(rec)
    by_server: dict[str, dict[int, dict[str, Any]]] = {}
    for server, by_c in windows.items():
        by_server[server] = {}
        for c, ws in sorted(by_c.items()):
            clean = [w for w in ws if not w["noisy"]]
            use = clean or ws
            row: dict[str, Any] = {f: _median([w.get(f) for w in use]) for f in MEDIAN_FIELDS}
            row.update(
                errors=sum(w["errors"] for w in ws),
                rounds=len(ws),
                clean_rounds=len(clean),
                max_other_cores=max(w["other_cores"] for w in use),
            )
            by_server[server][c] = row
    clean_starts = {s: [r for r in v if not r.get("startup_noisy")] or v for s, v in startups.items()}
    return {
        "startup_s": {s: _median([r["startup_s"] for r in v]) for s, v in clean_starts.items()},
        "startup_cpu_s": {s: _median([r.get("startup_cpu_s") for r in v]) for s, v in clean_starts.items()},
        "by_server": by_server,
    }


def _get(result: dict[str, Any], server: str, c: int, key: str) -> float | None:
    row = result["service"]["by_server"].get(server, {}).get(c) or result["service"]["by_server"].get(
        server, {}
    ).get(str(c))
    return None if row is None else row.get(key)


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each as {target, value, goal, met} (met None: not measured in this run)."""
    out: list[dict[str, Any]] = []

    def add(name: str, value: float | None, goal: str, met: bool | None) -> None:
        out.append({"target": name, "value": value, "goal": goal, "met": met})

    limit = result["limit"]["pipeline_limit"]
    for c in (32, 64):
        ours, peer = _get(result, "carvae", c, "req_per_s"), _get(result, "litserve", c, "req_per_s")
        ratio = round(ours / peer, 2) if ours and peer else None
        add(f"req/s vs LitServe, c={c}", ratio, "≥ 1.3×", None if ratio is None else ratio >= 1.3)
        p99, peer_p99 = _get(result, "carvae", c, "p99_ms"), _get(result, "litserve", c, "p99_ms")
        add(
            f"p99 vs LitServe, c={c}",
            round(p99 / peer_p99, 2) if p99 and peer_p99 else None,
            "< 1×",
            None if not (p99 and peer_p99) else p99 < peer_p99,
        )
        share = round(ours / limit, 3) if ours and limit else None
        add(f"share of pipeline limit, c={c}", share, "≥ 0.85", None if share is None else share >= 0.85)
    p50, plain = _get(result, "carvae", 1, "p50_ms"), _get(result, "fastapi-plain", 1, "p50_ms")
    add(
        "c=1 p50 vs plain FastAPI",
        round(p50 / plain, 2) if p50 and plain else None,
        "≤ 1×",
        None if not (p50 and plain) else p50 <= plain,
    )
    startup = result["service"]["startup_s"].get("carvae")
    add("start-up to /readyz (s)", startup, "≤ 3 s", None if startup is None else startup <= 3.0)
    return out


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"
    return str(v)


def _service_table(summary: dict[str, Any]) -> list[str]:
    lines = [
        "| server | c | req/s | p50 ms | p95 ms | p99 ms | errors | server CPU ms/req | avg batch "
        "| clean rounds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for server, by_c in summary["by_server"].items():
        for c, row in by_c.items():
            cells = [
                server,
                c,
                *(_fmt(row[k]) for k in ("req_per_s", "p50_ms", "p95_ms", "p99_ms")),
                row["errors"],
                _fmt(row["server_cpu_ms_per_request"]),
                _fmt(row["avg_batch"]),
                f"{row['clean_rounds']}/{row['rounds']}",
            ]
            lines.append("| " + " | ".join(str(x) for x in cells) + " |")
    return lines


def markdown(result: dict[str, Any]) -> str:
    m, lim, st = result["machine"], result["limit"], result["settings"]
    lines = [
        f"Measured {result['date']} on {m['cpu']}, {m['cores']} cores ({m['os']}, Python {m['python']}); "
        f"device {result['device']}.",
        f"Checkpoint: {result['checkpoint']}. Upload: {result['image']}.",
        f"Each figure: median of {st['rounds']} rounds of {st['seconds']:g} s (after {st['warmup_s']:g} s "
        f"warm-up), servers alternating; a window with more than {st['noise_cores']:g} cores of other load "
        "is noisy and re-measured.",
        "" if not result.get("quick") else "**Quick smoke run: the figures mean nothing.**",
        "",
        f"**Limit** (no HTTP, batch {lim['batch']}): model only "
        + ", ".join(f"{v:g} img/s at {t} thread(s)" for t, v in lim["model_bmax_images_per_s"].items())
        + "; batch 1: "
        + ", ".join(f"{v:g} img/s at {t} thread(s)" for t, v in lim["model_b1_images_per_s"].items())
        + ". Pipeline (decode → preprocess → forward → PNG): "
        + ", ".join(f"{v:g} img/s ({k})" for k, v in lim["pipeline_images_per_s"].items())
        + f". **Pipeline limit: {lim['pipeline_limit']:g} img/s**"
        + (
            f" (the parallel figure is the median of {len(lim['parallel_samples'])} measurements across the "
            f"run: {', '.join(f'{x:g}' for x in lim['parallel_samples'])})"
            if len(lim.get("parallel_samples", [])) > 1
            else ""
        )
        + ". Per image (1 thread): "
        + ", ".join(f"{k} {v} ms" for k, v in lim["stage_ms_per_image_1_thread"].items())
        + ".",
        "",
        *_service_table(result["service"]),
        "",
        "Start-up to ready (in brackets the server's own CPU seconds for it): "
        + ", ".join(
            f"{s} {_fmt(v)} s ({_fmt(result['service'].get('startup_cpu_s', {}).get(s))})"
            for s, v in result["service"]["startup_s"].items()
        )
        + ".",
        "",
        "| target | value | goal | met |",
        "|---|---:|---|---|",
        *(
            f"| {t['target']} | {_fmt(t['value'])} | {t['goal']} | "
            f"{'–' if t['met'] is None else ('yes' if t['met'] else '**no**')} |"
            for t in result["targets"]
        ),
    ]
    if result.get("levers"):
        lines += [
            "",
            "Levers (our service, one setting changed; same rounds, alternating):",
            "",
            *_service_table(result["levers"]),
        ]
    train = result.get("training")
    if train:
        if "error" in train:
            lines += ["", f"Training: {train['error']}"]
        else:
            lines += [
                "",
                f"Training (default recipe, 1 epoch, {train['data']}, {train['images']} images, batch "
                f"{train['batch_size']}, {train['device']}): **{_fmt(train['images_per_s'])} images/s**, "
                f"{_fmt(train['epoch_seconds'])} s per epoch (of which training steps "
                f"{_fmt(train['train_seconds'])} s); the whole run took {_fmt(train['wall_seconds'])} s "
                f"({_fmt(train['outside_epoch_seconds'])} s outside the epoch: start-up, data loading from "
                "the decoded-image cache, or building it on the first run, plots, saving).",
            ]
    return "\n".join(lines) + "\n"


def update_readme(readme: Path, table: str) -> None:
    """Replace the block between the README's markers with the latest table."""
    text = readme.read_text()
    pattern = re.compile(re.escape(README_START) + r".*?" + re.escape(README_END), re.S)
    block = f"{README_START}\n{table}{README_END}"
    if pattern.search(text):
        readme.write_text(pattern.sub(lambda _: block, text))
