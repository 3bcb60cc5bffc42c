"""--resume: a resumed run equals an uninterrupted one, and a run killed with SIGKILL mid-epoch continues."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from carvae.checkpoint import load_checkpoint
from trainer.__main__ import main
from trainer.cli import duration
from trainer.state import load_state, read_metrics

TINY = "--data synthetic --synthetic-count 64 --image-size 16 --channels 8,16 --latent-dim 8 --batch-size 16"
TINY_ARGS = [*TINY.split(), "--warmup-steps", "2", "--no-progress", "--threads", "1", "--workers", "1"]


@pytest.mark.parametrize("ema", ["0", "0.9"])
def test_resumed_run_equals_the_uninterrupted_run(tmp_path: Path, capsys, ema: str) -> None:
    straight, split = tmp_path / "straight", tmp_path / "split"
    args = [*TINY_ARGS, "--epochs", "3", "--ema", ema]
    assert main([*args, "--out", str(straight)]) == 0
    # The first segment must plan the same 3 epochs (the cosine length depends on it); --max-minutes is a
    # stand-in for an interruption that leaves the plan intact: stop after epoch 1 through a tiny budget,
    # then resume with the budget lifted.
    assert main([*args, "--out", str(split), "--max-minutes", "0.00001"]) == 0
    assert len(read_metrics(split)) == 1
    capsys.readouterr()
    assert main(["--resume", str(split), "--max-minutes", "1000", "--no-progress"]) == 0
    assert "resuming after epoch 1" in capsys.readouterr().out

    a, b = load_state(straight), load_state(split)
    assert a["progress"]["step"] == b["progress"]["step"] == 3 * 3
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    # The saved (best) weights match too: with --ema they are the moving average, resumed with the rest.
    for name, tensor in a["best_weights"].items():
        assert torch.equal(tensor, b["best_weights"][name]), name
    rows_a, rows_b = read_metrics(straight), read_metrics(split)
    assert [r["epoch"] for r in rows_b] == [1, 2, 3]
    for ra, rb in zip(rows_a[1:], rows_b[1:], strict=True):
        assert (
            ra["train_loss"] == rb["train_loss"] and ra["val_psnr"] == rb["val_psnr"] and ra["lr"] == rb["lr"]
        )


def test_ema_weights_are_what_is_validated_and_saved(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main([*TINY_ARGS, "--epochs", "2", "--ema", "0.9", "--out", str(out)]) == 0
    state = load_state(out)
    raw, ema = state["model"], state["ema"]
    # The average lags the raw weights: they differ, and the checkpoint holds the average, not the raw.
    saved = load_checkpoint(out / "model.safetensors").model.state_dict()
    weight = "encoder.fc_mu.weight"
    assert not torch.equal(raw[weight], ema[f"module.{weight}"])
    assert state["progress"]["best_epoch"] == 2  # so the checkpoint holds the last epoch's average
    assert torch.equal(saved[weight], ema[f"module.{weight}"])
    assert ema["n_averaged"].item() == state["progress"]["step"]
    # The calibrated σ is measured per epoch on the raw model and copied, not averaged.
    assert saved["log_sigma"] == raw["log_sigma"]


def test_resume_can_extend_a_finished_run(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main([*TINY_ARGS, "--epochs", "1", "--out", str(out)]) == 0
    capsys.readouterr()
    # Without a larger --epochs there is nothing to do, and it says so (it only re-wrote the files).
    assert main(["--resume", str(out), "--no-progress"]) == 0
    assert "nothing to train: the run has completed its 1 epochs; pass a larger --epochs to extend it" in (
        capsys.readouterr().out
    )
    assert len(read_metrics(out)) == 1
    assert main(["--resume", str(out), "--epochs", "2", "--no-progress"]) == 0
    assert [r["epoch"] for r in read_metrics(out)] == [1, 2]
    assert load_checkpoint(out / "model.safetensors").training["epochs_done"] == 2


def test_resume_of_a_run_whose_budget_is_spent_says_so(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main([*TINY_ARGS, "--epochs", "3", "--max-minutes", "0.00001", "--out", str(out)]) == 0
    assert len(read_metrics(out)) == 1
    capsys.readouterr()
    # A larger --epochs alone cannot extend it: the stored budget is spent.
    assert main(["--resume", str(out), "--epochs", "5", "--no-progress"]) == 0
    assert len(read_metrics(out)) == 1
    said = capsys.readouterr().out
    assert "nothing to train: the --max-minutes budget (1e-05 min) is spent after 1 epochs" in said
    # A second of training is said in seconds: "(0.0 min of training)" read as "nothing happened".
    assert re.search(r"after 1 epochs \(\d+\.\d s of training\)", said), said
    assert main(["--resume", str(out), "--max-minutes", "1000", "--no-progress"]) == 0
    assert "nothing to train" not in capsys.readouterr().out
    assert len(read_metrics(out)) == 5


@pytest.mark.parametrize(
    ("seconds", "said"), [(0.04, "0.0 s"), (3.26, "3.3 s"), (41.4, "41 s"), (59.6, "60 s"), (150, "2.5 min")]
)
def test_durations_are_said_in_seconds_below_a_minute(seconds: float, said: str) -> None:
    assert duration(seconds) == said


@pytest.mark.slow
def test_sigkill_mid_epoch_loses_at_most_that_epoch(tmp_path: Path, cli_env: dict[str, str]) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "trainer", "--data", "synthetic", "--synthetic-count", "320", "--image-size"]
    cmd += ["32", "--channels", "16,32,32", "--latent-dim", "16", "--batch-size", "16", "--epochs", "3"]
    cmd += ["--out", str(out), "--no-progress", "--threads", "1", "--workers", "1"]
    proc = subprocess.Popen(cmd, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        while not (out / "train_state.pt").exists() or not read_metrics(out):
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "epoch 1 did not finish in time"
            time.sleep(0.02)
        # a third of an epoch into epoch 2
        time.sleep(0.33 * read_metrics(out)[0]["seconds"])
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert [r["epoch"] for r in read_metrics(out)] == [1]  # epoch 2 was in flight: it is lost, nothing else
    assert load_state(out)["progress"]["epochs_done"] == 1
    assert json.loads((out / "run.json").read_text())["status"] == "running"

    cmd = [sys.executable, "-m", "trainer", "--resume", str(out), "--no-progress"]
    done = subprocess.run(cmd, env=cli_env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "resuming after epoch 1" in done.stdout and "epoch 2/3" in done.stdout
    assert [r["epoch"] for r in read_metrics(out)] == [1, 2, 3]
    t = load_checkpoint(out / "model.safetensors").training
    assert t["complete"] and t["epochs_done"] == 3
    assert json.loads((out / "run.json").read_text())["status"] == "complete"


@pytest.mark.parametrize(
    "content",
    [
        b"[]",
        b"{}",
        b'{"status": "running", "config": {"data": "synthetic", "epo',  # truncated
        b'{"config": []}',
        b'{"config": {"data": "synthetic", "epochs": "twelve"}}',
        b"\xff\xfe not UTF-8",
    ],
)
def test_a_damaged_run_json_is_one_line_naming_the_file(tmp_path: Path, capsys, content: bytes) -> None:
    run_file = tmp_path / "run.json"
    run_file.write_bytes(content)
    assert main(["--resume", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and str(run_file) in err and "damaged" in err and err.count("\n") == 1


def test_resume_refuses_fewer_epochs_than_already_done(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main([*TINY_ARGS, "--epochs", "2", "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["--resume", str(out), "--epochs", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"error: --epochs 1 is below the 2 epochs {out} has already completed; "
        "pass --epochs 2 or more to resume it\n"
    )
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_run_folder_another_trainer_is_using_is_refused(tmp_path: Path, capsys) -> None:
    """A --resume (or --overwrite) typed while the run still trains was accepted, and both processes wrote
    the same train_state.pt, model.safetensors and metrics.jsonl epoch after epoch."""
    import fcntl

    out = tmp_path / "run"
    assert main([*TINY_ARGS, "--epochs", "1", "--out", str(out)]) == 0  # and let go of the folder after
    state = (out / "train_state.pt").read_bytes()
    with (out / ".lock").open("a+") as held:  # what a trainer still running holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.truncate(0)
        held.write("4242\n")
        held.flush()
        capsys.readouterr()
        for args in (["--resume", str(out), "--epochs", "2"], [*TINY_ARGS, "--out", str(out), "--overwrite"]):
            assert main([*args, "--no-progress"]) == 2
            err = capsys.readouterr().err
            assert (
                err
                == f"error: {out} is in use by another trainer (pid 4242); wait for it to end or stop it\n"
            )
        assert (out / "train_state.pt").read_bytes() == state and len(read_metrics(out)) == 1
    assert main(["--resume", str(out), "--epochs", "2", "--no-progress"]) == 0
    assert len(read_metrics(out)) == 2
