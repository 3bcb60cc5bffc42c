"""`python -m trainer` and `python -m trainer.evaluate` end to end on tiny runs: outputs, metadata,
--help, --if-missing, the time budget, and the exit-2 paths (bad input, read-only or full disk)."""

from __future__ import annotations

import errno
import io
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import carvae.checkpoint as ckpt_mod
import trainer.data as data_mod
import trainer.state as state_mod
import trainer.train as train_mod
from carvae.checkpoint import load_checkpoint
from trainer import evaluate as evaluate_mod
from trainer.__main__ import build_parser, main
from trainer.data import load_data, make_split, to_batch
from trainer.state import load_state, read_metrics

DOCUMENTED_FLAGS = (
    "--data --out --epochs --batch-size --image-size --latent-dim --channels --blocks-per-level "
    "--latent-grid --lr --prior "
    "--lr-schedule --lr-step-epoch --recipe --beta --kl-warmup-epochs --ema --seed --val-fraction --device "
    "--workers --threads --max-minutes --synthetic-count --augment --resize-policy --cache-dir --if-missing "
    "--resume "
    "--smoke --eval-every"
)
FAST = ["--no-progress", "--threads", "1", "--workers", "1"]
# A run of a fraction of a second: 24 synthetic cars at 16 px, 5 steps per epoch.
TINY_FLAGS = "--data synthetic --synthetic-count 24 --image-size 16 --channels 8,8 --latent-dim 8"
TINY = [*TINY_FLAGS.split(), "--batch-size", "4", "--warmup-steps", "2", "--epochs", "1", *FAST]
RUN_FILES = {"model.safetensors", "metrics.jsonl", "run.json", "train_state.pt"} | {
    f"{name}.png" for name in ("loss", "reconstructions", "samples")
}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory, cli_env: dict[str, str]) -> tuple[Path, str]:
    """One real `python -m trainer --smoke` in a subprocess, shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("smoke") / "run"
    cmd = [sys.executable, "-m", "trainer", "--smoke", "--out", str(out), *FAST]
    proc = subprocess.run(cmd, env=cli_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return out, proc.stdout


def _png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        img.load()
        return img.size


def test_help_documents_every_flag_with_its_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in DOCUMENTED_FLAGS.split():
        assert flag in text, flag
    options = [a for a in build_parser()._actions if a.option_strings and a.dest != "help"]
    assert text.count("(default:") == len(options)
    assert "sigma-vae" in text and "cosine" in text and "stretch" in text


def test_smoke_run_writes_every_file_with_full_metadata(smoke_run: tuple[Path, str]) -> None:
    out, stdout = smoke_run
    assert {p.name for p in out.iterdir()} >= RUN_FILES
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))
    assert "epoch 1/1" in stdout and "done: best epoch 1" in stdout
    rows = read_metrics(out)
    assert len(rows) == 1
    row = rows[0]
    keys = (
        "train_loss",
        "train_recon",
        "train_kl",
        "val_loss",
        "val_recon",
        "val_kl",
        "val_psnr",
        "val_ssim",
    )
    for key in (*keys, "seconds", "images_per_s", "lr"):
        assert isinstance(row[key], float) and np.isfinite(row[key]), key

    ck = load_checkpoint(out / "model.safetensors")
    t = ck.training
    assert t["complete"] and t["epochs_done"] == 1 and t["best_epoch"] == 1 and t["recipe"] == "sigma-vae"
    assert (
        t["data"]["source"] == "synthetic"
        and t["data"]["count"] == 48
        and len(t["data"]["fingerprint"]) == 64
    )
    assert t["split"]["seed"] == 0 and t["split"]["val"] == 5 and t["split"]["train"] == 43
    assert (
        t["best_val"]["psnr"] == pytest.approx(row["val_psnr"]) and t["final_val"]["ssim"] == row["val_ssim"]
    )
    assert t["torch_version"] and t["train_images_per_s"] > 0 and t["lr_schedule"]["kind"] == "wsd"
    # the calibrated decoder σ of the training set is stored for ELBO reporting
    assert float(ck.model.get_buffer("log_sigma")) == pytest.approx(t["log_sigma"]) != 0.0
    assert ck.policy.image_size == 64 and ck.policy.resize == "stretch"
    # The default prior is fitted to the training images' posterior means: in the encoder's coordinates
    # its mean is theirs, and the model's public coordinates standardise them.
    assert t["prior"] == "fitted" and ck.model.prior_is_fitted
    state = load_state(out)
    assert not torch.equal(state["best_weights"]["prior_loc"], ck.model.prior_loc)  # fitted at the end only

    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "complete" and run["config"]["synthetic_count"] == 48
    assert _png_size(out / "samples.png") == (8 * 66 + 2, 8 * 66 + 2)  # 8×8 grid of 64 px, 2 px padding
    assert _png_size(out / "reconstructions.png") == (5 * 66 + 2, 2 * 66 + 2)  # 5 val images over 2 rows
    assert _png_size(out / "loss.png")[0] > 500


def test_evaluate_prints_vae_and_pca_scores_as_json(smoke_run: tuple[Path, str], capsys) -> None:
    out, _ = smoke_run
    assert evaluate_mod.main(["--checkpoint", str(out / "model.safetensors"), "--data", "synthetic"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["data"]["matches_training"] and result["split"] == "val" and result["images"] == 5
    for key in ("psnr", "ssim", "elbo_nats_per_image"):
        assert set(result[key]) == {"mean", "median"}, key
    # the evaluator and the training loop compute the same validation PSNR
    assert result["psnr"]["mean"] == pytest.approx(read_metrics(out)[0]["val_psnr"], abs=1e-4)
    assert result["pca"]["k"] == 16 and result["pca"]["fit_on"] == "training split"
    assert result["pca"]["fit_images"] == 43 and set(result["pca"]["psnr"]) == {"mean", "median"}
    assert result["vae_minus_pca_psnr_db"] == pytest.approx(
        result["psnr"]["mean"] - result["pca"]["psnr"]["mean"]
    )
    assert np.isfinite(result["bits_per_dim"])

    args = [
        "--checkpoint",
        str(out / "model.safetensors"),
        "--data",
        "synthetic",
        "--split",
        "all",
        "--limit",
        "7",
    ]
    assert evaluate_mod.main([*args, "--no-pca"]) == 0
    limited = json.loads(capsys.readouterr().out)
    assert limited["images"] == 7 and "pca" not in limited


def test_evaluate_diagnostics_pca_curve_and_refined_latent(smoke_run: tuple[Path, str], capsys) -> None:
    out, _ = smoke_run
    ckpt = ["--checkpoint", str(out / "model.safetensors"), "--data", "synthetic"]
    assert evaluate_mod.main([*ckpt, "--pca-k", "4,16,30,500", "--refine-steps", "40"]) == 0
    result = json.loads(capsys.readouterr().out)
    # k = latent size (16) stays the baseline; the others are capped at the training images - 1 (42)
    assert result["pca"]["k"] == 16
    more = {p["k"]: p["psnr"]["mean"] for p in result["pca_more"]}
    assert sorted(more) == [4, 30, 42]
    assert more[4] < result["pca"]["psnr"]["mean"] < more[30] <= more[42] + 1e-6
    refined = result["refined_latent"]
    assert refined["steps"] == 40 and refined["images"] == result["images"] == 5
    # starts from the served reconstruction (through μ) and only gets closer to the image
    assert refined["gain_over_mu_db"] > 0.05
    assert refined["psnr"]["mean"] - refined["gain_over_mu_db"] == pytest.approx(
        result["psnr"]["mean"], abs=1e-4
    )

    for bad in (["--pca-k", "0"], ["--pca-k", "a,b"], ["--refine-steps", "-1"]):
        with pytest.raises(SystemExit) as exc:
            evaluate_mod.main([*ckpt, *bad])
        assert exc.value.code == 2
        assert f"argument {bad[0]}:" in capsys.readouterr().err


def test_refine_latents_leaves_the_model_as_it_was(smoke_run: tuple[Path, str]) -> None:
    out, _ = smoke_run
    model = load_checkpoint(out / "model.safetensors").model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(3, 3, 64, 64)
    start, refined = evaluate_mod.refine_latents(model, x, steps=20)
    assert torch.equal(start, model.reconstruct(x).detach())
    assert ((refined - x) ** 2).mean() < ((start - x) ** 2).mean()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(p.requires_grad for p in model.parameters())


def test_evaluate_on_foreign_data_and_bad_input(smoke_run: tuple[Path, str], tmp_path: Path, capsys) -> None:
    out, _ = smoke_run
    rng = np.random.default_rng(0)

    def photos(n: int) -> None:
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(buf, "PNG")
            (tmp_path / f"{i}.png").write_bytes(buf.getvalue())

    photos(6)
    assert evaluate_mod.main(["--checkpoint", str(out / "model.safetensors"), "--data", str(tmp_path)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert not result["data"]["matches_training"] and result["split"] == "all" and result["images"] == 6
    # fitted on the 6 images it scores, a 16-component PCA would reproduce them: no baseline, and why
    assert result["pca"] is None and result["vae_minus_pca_psnr_db"] is None
    assert result["pca_skipped"].startswith("only 6 images to fit the PCA on")
    photos(20)
    assert evaluate_mod.main(["--checkpoint", str(out / "model.safetensors"), "--data", str(tmp_path)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["pca"]["fit_on"].startswith("all images given") and result["pca"]["psnr"]["mean"] < 60
    # --limit scores fewer; the PCA is still fitted on every image given, and says so
    args = ["--checkpoint", str(out / "model.safetensors"), "--data", str(tmp_path), "--limit", "10"]
    assert evaluate_mod.main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 10 and result["pca"]["fit_images"] == 20
    assert result["pca"]["fit_on"].startswith("all images given")

    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"junk")
    assert evaluate_mod.main(["--checkpoint", str(junk), "--data", "synthetic"]) == 2
    assert capsys.readouterr().err.startswith("error: checkpoint")


def test_training_on_a_folder_records_the_source_and_skips_bad_files(tmp_path: Path, capsys) -> None:
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(20):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (30 + i, 60, 3), dtype=np.uint8)).save(buf, "JPEG")
        (photos / ("sub" if i % 2 else ".") / f"car{i:02d}.jpg").write_bytes(buf.getvalue())
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 a JPEG header, then nothing usable")
    args = ["--data", str(photos), "--out", str(tmp_path / "run"), "--image-size", "16", "--channels", "8,16"]
    assert main([*args, "--latent-dim", "8", "--batch-size", "8", "--epochs", "1", *FAST]) == 0
    assert "skipped 1 (1 corrupt_image)" in capsys.readouterr().out
    t = load_checkpoint(tmp_path / "run" / "model.safetensors").training
    assert t["data"]["source"] == "folder" and t["data"]["count"] == 20 and t["data"]["skipped"] == 1
    assert t["split"]["val"] == 2 and t["split"]["train"] == 18


def test_if_missing_exits_at_once_for_the_same_config_and_retrains_otherwise(
    smoke_run: tuple[Path, str], tmp_path: Path, capsys
) -> None:
    src, _ = smoke_run
    out = tmp_path / "run"
    shutil.copytree(src, out)
    ckpt = out / "model.safetensors"
    before = ckpt.stat().st_mtime_ns
    assert main(["--smoke", "--out", str(out), "--if-missing", *FAST]) == 0
    assert "nothing to do" in capsys.readouterr().out and ckpt.stat().st_mtime_ns == before

    assert main(["--smoke", "--out", str(out), "--if-missing", "--latent-dim", "8", *FAST]) == 0
    assert "configuration differs in latent_dim" in capsys.readouterr().out
    assert load_checkpoint(ckpt).config.latent_dim == 8


def test_prior_standard_keeps_n01_and_the_fit_matches_the_training_codes(tmp_path: Path) -> None:
    args = ["--smoke", "--epochs", "1", *FAST]
    assert main([*args, "--out", str(tmp_path / "std"), "--prior", "standard"]) == 0
    std = load_checkpoint(tmp_path / "std" / "model.safetensors")
    assert std.training["prior"] == "standard" and not std.model.prior_is_fitted
    assert main([*args, "--out", str(tmp_path / "fit")]) == 0
    fit = load_checkpoint(tmp_path / "fit" / "model.safetensors")
    # same seed, same weights: only the prior differs, and it is the Gaussian of the training codes
    for name, tensor in std.model.state_dict().items():
        if not name.startswith("prior_"):
            assert torch.equal(tensor, fit.model.state_dict()[name]), name
    data = load_data("synthetic", fit.policy, 48, 1, tmp_path / "cache", False)
    train_idx = make_split(len(data), 0.1, 0).train
    with torch.no_grad():
        codes = fit.model.encoder(to_batch(data.images, train_idx, torch.device("cpu"), False))[0]
    torch.testing.assert_close(fit.model.prior_loc, codes.mean(0), atol=1e-5, rtol=0)
    mu, _ = fit.model.encode(to_batch(data.images, train_idx, torch.device("cpu"), False))
    torch.testing.assert_close(mu.mean(0), torch.zeros_like(mu[0]), atol=1e-4, rtol=0)


def test_wsd_schedule_is_the_default_and_is_recorded(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main([*TINY, "--epochs", "5", "--lr", "1e-3", "--out", str(out)]) == 0
    lrs = [r["lr"] for r in read_metrics(out)]  # each epoch's last step's rate; 5 steps an epoch
    assert lrs[:4] == [pytest.approx(1e-3)] * 4  # the stable phase: 4 of the 5 epochs
    assert lrs[4] < 0.3e-3  # the decay: the last step of 25 is one step short of the floor (1e-5)
    schedule = load_checkpoint(out / "model.safetensors").training["lr_schedule"]
    assert schedule["kind"] == "wsd" and schedule["decay_fraction"] == 0.2 and schedule["planned_epochs"] == 5


def test_cosine_schedule_anneals_from_the_warm_up_on(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main([*TINY, "--epochs", "5", "--lr", "1e-3", "--lr-schedule", "cosine", "--out", str(out)]) == 0
    lrs = [r["lr"] for r in read_metrics(out)]
    assert 0.9e-3 < lrs[0] < 1e-3 and all(a > b for a, b in itertools.pairwise(lrs)) and lrs[4] < 0.05e-3
    schedule = load_checkpoint(out / "model.safetensors").training["lr_schedule"]
    assert schedule["kind"] == "cosine" and "decay_fraction" not in schedule


def test_time_budget_stops_after_the_epoch_that_reaches_it(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["--smoke", "--out", str(out), "--epochs", "5", "--max-minutes", "0.0001", *FAST]) == 0
    rows = read_metrics(out)
    assert len(rows) == 1 and rows[0]["val_psnr"] is not None
    t = load_checkpoint(out / "model.safetensors").training
    assert t["stopped_by_budget"] and t["epochs_done"] == 1 and t["epochs_requested"] == 5 and t["complete"]


def test_time_budget_counts_the_time_spent_writing_each_epochs_files(tmp_path: Path, monkeypatch) -> None:
    """Short epochs (a small photo folder) with slow per-epoch writes: the writes are part of the budget.
    They were not, and a run of many short epochs ran far past --max-minutes (40 photos, default model,
    --max-minutes 0.2: 20 s of training loop)."""
    real = train_mod.plots.write_loss

    def slow_write_loss(out: Path, rows: list[dict[str, object]]) -> None:
        time.sleep(0.25)
        real(out, rows)

    monkeypatch.setattr(train_mod.plots, "write_loss", slow_write_loss)
    out = tmp_path / "run"
    budget_s = 1.5
    args = [*TINY, "--epochs", "100", "--max-minutes", str(budget_s / 60), "--out", str(out)]
    t0 = time.perf_counter()
    assert main(args) == 0
    loop_s = time.perf_counter() - t0
    epochs = len(read_metrics(out))
    # Each epoch costs at least the 0.25 s write: no more than budget / 0.25 + the one that reaches it.
    assert epochs <= budget_s / 0.25 + 1, epochs
    assert loop_s < budget_s + 4, loop_s  # was ~30 epochs, ~8 s


# A progress bar's name as tqdm draws it ("epoch 1/5: 0%|", "epoch 1 (10 min budget): 0%|").
BAR_NAME = re.compile(r"epoch \d+(?:/\d+| \([^)]*\))(?=:)")


def _bars_and_summaries(captured: pytest.CaptureResult[str]) -> tuple[list[str], list[str]]:
    """The epoch names the progress bars showed (each once, in order) and the epoch summary lines."""
    bars = list(dict.fromkeys(BAR_NAME.findall(captured.err)))
    return bars, [line for line in captured.out.splitlines() if line.startswith("epoch ")]


def test_epoch_summary_and_progress_bar_agree_when_the_budget_replans(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    """The bar is drawn under the plan an epoch starts with, the summary came after --max-minutes had
    re-planned: bar "epoch 2/5", summary "epoch 2/4". Each summary names its epoch as its bar did, and
    says what the plan became. Before the first epoch a budget has no pace to plan from: its bar and
    summary showed the --epochs cap ("epoch 1/5", of a run planned at 4 after it; "epoch 1/100" of a
    29-minute run of 53) and now show the budget. The plans are scripted (4, 4, 3 after epochs 1, 2, 3):
    real ones follow the clock."""
    plans = {1: 4, 2: 4, 3: 3}  # epochs done -> the plan made after them
    monkeypatch.setattr(train_mod, "plan_epochs", lambda _max, done, *rest: plans[done])
    args = [*TINY_FLAGS.split(), "--batch-size", "4", "--threads", "1", "--workers", "1"]
    assert main([*args, "--epochs", "5", "--max-minutes", "10", "--out", str(tmp_path / "run")]) == 0
    bars, summaries = _bars_and_summaries(capsys.readouterr())
    assert bars == ["epoch 1 (10 min budget)", "epoch 2/4", "epoch 3/4"]
    assert [line.split("  ")[0] for line in summaries] == bars
    assert summaries[0].endswith(" | planned 4 epochs within the time budget")
    assert "planned" not in summaries[1]
    assert summaries[2].endswith(" | the time budget ends the run here")
    assert [r["epochs_planned"] for r in read_metrics(tmp_path / "run")] == [4, 4, 3]  # metrics: unchanged


def test_the_best_epochs_checkpoint_names_the_plan_made_after_it(tmp_path: Path, monkeypatch) -> None:
    """The checkpoint saved as a run goes (what a killed run leaves, and what the service and evaluate
    call "weights of epoch 1 of N planned") was written before the budget's re-plan: N was the --epochs
    cap."""
    plans = {1: 4, 2: 4, 3: 3}
    monkeypatch.setattr(train_mod, "plan_epochs", lambda _max, done, *rest: plans[done])
    saved: list[tuple[int, int]] = []
    save = train_mod._Run._save_checkpoint

    def recording(run: Any, model: Any, meta: dict[str, Any]) -> None:
        saved.append((meta["epochs_done"], meta["lr_schedule"]["planned_epochs"]))
        save(run, model, meta)

    monkeypatch.setattr(train_mod._Run, "_save_checkpoint", recording)
    args = [*TINY_FLAGS.split(), "--batch-size", "4", "--threads", "1", "--workers", "1", "--no-progress"]
    assert main([*args, "--epochs", "5", "--max-minutes", "10", "--out", str(tmp_path / "run")]) == 0
    during = [s for s in saved if s[0] < 3]  # the last epoch's is the finished run's, saved again at the end
    assert during and all(planned == plans[done] for done, planned in during), saved


@pytest.mark.parametrize(
    ("flags", "names"),
    [
        (["--epochs", "2"], ["epoch 1/2", "epoch 2/2"]),  # no budget: the plan is --epochs from the start
        (["--epochs", "1", "--max-minutes", "10"], ["epoch 1/1"]),  # a budget cannot lengthen one epoch
    ],
)
def test_epochs_of_a_known_plan_are_counted_against_it(
    tmp_path: Path, capsys, flags: list[str], names: list[str]
) -> None:
    args = [*TINY_FLAGS.split(), "--batch-size", "4", "--threads", "1", "--workers", "1", *flags]
    assert main([*args, "--out", str(tmp_path / "run")]) == 0
    bars, summaries = _bars_and_summaries(capsys.readouterr())
    assert bars == names
    assert [line.split("  ")[0] for line in summaries] == names
    assert not any("planned" in line for line in summaries)


def test_progress_bar_in_a_log_file_never_shows_a_stale_count(tmp_path: Path, capsys) -> None:
    """Logged (Docker, CI, `2> train.log`), the bar redraws every 30 s; the loss postfix set every ten
    batches forced a redraw anyway, with the count tqdm had last stored: lines like
    "epoch 2/3:   0%|  | 0/17 [00:19<?, ?batch/s, loss=-512.6 …]" for an epoch nearly done."""
    args = [*TINY_FLAGS.split(), "--synthetic-count", "48", "--batch-size", "1", "--warmup-steps", "2"]
    args += ["--epochs", "1", "--threads", "1", "--workers", "1", "--out", str(tmp_path / "run")]
    assert main(args) == 0
    err = capsys.readouterr().err  # pytest's capture is not a tty: the log-file case
    bars = re.findall(r"epoch 1/1:\s+\d+%\|[^|]*\| (\d+)/(\d+) \[[^\]]*\]", err)
    assert bars, err
    stale = [m.group(0) for m in re.finditer(r"epoch 1/1:[^\r\n]*\| 0/\d+ \[[^\]]*loss=[^\]]*\]", err)]
    assert not stale, stale[:2]


def _fail_writes(monkeypatch: pytest.MonkeyPatch, err: int, only: str | None = None) -> None:
    """Make the atomic writer fail (for one file name, or all) the way a full or read-only disk does."""
    real = state_mod.atomic_write_bytes

    def failing(path: os.PathLike[str], data: bytes) -> None:
        if only is None or Path(path).name == only:
            raise OSError(err, os.strerror(err))
        real(path, data)

    monkeypatch.setattr(state_mod, "atomic_write_bytes", failing)
    monkeypatch.setattr(ckpt_mod, "atomic_write_bytes", failing)


def test_read_only_output_folder_is_one_error_line_and_exit_2(tmp_path: Path, monkeypatch, capsys) -> None:
    _fail_writes(monkeypatch, errno.EROFS)
    out = tmp_path / "run"
    assert main(["--smoke", "--out", str(out), *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot write") and "Read-only file system" in err and "\n" not in err
    assert not out.exists()  # created by this run and left empty: removed


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_folder_for_real(tmp_path: Path, capsys) -> None:
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        assert main(["--smoke", "--out", str(out), *FAST]) == 2
        assert capsys.readouterr().err.startswith("error:") and not any(out.iterdir())
    finally:
        out.chmod(0o755)


@pytest.mark.parametrize("victim", ["train_state.pt", "model.safetensors", "samples.png"])
def test_full_disk_mid_run_keeps_every_file_whole(tmp_path: Path, monkeypatch, capsys, victim: str) -> None:
    out = tmp_path / "run"
    assert main(["--smoke", "--out", str(out), *FAST]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _fail_writes(monkeypatch, errno.ENOSPC, only=victim)
    assert main(["--resume", str(out), "--epochs", "2", *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("error: cannot write") and victim in err and "No space left" in err and "\n" not in err
    )
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    # the file that failed still holds its previous, complete version
    assert (out / victim).read_bytes() == before[victim]
    load_checkpoint(out / "model.safetensors")
    assert load_state(out)["progress"]["epochs_done"] in (1, 2)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "{tmp}/missing", "--out", "{tmp}/run"], "does not exist"),
        (["--out", "{tmp}/run"], "--data and --out are required"),
        (["--data", "synthetic", "--out", "{tmp}/run", "--augment", "rotate"], "unknown augmentation"),
        (["--data", "synthetic", "--out", "{tmp}/run", "--device", "tpu"], "unknown device"),
        (["--resume", "{tmp}/nothing"], "not a run folder"),
        # non-finite or absurd numbers fail here, not mid-run with a torch traceback
        (["--smoke", "--out", "{tmp}/run", "--max-minutes", "inf"], "must be finite"),
        (["--smoke", "--out", "{tmp}/run", "--lr", "inf"], "must be finite"),
        (["--smoke", "--out", "{tmp}/run", "--lr", "nan"], "must be finite"),
        (["--smoke", "--out", "{tmp}/run", "--lr", "1e300"], "learning rate must be in (0, 1]"),
        (["--smoke", "--out", "{tmp}/run", "--beta", "inf"], "must be finite"),
        (["--smoke", "--out", "{tmp}/run", "--kl-warmup-epochs", "inf"], "must be finite"),
        (["--smoke", "--out", "{tmp}/run", "--grad-clip", "inf"], "must be finite"),
        (["--smoke", "--out", "{tmp}/run", "--warmup-steps", "-1"], "warm-up steps must be >= 0"),
        (["--smoke", "--out", "{tmp}/run", "--lr-step-epoch", "-1"], "lr step epoch must be >= 0"),
        (["--smoke", "--out", ""], "--out must not be empty"),
        (["--data", "", "--out", "{tmp}/run"], "--data must not be empty"),
        (["--data", "{tmp}", "--out", "{tmp}"], "must not be the data folder"),
        (["--resume", "{tmp}/run", "--overwrite"], "cannot be combined with --resume"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(tmp_path: Path, capsys, args: list[str], message: str) -> None:
    assert main([a.replace("{tmp}", str(tmp_path)) for a in args] + FAST) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err
    assert not (tmp_path / "run").exists()  # nothing written, not even the folder


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # the synthetic cars are drawn at 16 px or more: said as a flag error, not "size must be …"
        (
            ["--data", "synthetic", "--image-size", "8"],
            "--image-size must be from 16 to 1024 with --data synthetic",
        ),
        (["--smoke", "--image-size", "8"], "--image-size must be from 16 to 1024 with --data synthetic"),
        (["--data", "synthetic", "--image-size", "48"], "--image-size must be a power of two >= 8, got 48"),
        (
            ["--data", "synthetic", "--channels", "12,16"],
            "--channels must be multiples of 8 (of 32 from 128 up), got (12, 16)",
        ),
        # GroupNorm's 32 groups cannot split 136: said before any data is read, naming the flag
        (["--smoke", "--channels", "32,64,136,256"], "--channels must be multiples of 8 (of 32 from 128 up)"),
        (
            ["--smoke", "--latent-grid", "4", "--latent-dim", "12"],
            "--latent-dim 12 is not a multiple of --latent-grid² = 16",
        ),
        (
            ["--smoke", "--latent-grid", "32"],
            "--latent-grid must be 1 or a power of two from 4 to --image-size/4 (16 at 64 px), got 32",
        ),
        (
            ["--smoke", "--latent-grid", "6", "--image-size", "128"],
            "from 4 to --image-size/4 (32 at 128 px), got 6",
        ),
        (["--smoke", "--latent-dim", "0"], "argument --latent-dim: expected an integer >= 1, got '0'"),
        (["--smoke", "--latent-grid", "0"], "argument --latent-grid: expected an integer >= 1, got '0'"),
        (
            ["--smoke", "--blocks-per-level", "-1"],
            "argument --blocks-per-level: expected an integer >= 0, got '-1'",
        ),
    ],
)
def test_a_model_shape_the_model_refuses_is_a_flag_error(
    tmp_path: Path, capsys, args: list[str], message: str
) -> None:
    """Errors named fields (latent_grid) or none at all (`--image-size 8` with synthetic data said "size
    must be an integer in [16, 1024]"): they are argparse errors naming the flags and the allowed values."""
    line = _usage_error(main, [*args, "--out", str(tmp_path / "run"), *FAST], capsys)
    assert line.startswith("python -m trainer: error: ") and message in line
    assert not (tmp_path / "run").exists()


def test_a_model_shape_change_on_resume_is_named_by_its_flag(
    smoke_run: tuple[Path, str], tmp_path: Path, capsys
) -> None:
    out = tmp_path / "run"
    shutil.copytree(smoke_run[0], out)
    line = _usage_error(main, ["--resume", str(out), "--image-size", "8", *FAST], capsys)
    assert "--image-size must be from 16 to 1024 with --data synthetic" in line


@pytest.mark.parametrize("data", ["missing", "no-images"])
def test_a_failed_start_leaves_no_run_folder_it_created(tmp_path: Path, capsys, data: str) -> None:
    """A fresh --out (and the folders above it that it needed) is gone after a failed start: `ls runs/`
    and the next --if-missing or --resume saw an empty run that never was."""
    (tmp_path / "no-images").mkdir()
    (tmp_path / "no-images" / "notes.txt").write_text("not a photo")
    out = tmp_path / "runs" / "new" / "run"
    args = [a for a in TINY if a not in ("--synthetic-count", "24")]
    args[args.index("synthetic")] = str(tmp_path / data)
    assert main([*args, "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("error:")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("held", [[], ["notes.txt"], ["sub/keep.txt"]])
def test_a_failed_start_leaves_a_folder_that_was_there_as_it_was(
    tmp_path: Path, capsys, held: list[str]
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    for name in held:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("the user's")
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    args = [a for a in TINY if a not in ("--synthetic-count", "24")]
    args[args.index("synthetic")] = str(tmp_path / "missing")
    assert main([*args, "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert out.is_dir() and sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before
    assert all((out / name).read_text() == "the user's" for name in held)


def test_resume_refuses_to_change_what_is_trained(
    smoke_run: tuple[Path, str], tmp_path: Path, capsys
) -> None:
    out = tmp_path / "run"
    shutil.copytree(smoke_run[0], out)
    assert main(["--resume", str(out), "--latent-dim", "32", *FAST]) == 2
    assert "--latent-dim cannot change on --resume" in capsys.readouterr().err
    assert load_state(out)["progress"]["epochs_done"] == 1


def _nan_loss_from_step(monkeypatch: pytest.MonkeyPatch, first: int, last: float = float("inf")) -> None:
    """Training steps `first`..`last` (0-based) get a NaN loss, so their gradients are non-finite."""
    real, calls = train_mod.vae_loss, [0]

    def vae_loss(*args: object, **kwargs: object) -> object:
        terms = real(*args, **kwargs)  # type: ignore[arg-type]
        if first <= calls[0] <= last:
            terms.loss = terms.loss * float("nan")
        calls[0] += 1
        return terms

    monkeypatch.setattr(train_mod, "vae_loss", vae_loss)


def test_an_epoch_without_one_finite_step_is_a_divergence(tmp_path: Path, monkeypatch, capsys) -> None:
    # 5 steps per epoch never reach the 20-in-a-row limit; the run must still stop with exit 1, not crash.
    _nan_loss_from_step(monkeypatch, 0)
    assert main([*TINY, "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err.strip()
    assert (
        err == "error: training diverged: every step of epoch 1 had non-finite gradients; lower --lr or "
        "raise --warmup-steps"
    )


def test_non_finite_steps_in_a_row_are_counted_across_epochs(tmp_path: Path, monkeypatch, capsys) -> None:
    # batch 1: 21 steps per epoch; steps 12-31 (the last 9 of epoch 1, the first 11 of epoch 2) are bad.
    _nan_loss_from_step(monkeypatch, 12, 31)
    args = [*TINY, "--batch-size", "1", "--epochs", "3", "--out", str(tmp_path / "run")]
    assert main(args) == 1
    assert "20 steps in a row had non-finite gradients (epoch 2)" in capsys.readouterr().err


def test_a_nan_validation_loss_never_stays_the_best_epoch(tmp_path: Path, monkeypatch) -> None:
    real, calls = train_mod.validation_summary, [0]

    def nan_first(*args: object, **kwargs: object) -> dict[str, float]:
        val = real(*args, **kwargs)  # type: ignore[arg-type]
        calls[0] += 1
        return {**val, "loss": float("nan")} if calls[0] == 1 else val

    monkeypatch.setattr(train_mod, "validation_summary", nan_first)
    out = tmp_path / "run"
    assert main([*TINY, "--epochs", "2", "--out", str(out)]) == 0
    t = load_checkpoint(out / "model.safetensors").training
    assert t["best_epoch"] == 2 and np.isfinite(t["best_val"]["loss"])
    assert [r["best"] for r in read_metrics(out)] == [True, True]


def test_a_prior_that_cannot_be_fitted_falls_back_to_n01(tmp_path: Path, capsys) -> None:
    # 2 images: 1 in training, so the fitted prior has a single code and no covariance.
    out = tmp_path / "run"
    assert main([*TINY, "--synthetic-count", "2", "--out", str(out)]) == 0
    assert "cannot fit the sampling prior (a prior needs at least 2" in capsys.readouterr().out
    ck = load_checkpoint(out / "model.safetensors")
    assert ck.training["complete"] and ck.training["prior"] == "standard" and not ck.model.prior_is_fitted
    assert "at least 2" in ck.training["prior_fit_error"]
    assert json.loads((out / "run.json").read_text())["status"] == "complete"


def _photos(folder: Path, n: int) -> list[str]:
    """n small random PNGs in folder; returns TINY with --data pointing there."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    args = [a for a in TINY if a not in ("--synthetic-count", "24")]
    args[args.index("synthetic")] = str(folder)
    return args


def test_an_8_px_run_is_validated_and_finishes(tmp_path: Path) -> None:
    # 8 px is smaller than SSIM's 11×11 window, which validation uses after every epoch
    out = tmp_path / "run"
    tiny = _photos(tmp_path / "photos", 12)
    assert main([*tiny, "--image-size", "8", "--channels", "8", "--out", str(out)]) == 0
    assert -1 <= read_metrics(out)[0]["val_ssim"] <= 1  # scored (random photos: near 0)


def test_a_fresh_run_never_replaces_a_run_it_was_not_told_to(
    smoke_run: tuple[Path, str], tmp_path: Path, capsys
) -> None:
    out = tmp_path / "run"
    shutil.copytree(smoke_run[0], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # forgetting --resume, or reusing a finished run's folder: refused, nothing touched
    assert main(["--smoke", "--out", str(out), *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"error: {out} already holds a run (train_state.pt, model.safetensors); continue or extend it with "
        f"--resume {out}, or pass --overwrite to replace it"
    )
    # --overwrite with a mistyped --data: the old resume point is only dropped once the data has loaded
    assert main(["--data", str(tmp_path / "typo"), "--out", str(out), "--overwrite", *FAST]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # --overwrite with good data: a new run replaces the old one
    assert main(["--smoke", "--out", str(out), "--seed", "1", "--overwrite", *FAST]) == 0
    assert load_checkpoint(out / "model.safetensors").training["seed"] == 1
    assert load_state(out)["config"]["seed"] == 1


def test_a_run_folder_inside_the_data_folder_is_not_training_data(tmp_path: Path, capsys) -> None:
    photos = tmp_path / "photos"
    tiny = _photos(photos, 12)
    out = photos / "run"  # its loss.png, samples.png, … land among the photos
    assert main([*tiny, "--out", str(out)]) == 0
    assert (out / "loss.png").is_file()
    capsys.readouterr()
    assert main(["--resume", str(out), "--epochs", "2", *FAST]) == 0, capsys.readouterr().err
    t = load_checkpoint(out / "model.safetensors").training
    assert t["epochs_done"] == 2 and t["data"]["count"] == 12


def test_the_runs_own_folder_inside_the_data_is_never_training_data(tmp_path: Path, capsys) -> None:
    """`--data photos --out photos/sedans`, sedans already holding photos: the first run trained on them
    (they were no run's folder yet), every later scan skipped them as one. So the data changed under the
    run: --if-missing retrained (a different fingerprint), --resume refused ("different data") and
    evaluate did not recognise the training data. The run's own folder is now never scanned."""
    photos = tmp_path / "photos"
    tiny = _photos(photos, 12)
    out = photos / "sedans"
    _photos(out, 4)
    args = [*tiny, "--out", str(out)]
    assert main(args) == 0
    said = capsys.readouterr().out
    assert said.count(f"data: skipping {out} (this run's --out folder, not photos)") == 1
    assert load_checkpoint(out / "model.safetensors").training["data"]["count"] == 12
    assert main([*args, "--if-missing"]) == 0
    assert "nothing to do (--if-missing)" in capsys.readouterr().out
    assert main(["--resume", str(out), "--epochs", "2", *FAST]) == 0, capsys.readouterr().err
    said = capsys.readouterr().out
    assert said.count(f"data: skipping {out} (this run's --out folder, not photos)") == 1
    t = load_checkpoint(out / "model.safetensors").training
    assert t["epochs_done"] == 2 and t["data"]["count"] == 12
    assert evaluate_mod.main(["--checkpoint", str(out / "model.safetensors"), "--data", str(photos)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["data"]["matches_training"] and result["split"] == "val"
    # evaluate leaves out the checkpoint's own folder too, also where no run file marks it as a run's
    kept = photos / "kept"
    _photos(kept, 3)
    (out / "model.safetensors").rename(kept / "best.safetensors")
    assert evaluate_mod.main(["--checkpoint", str(kept / "best.safetensors"), "--data", str(photos)]) == 0
    assert json.loads(capsys.readouterr().out)["data"]["matches_training"]


def _usage_error(run: Any, args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The stderr of a command that refused its arguments the way argparse does: exit 2, usage line."""
    with pytest.raises(SystemExit) as e:
        run(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: python -m trainer") and "Traceback" not in err
    return err.splitlines()[-1]


@pytest.mark.parametrize(
    ("flag", "low"), [("--batch-size", 1), ("--limit", 1), ("--workers", 1), ("--refine-steps", 0)]
)
def test_evaluate_refuses_a_count_below_its_minimum(
    tiny_checkpoint: Path, capsys, flag: str, low: int
) -> None:
    for bad in (str(low - 1), "-5"):
        args = ["--checkpoint", str(tiny_checkpoint), "--data", "synthetic", "--no-pca", flag, bad]
        line = _usage_error(evaluate_mod.main, args, capsys)
        said = f"argument {flag}: expected an integer >= {low}, got '{bad}'"
        assert line == f"python -m trainer.evaluate: error: {said}"


def test_workers_means_the_same_in_both_commands(tmp_path: Path, tiny_checkpoint: Path, capsys) -> None:
    """--workers 0 was refused by the trainer (one line naming no flag) and accepted by evaluate (it
    decoded in-process, as 1 does). Both refuse it now, alike, and say what 1 means."""
    trainer_line = _usage_error(main, ["--smoke", "--out", str(tmp_path / "run"), "--workers", "0"], capsys)
    assert trainer_line == "python -m trainer: error: argument --workers: expected an integer >= 1, got '0'"
    assert not (tmp_path / "run").exists()
    evaluate_args = ["--checkpoint", str(tiny_checkpoint), "--data", "synthetic", "--workers", "0"]
    evaluate_line = _usage_error(evaluate_mod.main, evaluate_args, capsys)
    assert evaluate_line.split(": ", 1)[1] == trainer_line.split(": ", 1)[1]
    helps = [
        next(a.help for a in parser._actions if a.dest == "workers")
        for parser in (build_parser(), evaluate_mod.build_parser())
    ]
    assert helps[0] == helps[1] and "1: decode in this process" in helps[0]


@pytest.mark.parametrize("flag", ["--data", "--cache-dir", "--checkpoint"])
def test_evaluate_refuses_an_empty_path_as_the_trainer_does(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch, capsys, flag: str
) -> None:
    """Path('') is the current directory: an unset variable in `--data "$PHOTOS"` scored whatever folder
    the command ran in, and `--cache-dir "$CACHE"` wrote the decode cache's .npy files into it."""
    here = tmp_path / "cwd"
    here.mkdir()
    Image.fromarray(np.zeros((24, 24, 3), np.uint8)).save(here / "a.png")
    Image.fromarray(np.ones((24, 24, 3), np.uint8)).save(here / "b.png")
    monkeypatch.chdir(here)
    paths = {"--checkpoint": str(tiny_checkpoint), "--data": str(here), "--cache-dir": str(tmp_path / "c")}
    paths[flag] = ""
    args = [arg for item in paths.items() for arg in item]
    assert evaluate_mod.main([*args, "--workers", "1", "--no-pca"]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"error: {flag} must not be empty\n" and captured.out == ""
    assert sorted(p.name for p in here.iterdir()) == ["a.png", "b.png"]


def test_evaluate_into_a_reader_that_stops_early_is_no_traceback(
    tiny_checkpoint: Path, cli_env: dict[str, str]
) -> None:
    """`python -m trainer.evaluate ... | head`: the reader closes the pipe before the JSON is written.
    That ended in a BrokenPipeError traceback, and another one while Python flushed stdout at exit."""
    cmd = [sys.executable, "-m", "trainer.evaluate", "--checkpoint", str(tiny_checkpoint)]
    cmd += ["--data", "synthetic", "--limit", "2", "--no-pca", "--workers", "1", "--device", "cpu"]
    read, write = os.pipe()
    os.close(read)  # a reader that has already gone
    try:
        proc = subprocess.run(cmd, env=cli_env, stdout=write, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


def test_evaluate_ctrl_c_is_one_line_and_status_130(tiny_checkpoint: Path, monkeypatch, capsys) -> None:
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate_mod, "score_images", interrupted)
    args = ["--checkpoint", str(tiny_checkpoint), "--data", "synthetic", "--limit", "2"]
    try:
        status = evaluate_mod.main(args)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped as a KeyboardInterrupt traceback")
    assert status == 130
    captured = capsys.readouterr()
    assert captured.err.endswith("interrupted\n") and "Traceback" not in captured.err and captured.out == ""


REAL_TRAIN_EPOCH = train_mod._Run.train_epoch


def _interrupt_at_epoch(monkeypatch: pytest.MonkeyPatch, epoch: int) -> None:
    """Ctrl-C at the start of (0-based) `epoch`."""

    def train_epoch(self: train_mod._Run, e: int) -> tuple[dict[str, float], int]:
        if e == epoch:
            raise KeyboardInterrupt
        return REAL_TRAIN_EPOCH(self, e)

    monkeypatch.setattr(train_mod._Run, "train_epoch", train_epoch)


def test_ctrl_c_suggests_resume_only_when_there_is_a_resume_point(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    out = tmp_path / "run"
    _interrupt_at_epoch(monkeypatch, 0)
    assert main([*TINY, "--epochs", "2", "--out", str(out)]) == 130
    assert (
        capsys.readouterr().err == f"interrupted before an epoch was completed; nothing to resume in {out}\n"
    )
    _interrupt_at_epoch(monkeypatch, 1)
    assert main([*TINY, "--epochs", "2", "--out", str(out), "--overwrite"]) == 130
    assert capsys.readouterr().err == f"interrupted; continue with: python -m trainer --resume {out}\n"
    assert main(["--resume", str(out), *FAST]) == 130  # the suggestion is a command that resumes
    assert "resuming after epoch 1" in capsys.readouterr().out


def test_if_missing_continues_a_stopped_run_of_the_same_configuration(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    """`make run` and the compose trainer use --if-missing: a run stopped after an epoch (Ctrl-C,
    `docker compose down`) goes on from there instead of starting over."""
    out = tmp_path / "run"
    args = [*TINY, "--epochs", "3", "--out", str(out), "--if-missing"]
    _interrupt_at_epoch(monkeypatch, 1)
    assert main(args) == 130
    monkeypatch.setattr(train_mod._Run, "train_epoch", REAL_TRAIN_EPOCH)
    capsys.readouterr()
    assert main(args) == 0
    said = capsys.readouterr().out
    assert "continuing the unfinished run of this configuration" in said
    assert "resuming after epoch 1" in said
    assert [r["epoch"] for r in read_metrics(out)] == [1, 2, 3]
    assert load_checkpoint(out / "model.safetensors").training["complete"]
    assert main(args) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_if_missing_continues_a_stopped_run_that_has_not_validated_yet(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    """With --eval-every N the first model.safetensors comes with epoch N. A run stopped before it was
    judged by its missing model ("other"), and --if-missing threw its completed epochs away."""
    out = tmp_path / "run"
    args = [*TINY, "--epochs", "3", "--eval-every", "3", "--out", str(out), "--if-missing"]
    _interrupt_at_epoch(monkeypatch, 2)
    assert main(args) == 130
    assert not (out / "model.safetensors").exists() and (out / "train_state.pt").is_file()
    monkeypatch.setattr(train_mod._Run, "train_epoch", REAL_TRAIN_EPOCH)
    capsys.readouterr()
    assert main(args) == 0
    said = capsys.readouterr().out
    assert "continuing the unfinished run of this configuration" in said
    assert "resuming after epoch 2" in said
    assert [r["epoch"] for r in read_metrics(out)] == [1, 2, 3]
    # Another configuration is still not continued: it trains afresh, replacing the resume point.
    _interrupt_at_epoch(monkeypatch, 2)
    assert main(args) == 0  # complete now: nothing to do
    assert main([*args[:-1], "--overwrite", "--seed", "1"]) == 130
    capsys.readouterr()
    monkeypatch.setattr(train_mod._Run, "train_epoch", REAL_TRAIN_EPOCH)
    assert main([*args, "--seed", "2"]) == 0
    said = capsys.readouterr().out
    assert "configuration differs in seed" in said and "fresh start" in said


def test_if_missing_trains_afresh_when_a_stopped_runs_resume_point_is_unusable(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    out = tmp_path / "run"
    args = [*TINY, "--epochs", "2", "--out", str(out), "--if-missing"]
    _interrupt_at_epoch(monkeypatch, 1)
    assert main(args) == 130
    monkeypatch.setattr(train_mod._Run, "train_epoch", REAL_TRAIN_EPOCH)
    (out / "train_state.pt").write_bytes(b"not a state")
    capsys.readouterr()
    assert main(args) == 0
    said = capsys.readouterr().out
    assert "training afresh" in said
    assert [r["epoch"] for r in read_metrics(out)] == [1, 2]
    assert load_checkpoint(out / "model.safetensors").training["complete"]


def test_evaluate_renders_only_the_synthetic_cars_it_uses(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    rendered: list[int] = []
    real = data_mod._synthetic_chunk

    def chunk(args: tuple[int, int, int]) -> np.ndarray:
        rendered.extend(range(args[0], args[0] + args[1]))
        return real(args)

    monkeypatch.setattr(data_mod, "_synthetic_chunk", chunk)
    args = ["--checkpoint", str(tiny_checkpoint), "--data", "synthetic", "--cache-dir", str(tmp_path)]
    assert evaluate_mod.main([*args, "--limit", "2", "--no-pca", "--workers", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 2 and rendered == [0, 1]
    # the scores are those of the same cars in the whole set (which the PCA baseline needs)
    rendered.clear()
    whole = evaluate_mod.evaluate(tiny_checkpoint, "synthetic", limit=2, device="cpu", cache_dir=tmp_path)
    assert sorted(rendered) == list(range(16)) and whole["pca"]["fit_images"] == 16
    part = evaluate_mod.evaluate(tiny_checkpoint, "synthetic", limit=2, pca=False, device="cpu")
    assert part["psnr"] == whole["psnr"] and part["ssim"] == whole["ssim"]


def test_sigterm_stops_a_real_run_like_ctrl_c(tmp_path: Path, cli_env: dict[str, str]) -> None:
    """`docker stop` sends SIGTERM: status 130 and the resume hint, the completed epochs kept."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "trainer", *TINY_FLAGS.split(), "--batch-size", "4", "--epochs", "500"]
    proc = subprocess.Popen(
        [*cmd, *FAST, "--out", str(out)],
        env=cli_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        seen = ""
        while "epoch 2/" not in seen:  # epoch 1 is complete: there is a resume point
            line = proc.stdout.readline()
            assert line, f"the trainer ended early: {seen}"
            seen += line
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert f"interrupted; continue with: python -m trainer --resume {out}" in err
    assert "Traceback" not in err
    assert (out / "train_state.pt").is_file()


def test_evaluate_says_when_the_checkpoint_is_from_an_unfinished_run(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    """A run stopped before its last planned epoch leaves the best epoch so far in model.safetensors: its
    figures are not the run's, and evaluate says so (stderr and `training_run`), and says nothing once the
    run is finished."""
    out = tmp_path / "run"
    _interrupt_at_epoch(monkeypatch, 1)
    assert main([*TINY, "--epochs", "2", "--out", str(out)]) == 130
    capsys.readouterr()
    ckpt = str(out / "model.safetensors")
    args = ["--checkpoint", ckpt, "--data", "synthetic", "--no-pca", "--workers", "1"]
    assert evaluate_mod.main(args) == 0
    captured = capsys.readouterr()
    run = json.loads(captured.out)["training_run"]
    assert run == {
        "complete": False,
        "epochs_done": 1,
        "epochs_planned": 2,
        "best_epoch": 1,
        "stopped_by_budget": None,
    }
    assert captured.err.startswith(f"warning: {ckpt} is from a run that did not finish")
    assert "epoch 1 of 2 planned" in captured.err and f"--resume {out}" in captured.err

    monkeypatch.setattr(train_mod._Run, "train_epoch", REAL_TRAIN_EPOCH)
    assert main(["--resume", str(out), *FAST]) == 0
    capsys.readouterr()
    assert evaluate_mod.main(args) == 0
    captured = capsys.readouterr()
    run = json.loads(captured.out)["training_run"]
    assert run["complete"] is True and run["epochs_done"] == 2 and run["stopped_by_budget"] is False
    assert "warning" not in captured.err


def test_a_checkpoint_saved_mid_run_does_not_claim_the_budget_stopped_it(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    """No --max-minutes, stopped after 1 of 3 epochs: the best-so-far checkpoint (shown on /v1/model and
    the web page's model card) said `stopped_by_budget: true`."""
    out = tmp_path / "run"
    _interrupt_at_epoch(monkeypatch, 1)
    assert main([*TINY, "--epochs", "3", "--out", str(out)]) == 130
    t = load_checkpoint(out / "model.safetensors").training
    assert not t["complete"] and t["epochs_done"] == 1 and t["max_minutes"] is None
    assert t["stopped_by_budget"] is False


def test_resume_from_another_directory_finds_relative_data(tmp_path: Path, monkeypatch, capsys) -> None:
    """run.json recorded --data as typed: a run started with `--data photos` could not be resumed from any
    other directory ("data folder photos does not exist")."""
    work = tmp_path / "work"
    args = _photos(work / "photos", 12)
    args[args.index(str(work / "photos"))] = "photos"
    monkeypatch.chdir(work)
    assert main([*args, "--out", "run", "--cache-dir", "cache"]) == 0
    monkeypatch.chdir(tmp_path)
    assert main(["--resume", str(work / "run"), "--epochs", "2", *FAST]) == 0, capsys.readouterr().err
    assert [r["epoch"] for r in read_metrics(work / "run")] == [1, 2]
    assert not (tmp_path / "cache").exists()  # the cache recorded in work/ is the one used

    # A run recorded with a relative path (older trainers), resumed where that path means nothing: it says
    # which folder is missing and how to name it.
    record = json.loads((work / "run" / "run.json").read_text())
    record["config"]["data"] = "photos"
    (work / "run" / "run.json").write_text(json.dumps(record))
    capsys.readouterr()
    assert main(["--resume", str(work / "run"), "--epochs", "3", *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: the data folder photos recorded in") and err.endswith(
        "pass --data DIR to name it"
    )
    assert main(["--resume", str(work / "run"), "--epochs", "3", "--data", "elsewhere", *FAST]) == 2
    assert (
        capsys.readouterr().err
        == f"error: data folder {tmp_path / 'elsewhere'} does not exist or is not a folder\n"
    )
    assert main(["--resume", str(work / "run"), "--epochs", "3", "--data", str(work / "photos"), *FAST]) == 0


def test_a_path_that_is_not_utf8_is_logged_not_fatal(tmp_path: Path, monkeypatch) -> None:
    """A run folder named with a Latin-1 byte (os.fsdecode gives a surrogate) under a strict UTF-8 stdout,
    as in an en_US.UTF-8 locale: the first log line naming it raised UnicodeEncodeError and the run ended
    with "error: 'utf-8' codec can't encode character '\\udce9'"."""
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")
    monkeypatch.setattr(sys, "stdout", stdout)
    out = tmp_path / os.fsdecode(b"caf\xe9")
    assert main([*TINY, "--out", str(out)]) == 0
    assert (out / "model.safetensors").is_file()
    stdout.flush()
    assert "caf\\udce9" in stdout.buffer.getvalue().decode()  # type: ignore[attr-defined]
