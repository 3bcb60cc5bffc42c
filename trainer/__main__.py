"""`python -m trainer`: train a car VAE into RUN_DIR/model.safetensors. `--help` documents every flag.

Exit codes: 0 done (or --if-missing found a matching model), 1 training diverged, 2 bad arguments,
unusable data, an unwritable run folder, one that already holds a run or one another trainer is using
(one line on stderr), 130
interrupted by Ctrl-C or SIGTERM (resume with --resume once an epoch has completed).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from carvae import synthetic
from carvae.checkpoint import CheckpointError, load_checkpoint
from carvae.device import DeviceError
from carvae.losses import RECIPES
from carvae.model import ConfigError
from carvae.preprocess import RESIZE_POLICIES
from trainer.cli import WORKERS_HELP, HelpFormatter, int_at_least, refuse_empty_paths, setup_logging
from trainer.data import AUGMENTATIONS, CACHE_IDLE_S, CACHE_KEEP, DataError, data_fingerprint
from trainer.distributed import PRECISIONS, exit_process
from trainer.schedule import LR_SCHEDULES
from trainer.state import CHECKPOINT_FILE, RUN_FILE, STATE_FILE, OutputError, ResumeError, read_json
from trainer.train import PRIORS, TrainConfig, TrainingDiverged, train

DEFAULTS = TrainConfig()
# Flags a resumed run may change: how long and where it runs, never what it trains.
RESUMABLE = {
    "epochs",
    "max_minutes",
    "device",
    "precision",
    "workers",
    "threads",
    "eval_every",
    "cache_dir",
    "progress",
    "data",
}
SMOKE = {
    "data": "synthetic",
    "synthetic_count": 48,
    "epochs": 1,
    "batch_size": 16,
    "channels": (8, 16, 16, 16),
    "latent_dim": 16,
    "warmup_steps": 2,
}


def _channels(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(c) for c in text.split(",") if c.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m trainer",
        description="Train a convolutional VAE on car photos (or the embedded synthetic cars). Writes "
        "RUN_DIR/{model.safetensors, metrics.jsonl, loss.png, reconstructions.png, samples.png, run.json, "
        "train_state.pt}. Under torchrun, trains with DistributedDataParallel (--batch-size is per process).",
        formatter_class=HelpFormatter,
    )
    d = DEFAULTS
    io = p.add_argument_group("data and output")
    io.add_argument(
        "--data",
        default=None,
        metavar="DIR|synthetic",
        help="folder of images (searched recursively, linked folders too: jpg, jpeg, jfif, jpe, png, webp, "
        "bmp, gif, tif, tiff; hidden files and folders are skipped; other files, e.g. heic or avif, are "
        "counted in one log line and left out), or 'synthetic' for the procedural left-facing cars "
        "(default: none; required unless --resume)",
    )
    io.add_argument(
        "--out",
        default=None,
        metavar="RUN_DIR",
        help="run folder, created if needed (and removed again if a failed start leaves it empty); inside "
        "--data it is left out of the photos, and it cannot be --data itself (default: none; required "
        "unless --resume)",
    )
    io.add_argument(
        "--synthetic-count",
        type=int,
        default=d.synthetic_count,
        help="number of synthetic cars when --data synthetic",
    )
    io.add_argument(
        "--image-size",
        type=int,
        default=d.image_size,
        help=f"square training size in pixels (a power of two >= 8, from {synthetic.MIN_SIZE} to "
        f"{synthetic.MAX_SIZE} with --data synthetic; 64 "
        "and 128 are the tested settings)",
    )
    io.add_argument(
        "--resize-policy",
        choices=RESIZE_POLICIES,
        default=d.resize_policy,
        help="how non-square photos become square: stretch = the whole photo resized (no crop, no "
        "padding); recorded in the checkpoint and applied identically by the service",
    )
    io.add_argument("--val-fraction", type=float, default=d.val_fraction, help="seeded validation share")
    io.add_argument(
        "--augment",
        default="none",
        metavar="OPS",
        help=f"opt-in augmentations, comma-separated from {', '.join(AUGMENTATIONS)} (hflip is off by "
        "default: the reference data are all left-facing cars)",
    )
    io.add_argument(
        "--cache-dir",
        default=None,
        help="where decoded images are cached as .npy, one entry per set of photos (a changed file makes a "
        "new one), image size and resize policy (N×size²×3 bytes); writing one removes those beyond the "
        f"{CACHE_KEEP} most recently used that have not been used for {CACHE_IDLE_S / 60:.0f} minutes; "
        "delete the folder to clear it, it is rebuilt as needed (default: RUN_DIR/../.cache, shared by the "
        "runs beside RUN_DIR)",
    )
    io.add_argument("--workers", type=int_at_least(1), default=d.workers, help=WORKERS_HELP)

    m = p.add_argument_group("model")
    m.add_argument("--latent-dim", type=int_at_least(1), default=d.latent_dim, help="latent size")
    m.add_argument(
        "--channels",
        type=_channels,
        default=",".join(map(str, d.channels)),
        help="channels per resolution level, from size/2 down to 4×4 (stretched/cut to fit); multiples of 8, "
        "and of 32 from 128 up",
    )
    m.add_argument(
        "--blocks-per-level",
        type=int_at_least(0),
        default=d.blocks_per_level,
        help="residual blocks per level",
    )
    m.add_argument(
        "--latent-grid",
        type=int_at_least(1),
        default=d.latent_grid,
        help="1: the latent is one vector (fully connected bottleneck from 4×4); G (4, 8, …): a G×G map of "
        "latent-dim/G² channels reached by convolutions (the encoder stops at G×G)",
    )

    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=d.epochs, help="maximum number of epochs")
    o.add_argument("--batch-size", type=int, default=d.batch_size, help="images per step (per process)")
    o.add_argument("--lr", type=float, default=d.lr, help="peak Adam learning rate")
    o.add_argument(
        "--lr-schedule",
        choices=LR_SCHEDULES,
        default=d.lr_schedule,
        help="wsd: linear warm-up, --lr until the last fifth of the run, then linear to 1%% of --lr at the "
        "(budget-aware) end; cosine: linear warm-up then cosine to 1%% of --lr at the same end; step: --lr "
        "then --lr/10 from --lr-step-epoch on (the seed notebooks' recipe); constant",
    )
    o.add_argument(
        "--lr-step-epoch", type=int, default=d.lr_step_epoch, help="epoch of the drop for --lr-schedule step"
    )
    o.add_argument(
        "--warmup-steps",
        type=int,
        default=d.warmup_steps,
        help="linear LR warm-up steps for wsd and cosine (at most 10%% of the planned run; under "
        "--max-minutes a re-plan may shorten a warm-up still under way to fit, never lengthen it)",
    )
    o.add_argument(
        "--recipe",
        choices=RECIPES,
        default=d.recipe,
        help="loss: sigma-vae = Gaussian likelihood with optimal (calibrated) σ; mse = the seeds' "
        "summed MSE + KLD",
    )
    o.add_argument("--beta", type=float, default=d.beta, help="KL weight")
    o.add_argument(
        "--kl-warmup-epochs",
        type=float,
        default=d.kl_warmup_epochs,
        help="ramp the KL weight linearly from 0 to --beta over this many epochs (0 = no ramp)",
    )
    o.add_argument(
        "--grad-clip",
        type=float,
        default=d.grad_clip,
        help="clip the gradient norm at this multiple of its running average (0 = off)",
    )
    o.add_argument(
        "--ema",
        type=float,
        default=d.ema,
        help="decay of an exponential moving average of the weights, which is then what is validated and "
        "saved (e.g. 0.998; 0 = off)",
    )
    o.add_argument(
        "--prior",
        choices=PRIORS,
        default=d.prior,
        help="what samples are drawn from: fitted = a Gaussian fitted to the training images' posterior "
        "means after training (car-like samples; the model's latent coordinates are standardised to it), "
        "standard = N(0, I) as trained",
    )
    o.add_argument("--seed", type=int, default=d.seed, help="seed for the split, initialisation and noise")
    o.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="training time budget in minutes (data loading excluded): the run plans its epochs (and the "
        "learning-rate schedule) to end within it, re-plans after each epoch from the pace so far (the rate "
        "never rises again), and stops after the epoch that reaches it (default: no budget)",
    )
    o.add_argument(
        "--eval-every", type=int, default=d.eval_every, help="validate every N epochs (and the last)"
    )

    r = p.add_argument_group("run control")
    r.add_argument(
        "--device", default=d.device, help="auto, cpu, cuda, cuda:N or mps (auto prefers CUDA, then MPS)"
    )
    r.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=d.precision,
        help="bf16 = bfloat16 autocast for the forward pass (loss in fp32); auto = bf16 on CUDA GPUs and on "
        "CPUs with native bf16 (AVX512-BF16/AMX, about 1.5× faster here), else fp32",
    )
    r.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads per process (default: physical cores / processes on this machine; with cores "
        "busy with other work, fewer: threads that wait for a descheduled sibling at every op are slower "
        "than one)",
    )
    r.add_argument(
        "--resume",
        default=None,
        metavar="RUN_DIR",
        help="continue a stopped run from its last completed epoch (model, optimiser, schedule, "
        "data order); --epochs and --max-minutes may extend it",
    )
    r.add_argument(
        "--if-missing",
        action="store_true",
        help="exit 0 at once if RUN_DIR/model.safetensors is valid, complete and trained with this "
        "configuration; continue a stopped run of this configuration from its last completed epoch; "
        "otherwise train into RUN_DIR, replacing what is there",
    )
    r.add_argument(
        "--overwrite",
        action="store_true",
        help="start a fresh run in a RUN_DIR that already holds one (its model.safetensors or "
        "train_state.pt), replacing it; without this flag such a folder is refused",
    )
    r.add_argument(
        "--smoke",
        action="store_true",
        help="a few-second run for tests and CI: 48 synthetic cars, 1 epoch, a tiny model "
        "(explicit flags still win)",
    )
    r.add_argument(
        "--no-progress", action="store_true", help="no progress bars (epoch summaries still print)"
    )
    return p


def _explicit(argv: Sequence[str] | None) -> set[str]:
    """Names of the flags the user actually typed (so --smoke and --resume know what not to override)."""
    p = build_parser()
    for action in p._actions:
        action.default = argparse.SUPPRESS
    return set(vars(p.parse_args(argv)))


def _paths(args: argparse.Namespace) -> None:
    """The path flags as Paths, refused when empty."""
    refuse_empty_paths(args, ("data", "out", "resume", "cache_dir"))
    for name in ("out", "resume", "cache_dir"):
        if getattr(args, name) is not None:
            setattr(args, name, Path(getattr(args, name)))
    # run.json records the data and cache folders for --resume, which may be typed in another directory:
    # recorded as typed (relative), the data folder was then looked for there and not found.
    if args.data is not None and args.data != "synthetic":
        args.data = str(Path(args.data).absolute())
    if args.cache_dir is not None:
        args.cache_dir = args.cache_dir.absolute()


def _stored_config(run_dir: Path) -> dict[str, Any]:
    """The configuration run_dir/run.json recorded. A damaged file is one line naming it, not a traceback."""
    run_file = run_dir / RUN_FILE
    if not run_file.is_file():
        raise ResumeError(f"no {RUN_FILE} in {run_dir}: not a run folder this trainer can resume")
    try:
        record = read_json(run_file)
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise ResumeError(f"cannot read {run_file} ({e}); it is damaged, start a new run") from None
    stored = record.get("config") if isinstance(record, dict) else None
    if not isinstance(stored, dict) or "data" not in stored:
        raise ResumeError(f"{run_file} is damaged (it holds no run configuration); start a new run")
    try:
        TrainConfig.from_dict({**stored, "out": run_dir})
    except (TypeError, ValueError, AttributeError) as e:
        raise ResumeError(
            f"{run_file} holds an unusable configuration ({e}): damaged, or from another version of the "
            "trainer; start a new run"
        ) from None
    return stored


def _config(args: argparse.Namespace, given: set[str]) -> TrainConfig:
    config_fields = {f.name for f in fields(TrainConfig)}
    values: dict[str, Any] = {k: v for k, v in vars(args).items() if k in config_fields and v is not None}
    values["progress"] = not args.no_progress
    if args.resume is not None:
        if args.overwrite:
            raise ValueError("--overwrite starts a new run; it cannot be combined with --resume")
        stored = _stored_config(args.resume)
        if args.out is not None and args.out.resolve() != args.resume.resolve():
            raise ValueError("--out and --resume name different folders; --resume continues the run in place")
        given = given | ({"progress"} if "no_progress" in given else set())
        changed = sorted(
            k
            for k in given & set(values)
            if k not in RESUMABLE
            and stored.get(k) != TrainConfig.from_dict({**stored, k: values[k]}).to_dict()[k]
        )
        if changed:
            flags = ", ".join("--" + k.replace("_", "-") for k in changed)
            raise ValueError(f"{flags} cannot change on --resume (they define what the run trains)")
        stored.update({k: values[k] for k in given & RESUMABLE if k in values}, out=str(args.resume))
        if "data" not in given and stored["data"] != "synthetic" and not Path(stored["data"]).is_dir():
            # A run recorded before the paths were absolute, or photos that have moved since.
            raise DataError(
                f"the data folder {stored['data']} recorded in {args.resume / RUN_FILE} is not there (from "
                "this directory); pass --data DIR to name it"
            )
        return TrainConfig.from_dict(stored)
    if args.smoke:
        values.update({k: v for k, v in SMOKE.items() if k not in given})
    if "data" not in values or "out" not in values:
        raise ValueError("--data and --out are required (or --resume RUN_DIR)")
    return TrainConfig.from_dict(values)


def _differs(want: dict[str, Any], have: dict[str, Any]) -> str | None:
    diff = [k for k in want if want[k] != have.get(k)]
    return f"configuration differs in {', '.join(diff)}" if diff else None


def _recorded_signature(run_dir: Path) -> dict[str, Any] | None:
    """The signature of the run run_dir/run.json describes (None when it describes none): the record
    of the run that the resume point belongs to."""
    try:
        record = read_json(run_dir / RUN_FILE)
        return TrainConfig.from_dict({**record["config"], "out": run_dir}).signature(
            record["data"]["fingerprint"]
        )
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None


def _matches(cfg: TrainConfig) -> tuple[str, str]:
    """What RUN_DIR holds for this configuration: ("complete", _) a finished run of exactly it,
    ("unfinished", _) a stopped run of exactly it that can be resumed, ("other", why) anything else."""
    want = cfg.signature(data_fingerprint(cfg.data, cfg.image_size, cfg.synthetic_count, cfg.out))
    path = cfg.out / CHECKPOINT_FILE
    why = f"no {path}"
    if path.is_file():
        try:
            training = load_checkpoint(path).training
        except CheckpointError as e:
            why = str(e)
        else:
            differs = _differs(want, training.get("signature") or {})
            if differs is None and training.get("complete"):
                return "complete", "matches"
            why = differs or f"the run in {cfg.out} did not finish and has no resume point"
    # The resume point is judged by the run's own record, not by model.safetensors: that appears only
    # with the first validated epoch (epoch N under --eval-every N), and may still be an older run's.
    if (cfg.out / STATE_FILE).is_file():
        recorded = _recorded_signature(cfg.out)
        if recorded == want:
            return "unfinished", f"the run in {cfg.out} did not finish"
        if recorded is not None and not path.is_file():
            why = _differs(want, recorded) or why
    return "other", why


def _resumed(cfg: TrainConfig, log: logging.Logger) -> bool:
    """--if-missing on a stopped run of this configuration: resume it. False (train afresh) when its
    resume point turns out unusable: an unattended run should end with a model, not an error."""
    log.info("continuing the unfinished run of this configuration in %s (--if-missing)", cfg.out)
    try:
        train(cfg, resume=True)
    except ResumeError as e:
        log.warning("cannot continue it (%s); training afresh", e)
        return False
    return True


def _interrupted(out: Path | None) -> str:
    """What to tell a user who pressed Ctrl-C: --resume only where there is a resume point to continue."""
    if out is None:
        return "interrupted"
    if (out / STATE_FILE).is_file() and (out / RUN_FILE).is_file():
        return f"interrupted; continue with: python -m trainer --resume {out}"
    return f"interrupted before an epoch was completed; nothing to resume in {out}"


def _stop_like_ctrl_c(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _missing_folders(path: str | None) -> list[Path]:
    """`path` and those of its parent folders that do not exist yet, deepest first."""
    if not path or not path.strip():
        return []
    missing = []
    for folder in (Path(path).absolute(), *Path(path).absolute().parents):
        if folder.exists() or folder.is_symlink():
            break
        missing.append(folder)
    return missing


def _remove_if_empty(folders: list[Path]) -> None:
    """Remove the run folders this invocation created, deepest first, where a failed start left them
    empty: `ls runs/` and the next --if-missing or --resume saw a run that never was. rmdir removes only
    an empty folder, so nothing anyone put there is lost."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return  # not empty (or not ours to remove): neither are the folders above it


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    created = _missing_folders(args.resume or args.out)
    status = 1
    try:
        status = _main(parser, args, argv)
        return status
    finally:
        if status != 0:
            _remove_if_empty(created)


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _main(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    # `docker stop`, Kubernetes and batch schedulers stop with SIGTERM: end the way Ctrl-C does (status 130,
    # the last completed epoch resumable) instead of dying mid-line — and as a container's PID 1 without
    # an init, Python would not stop at all on a signal it has no handler for.
    signal.signal(signal.SIGTERM, _stop_like_ctrl_c)
    setup_logging()
    log = logging.getLogger("trainer")
    out: Path | None = None
    try:
        _paths(args)
        out = args.resume or args.out
        cfg = _config(args, _explicit(argv))
        # --if-missing is the unattended "make sure a model for this configuration is there": when the one
        # in RUN_DIR is something else (the data changed), replacing it is what it was asked for.
        overwrite = args.overwrite or args.if_missing
        if args.if_missing and args.resume is None:
            found, why = _matches(cfg)
            if found == "complete":
                log.info("%s is a complete run of this configuration; nothing to do (--if-missing)", cfg.out)
                return 0
            # A stopped run of this configuration (Ctrl-C in `make run`, `docker compose down` while the
            # trainer ran) goes on from its last completed epoch instead of starting over; the time
            # budget counts every segment, so the whole run still keeps to --max-minutes.
            if found == "unfinished" and _resumed(cfg, log):
                return 0
            log.info("training (--if-missing: %s)", why)
        train(cfg, resume=args.resume is not None, overwrite=overwrite)
        return 0
    except ConfigError as e:
        # Flag values the model refuses, alone or together: reported as argparse reports a bad value,
        # worded with the flags (a field name such as latent_grid is not what the user typed).
        parser.error(e.describe(_flag))
    except (OutputError, DataError, ResumeError, DeviceError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # any other I/O failure (a vanished data file, a dead mount): still one line
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: training diverged: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(_interrupted(out), file=sys.stderr)
        return 130


def run() -> None:
    """`python -m trainer` and the `carvae-train` script: main(), then the exit torchrun workers need."""
    exit_process(main())


if __name__ == "__main__":
    run()
