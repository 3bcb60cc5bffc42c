"""Loss-recipe comparison: the same data, model, seed and time budget, trained side by side.

Each recipe runs as its own `python -m trainer` process with one torch thread, all at the same time, so
they share the machine equally and the comparison is fair within one run. Each checkpoint is then scored
with `python -m trainer.evaluate` on its recorded validation split.

    python -m bench.recipes --data ../shared/datasets/stanford-cars-dev/images --minutes 6

Writes bench/results/recipes.json and recipes.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

RECIPES: dict[str, list[str]] = {
    "sigma-vae, beta 1": ["--recipe", "sigma-vae", "--beta", "1"],
    "sigma-vae, beta 0.25": ["--recipe", "sigma-vae", "--beta", "0.25"],
    "mse + KLD (seeds)": ["--recipe", "mse", "--beta", "1"],
}
EVAL = [sys.executable, "-m", "trainer.evaluate"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.recipes",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", required=True, help="image folder (or 'synthetic')")
    p.add_argument("--minutes", type=float, default=6.0, help="training budget per recipe")
    p.add_argument("--out", default="runs/recipes", help="where the runs go")
    p.add_argument("--results", default="bench/results", help="where recipes.json/md go")
    p.add_argument("--report-only", action="store_true", help="rewrite recipes.md from recipes.json")
    args = p.parse_args(argv)
    if args.report_only:
        write_report(json.loads((Path(args.results) / "recipes.json").read_text()), Path(args.results))
        return 0

    out = Path(args.out)
    # The logs go beside --out, in its parent: on a fresh clone not even runs/ exists yet.
    out.mkdir(parents=True, exist_ok=True)
    procs = {}
    started = time.time()
    for i, (name, flags) in enumerate(RECIPES.items()):
        run_dir = out / f"r{i}"
        # --overwrite: a second sitting of the comparison replaces the first one's runs.
        cmd = [sys.executable, "-m", "trainer", "--data", args.data, "--out", str(run_dir), "--threads", "1"]
        cmd += ["--overwrite"]
        cmd += ["--max-minutes", str(args.minutes), "--no-progress", "--workers", "1", *flags]
        log = open(out.parent / f"{out.name}-r{i}.log", "w")  # noqa: SIM115 (closed after the wait below)
        procs[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), run_dir, log)
    rows = []
    for name, (proc, run_dir, log) in procs.items():
        rc = proc.wait()
        log.close()
        if rc != 0:
            print(f"{name}: trainer exited {rc}", file=sys.stderr)
            continue
        ev = subprocess.run(
            [*EVAL, "--checkpoint", str(run_dir / "model.safetensors"), "--data", args.data, "--no-pca"],
            capture_output=True,
            text=True,
            check=True,
        )
        scores = json.loads(ev.stdout)
        epochs = len((run_dir / "metrics.jsonl").read_text().splitlines())
        rows.append({"recipe": name, "flags": " ".join(RECIPES[name]), "epochs": epochs, **scores})
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "minutes_per_recipe": args.minutes,
        "wall_seconds": round(time.time() - started),
        "rows": rows,
    }
    res = Path(args.results)
    res.mkdir(parents=True, exist_ok=True)
    (res / "recipes.json").write_text(json.dumps(result, indent=2))
    write_report(result, res)
    return 0


def write_report(result: dict, res: Path) -> None:
    rows = result["rows"]
    lines = [
        f"Recipes side by side, {result['minutes_per_recipe']:g} min each, 1 thread each, "
        f"run {result['date']}",
        "",
        "| recipe | flags | epochs | val PSNR mean (dB) | val SSIM mean | KL (nats/image) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['recipe']} | `{r['flags']}` | {r['epochs']} | {_get(r, 'psnr')} | {_get(r, 'ssim')} | "
            f"{_get(r, 'kl_nats_per_image')} |"
        )
    (res / "recipes.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _get(row: dict, key: str) -> str:
    v = row.get(key)
    if isinstance(v, dict):
        v = v.get("mean")
    return f"{v:.2f}" if isinstance(v, float) else str(v)


if __name__ == "__main__":
    raise SystemExit(main())
