"""The training loop: data -> VAE -> Adam, one epoch at a time, with validation, best-epoch checkpointing,
resumable state and (under torchrun) DistributedDataParallel.

After every epoch the run folder is consistent: metrics.jsonl lists the completed epochs, train_state.pt
can resume after the last of them, model.safetensors holds the best epoch so far. Only rank 0 writes.
Random streams (posterior noise, augmentation) are re-seeded from (seed, epoch, rank) at each epoch start
and the data order is a function of (seed, epoch), so a resumed run replays exactly what an uninterrupted
one would have done.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from carvae import synthetic
from carvae.checkpoint import save_checkpoint
from carvae.losses import RECIPES, psnr, vae_loss
from carvae.model import VAE, ConfigError, VAEConfig
from carvae.preprocess import RESIZE_POLICIES, PreprocessPolicy
from trainer import distributed, plots
from trainer.cli import bar_interval, duration
from trainer.data import (
    DataError,
    Dataset,
    Split,
    augment,
    epoch_batches,
    load_data,
    make_split,
    parse_augment,
    to_batch,
)
from trainer.metrics import WeightedMeans, score_images, validation_summary
from trainer.schedule import LR_SCHEDULES, Anchor, LRSchedule, kl_weight, plan_epochs
from trainer.state import (
    CHECKPOINT_FILE,
    RUN_FILE,
    STATE_FILE,
    OutputError,
    ResumeError,
    check_no_run,
    check_writable,
    load_state,
    lock_run,
    read_metrics,
    save_state,
    unlock_run,
    write_json,
    write_metrics,
)

log = logging.getLogger("trainer")

PRIORS = ("fitted", "standard")
MAX_BAD_STEPS = 20  # consecutive non-finite steps before the run is declared diverged
MAX_LR = 1.0
GRAD_EMA_DECAY = 0.98


def ema_update(decay: float) -> Any:
    """AveragedModel's multi_avg_fn for an EMA whose decay warms up as (1 + n) / (10 + n): a fixed decay
    would keep the random initial weights in the average for thousands of steps, longer than a short run."""

    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], n: torch.Tensor | int) -> None:
        d = min(decay, (1 + int(n)) / (10 + int(n)))
        torch._foreach_lerp_(averaged, current, 1 - d)

    return update


def epoch_label(number: int, planned: int | None, budget_minutes: float | None = None) -> str:
    """The progress bar's and the epoch summary's name ("epoch 3/12") for epoch `number` (1-based) of a
    run planned at `planned` epochs while it ran. One function for both, so they cannot disagree.
    `planned` is None while a time budget has no pace to plan from yet: the --epochs cap it would show
    ("epoch 1/100" of a 29-minute run that ends after 53) told the user a length the run never had."""
    if planned is None:
        return f"epoch {number} ({budget_minutes:g} min budget)"
    return f"epoch {number}/{planned}"


def replan_note(number: int, before: int | None, after: int) -> str:
    """The end of epoch `number`'s summary when --max-minutes planned or re-planned the run after it (""
    when the plan did not change): the summary keeps the name its bar showed, and says what the next bar
    will count to. `before` is None when the epoch ran before any plan (see epoch_label)."""
    if after == before:
        return ""
    if after <= number:
        return " | the time budget ends the run here"
    if before is None:
        return f" | planned {after} epochs within the time budget"
    return f" | re-planned to {after} epochs for the time budget"


class TrainingDiverged(RuntimeError):
    pass


def _better(loss: float, best: float) -> bool:
    """Is validation loss `loss` better than `best`? A non-finite loss is worse than any finite one, so a
    NaN epoch can never stay the saved best once a finite one exists (NaN compares false both ways)."""
    if not math.isfinite(loss):
        return False
    return not math.isfinite(best) or loss < best


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


@dataclass
class TrainConfig:
    """Everything that defines a run. Stored in run.json; --resume rebuilds the run from it."""

    data: str = "synthetic"
    out: Path = Path("runs/default")
    epochs: int = 100
    # Measured on real photos (README, Results): a 30-minute CPU budget is a few thousand steps at batch 64;
    # batch 16 gives 4× the steps for 20–30 % fewer images/s and learns faster, best with a lower rate.
    batch_size: int = 16
    image_size: int = 64
    latent_dim: int = 128
    channels: tuple[int, ...] = VAEConfig().channels
    blocks_per_level: int = VAEConfig().blocks_per_level
    latent_grid: int = VAEConfig().latent_grid
    lr: float = 5e-4
    lr_schedule: str = "wsd"
    lr_step_epoch: int = 50
    warmup_steps: int = 100
    recipe: str = "sigma-vae"
    beta: float = 0.1  # measured on real photos: sharper reconstructions than 1.0 (README, Results)
    kl_warmup_epochs: float = 0.0
    grad_clip: float = 5.0
    ema: float = 0.0
    prior: str = "fitted"
    seed: int = 0
    val_fraction: float = 0.1
    device: str = "auto"
    precision: str = "auto"
    workers: int = field(default_factory=default_workers)
    threads: int | None = None
    max_minutes: float | None = None
    synthetic_count: int = 4000
    augment: tuple[str, ...] = ()
    resize_policy: str = "stretch"
    cache_dir: Path | None = None
    eval_every: int = 1
    progress: bool = True

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.cache_dir = Path(self.cache_dir) if self.cache_dir is not None else None
        self.channels = tuple(int(c) for c in self.channels)
        self.augment = parse_augment(self.augment)
        finite = (self.lr, self.beta, self.kl_warmup_epochs, self.grad_clip, self.max_minutes or 0.0)
        checks = [
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.batch_size >= 1, "batch size must be >= 1"),
            # inf / nan pass a plain >= 0 check and only fail later, mid-run, with a torch traceback.
            (
                all(math.isfinite(v) for v in finite),
                "lr, beta, kl warm-up, grad clip and max minutes must be finite",
            ),
            # Adam's step is about lr per weight: above 1 nothing is learnt, and 1e300 overflows inside Adam.
            (0 < self.lr <= MAX_LR, f"learning rate must be in (0, {MAX_LR:g}]"),
            (self.beta >= 0, "beta must be >= 0"),
            (self.kl_warmup_epochs >= 0, "kl warm-up must be >= 0"),
            (self.grad_clip >= 0, "grad clip must be >= 0"),
            (0 <= self.ema < 1, "ema decay must be in [0, 1)"),
            (self.blocks_per_level >= 0, "blocks per level must be >= 0"),
            (self.warmup_steps >= 0, "warm-up steps must be >= 0"),
            (self.lr_step_epoch >= 0, "lr step epoch must be >= 0"),
            (
                self.data == "synthetic" or Path(self.data).resolve() != self.out.resolve(),
                "the run folder (--out) must not be the data folder: its images would become training data",
            ),
            (self.prior in PRIORS, f"prior must be one of {', '.join(PRIORS)}"),
            (0 < self.val_fraction < 1, "val fraction must be in (0, 1)"),
            (self.workers >= 1, "workers must be >= 1"),
            (self.threads is None or self.threads >= 1, "threads must be >= 1"),
            (self.max_minutes is None or self.max_minutes > 0, "max minutes must be > 0"),
            (self.synthetic_count >= 2, "synthetic count must be >= 2"),
            (self.eval_every >= 1, "eval every must be >= 1"),
            (self.recipe in RECIPES, f"recipe must be one of {', '.join(RECIPES)}"),
            (self.lr_schedule in LR_SCHEDULES, f"lr schedule must be one of {', '.join(LR_SCHEDULES)}"),
            (
                self.resize_policy in RESIZE_POLICIES,
                f"resize policy must be one of {', '.join(RESIZE_POLICIES)}",
            ),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        self.model_config()  # validates image size, latent size and channels
        if self.data == "synthetic" and not synthetic.MIN_SIZE <= self.image_size <= synthetic.MAX_SIZE:
            # Photos are scaled to any size the model takes; the synthetic cars are drawn at these only.
            raise ConfigError(
                f"{{image_size}} must be from {synthetic.MIN_SIZE} to {synthetic.MAX_SIZE} with {{data}} "
                f"synthetic (the sizes the synthetic cars are drawn at), got {self.image_size}",
                "image_size",
                "data",
            )

    def model_config(self) -> VAEConfig:
        return VAEConfig(
            self.image_size, self.latent_dim, self.channels, self.blocks_per_level, self.latent_grid
        )

    def policy(self) -> PreprocessPolicy:
        return PreprocessPolicy(image_size=self.image_size, resize=self.resize_policy)

    def resolved_cache_dir(self) -> Path:
        return self.cache_dir if self.cache_dir is not None else self.out.resolve().parent / ".cache"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(out=str(self.out), cache_dir=str(self.cache_dir) if self.cache_dir else None)
        d.update(channels=list(self.channels), augment=list(self.augment))
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def signature(self, data_fingerprint: str) -> dict[str, Any]:
        """What makes two runs the same model (compared by --if-missing). Not: device, workers, threads,
        paths, progress display — they change how fast, not what is trained."""
        keep = (
            *(
                "image_size",
                "latent_dim",
                "channels",
                "blocks_per_level",
                "latent_grid",
                "recipe",
                "beta",
                "kl_warmup_epochs",
            ),
            *(
                "epochs",
                "batch_size",
                "lr",
                "lr_schedule",
                "lr_step_epoch",
                "warmup_steps",
                "grad_clip",
                "ema",
                "prior",
                "seed",
            ),
            *("val_fraction", "max_minutes", "augment", "resize_policy"),
        )
        d = self.to_dict()
        return {"data_fingerprint": data_fingerprint, **{k: d[k] for k in keep}}


@dataclass
class Progress:
    """Where a run stands after its last completed epoch; this is what train_state.pt adds to weights."""

    epochs_done: int = 0
    step: int = 0
    planned_epochs: int = 0
    elapsed_s: float = 0.0  # training time (data loading excluded), summed over resumed segments
    data_s: float = 0.0
    epoch_seconds: list[float] = field(default_factory=list)
    train_images: int = 0
    train_s: float = 0.0  # time in optimisation steps only, for images/s
    grad_ema: float | None = None
    lr_anchor: Anchor | None = None  # where the schedule was last re-planned (trainer.schedule)
    best_epoch: int = 0
    best_val: dict[str, float] | None = None
    final_val: dict[str, float] | None = None


class _Run:
    """One training run in one process. Split into small steps so each can be read on its own."""

    def __init__(
        self, cfg: TrainConfig, info: distributed.DistInfo, resume: bool, overwrite: bool = False
    ) -> None:
        self.cfg, self.info, self.resume, self.overwrite = cfg, info, resume, overwrite
        self.device = info.device
        self.out = cfg.out
        self.channels_last = self.device.type in ("cpu", "cuda")
        self.amp = distributed.use_bf16(cfg.precision, self.device)
        self.progress = Progress(planned_epochs=cfg.epochs)
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.rows: list[dict[str, Any]] = []
        # Kept across epochs: with fewer than MAX_BAD_STEPS batches per epoch a per-epoch count never trips.
        self.bad_in_a_row = 0
        self.lock: IO[str] | None = None

    def close(self) -> None:
        """Let go of the run folder (another run in this process, e.g. a test's --resume, may take it)."""
        if self.lock is not None:
            unlock_run(self.lock, self.out)
            self.lock = None

    # ------------------------------------------------------------ setup

    def _on_main(self, fn: Any, *args: Any) -> Any:
        """Run fn on rank 0; if it fails with a user-facing error, every rank raises the same one."""
        err, result = None, None
        if self.info.is_main:
            try:
                result = fn(*args)
            except (OutputError, DataError, ResumeError, ValueError) as e:
                err = f"{type(e).__name__}:{e}"
        err = distributed.broadcast_error(err)
        if err:
            kind, _, msg = err.partition(":")
            raise {"OutputError": OutputError, "DataError": DataError, "ResumeError": ResumeError}.get(
                kind, ValueError
            )(msg)
        return result

    def setup(self) -> None:
        cfg = self.cfg
        if self.device.type == "cpu":
            torch.set_num_threads(cfg.threads or distributed.default_threads(self.info.local_world_size))
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        if not self.resume and not self.overwrite:
            self._on_main(check_no_run, self.out)
        self._on_main(check_writable, self.out)
        self.lock = self._on_main(lock_run, self.out)
        state = load_state(self.out) if self.resume else None

        t0 = time.perf_counter()
        load = lambda progress: load_data(  # noqa: E731
            cfg.data,
            cfg.policy(),
            cfg.synthetic_count,
            cfg.workers,
            cfg.resolved_cache_dir(),
            progress,
            run_dir=cfg.out,
        )
        # Rank 0 decodes and fills the cache first; the others then read the cache instead of decoding too.
        data: Dataset | None = self._on_main(load, cfg.progress)
        self.data: Dataset = data if data is not None else load(False)
        self.split: Split = make_split(len(self.data), cfg.val_fraction, cfg.seed)
        data_s = time.perf_counter() - t0
        if state is None and self.info.is_main and (self.out / STATE_FILE).exists():
            # A fresh run in an old run's folder (--overwrite): the old resume point must not outlive it.
            # Only now that the data and split are good: a mistyped --data must not cost the old run.
            log.info("fresh run in %s: discarding the previous run's %s", self.out, STATE_FILE)
            (self.out / STATE_FILE).unlink()
        # On a GPU the whole uint8 set usually fits (6k photos at 64 px: 75 MB), so batches never cross PCIe.
        self.images = self.data.images.to(self.device) if self.device.type == "cuda" else self.data.images

        torch.manual_seed(cfg.seed)
        self.model = VAE(cfg.model_config()).to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        # An exponential moving average of the weights is what gets validated and saved: it smooths the
        # step-to-step noise of a high learning rate, which is where the best epoch of a short run lies.
        self.ema: AveragedModel | None = (
            AveragedModel(self.model, multi_avg_fn=ema_update(cfg.ema), use_buffers=True) if cfg.ema else None
        )
        self.batches_per_epoch = len(
            epoch_batches(self.split.train, 0, cfg.seed, cfg.batch_size, self.info.rank, self.info.world_size)
        )
        self.sched = LRSchedule(
            cfg.lr_schedule, cfg.lr, self.batches_per_epoch, cfg.warmup_steps, cfg.lr_step_epoch
        )
        if state is not None:
            self._restore(state)
        else:
            self.progress.data_s = data_s
        self.net: torch.nn.Module = self.model
        if self.info.active:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = DistributedDataParallel(self.model, device_ids=ids)
        log.info(
            "run %s: %d train / %d val images at %d px, model %.2fM parameters, %s, %d process(es), %s",
            self.out,
            len(self.split.train),
            len(self.split.val),
            cfg.image_size,
            self.model.num_parameters() / 1e6,
            distributed.describe_device(self.device, self.amp),
            self.info.world_size,
            f"resuming after epoch {self.progress.epochs_done}" if state is not None else "fresh start",
        )

    def _restore(self, state: dict[str, Any]) -> None:
        if state.get("data_fingerprint") != self.data.fingerprint:
            raise ResumeError(
                f"{self.out} was trained on different data (fingerprint mismatch); start a new run"
            )
        if state.get("val_hash") != self.split.val_hash:
            raise ResumeError(f"{self.out} used a different train/validation split; start a new run")
        if state.get("config", {}).get("channels") is not None:
            stored = TrainConfig.from_dict({**state["config"], "out": self.out}).model_config()
            if stored != self.cfg.model_config():
                raise ResumeError(
                    f"{self.out}/{STATE_FILE} holds a different model ({stored}); start a new run"
                )
        try:
            self.model.load_state_dict(state["model"])
            self.opt.load_state_dict(state["optimizer"])
            if self.ema is not None:
                self.ema.load_state_dict(state["ema"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise ResumeError(
                f"{self.out}/{STATE_FILE} does not fit this run ({str(e).splitlines()[0]})"
            ) from None
        known = {f.name for f in fields(Progress)}
        self.progress = Progress(**{k: v for k, v in state["progress"].items() if k in known})
        done = self.progress.epochs_done
        if self.cfg.epochs < done:
            # Epochs cannot be undone: accepting this would only record a request the run already exceeds.
            raise ResumeError(
                f"--epochs {self.cfg.epochs} is below the {done} epochs {self.out} has already completed; "
                f"pass --epochs {done} or more to resume it"
            )
        # Re-plan with this invocation's --epochs / --max-minutes, so a resume can also extend a run.
        self._replan()
        self.best_weights = state.get("best_weights")
        # Epochs after the last saved state are redone; their metrics lines (if written) are dropped.
        self.rows = [r for r in read_metrics(self.out) if r.get("epoch", 0) <= self.progress.epochs_done]

    @property
    def eval_model(self) -> VAE:
        """The weights that are validated and saved: the moving average when --ema is on."""
        return self.ema.module if self.ema is not None else self.model  # type: ignore[return-value]

    def _log_sigma(self) -> float:
        return float(self.model.get_buffer("log_sigma"))

    def _set_log_sigma(self, value: float) -> None:
        self.model.get_buffer("log_sigma").fill_(value)
        # Set, not averaged: σ is measured once per epoch, a per-step average would lag behind it.
        self.eval_model.get_buffer("log_sigma").fill_(value)

    # ------------------------------------------------------------ one epoch

    def _seed_epoch(self, epoch: int) -> torch.Generator:
        base = self.cfg.seed * 1_000_003 + epoch * 1009 + self.info.rank
        torch.manual_seed(base)
        return torch.Generator().manual_seed(base + 7)

    def train_epoch(self, epoch: int) -> tuple[dict[str, float], int]:
        cfg, p = self.cfg, self.progress
        aug_gen = self._seed_epoch(epoch)
        batches = epoch_batches(
            self.split.train, epoch, cfg.seed, cfg.batch_size, self.info.rank, self.info.world_size
        )
        means = WeightedMeans(self.device)
        skipped = 0
        params = [q for q in self.model.parameters() if q.requires_grad]
        self.net.train()
        bar = tqdm(
            batches,
            desc=epoch_label(epoch + 1, self._shown_plan(), cfg.max_minutes),
            unit="batch",
            leave=False,
            dynamic_ncols=True,
            mininterval=bar_interval(),
            disable=not (cfg.progress and self.info.is_main),
        )
        autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16) if self.amp else contextlib.nullcontext()
        )
        for i, idx in enumerate(bar):
            x = to_batch(self.images, idx, self.device, self.channels_last)
            if cfg.augment:
                x = augment(x, cfg.augment, aug_gen)
                x = x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
            lr = self.sched.at(p.step, p.planned_epochs, p.lr_anchor)
            for g in self.opt.param_groups:
                g["lr"] = lr
            beta = kl_weight(cfg.beta, cfg.kl_warmup_epochs, p.step / self.batches_per_epoch)
            with autocast:
                x_hat, mu, logvar = self.net(x)
            terms = vae_loss(x_hat, x, mu, logvar, cfg.recipe, beta)
            self.opt.zero_grad(set_to_none=True)
            terms.loss.backward()
            # Adaptive clipping: a spike above grad_clip × the running norm is scaled down. The norm of the
            # σ-VAE loss grows as σ shrinks, so no fixed threshold fits a whole run.
            limit = cfg.grad_clip * p.grad_ema if (cfg.grad_clip > 0 and p.grad_ema) else math.inf
            norm = float(torch.nn.utils.clip_grad_norm_(params, limit))
            p.step += 1
            if not math.isfinite(norm):
                # Gradients are already averaged over ranks here, so every rank skips the same step.
                self.opt.zero_grad(set_to_none=True)
                skipped += 1
                self.bad_in_a_row += 1
                if self.bad_in_a_row >= MAX_BAD_STEPS:
                    raise TrainingDiverged(
                        f"{MAX_BAD_STEPS} steps in a row had non-finite gradients (epoch {epoch + 1}); "
                        "lower --lr or raise --warmup-steps"
                    )
                continue
            self.bad_in_a_row = 0
            self.opt.step()
            if self.ema is not None:
                self.ema.update_parameters(self.model)
            kept = min(norm, limit)
            p.grad_ema = (
                kept if p.grad_ema is None else GRAD_EMA_DECAY * p.grad_ema + (1 - GRAD_EMA_DECAY) * kept
            )
            with torch.no_grad():
                batch_psnr = psnr(x_hat, x).mean()
            means.add(
                len(idx), loss=terms.loss, recon=terms.recon, kl=terms.kl, mse=terms.mse, psnr=batch_psnr
            )
            if i % 10 == 0 and cfg.progress and self.info.is_main:
                # No redraw of its own: tqdm stores the batch count only when it redraws by the clock, so
                # a forced one showed a stale count ("0/17" late in the epoch) and, in a log file, added a
                # line every ten batches. The next timed redraw shows these figures.
                bar.set_postfix(
                    loss=f"{terms.loss.item():.1f}",
                    recon=f"{terms.recon.item():.1f}",
                    kl=f"{terms.kl.item():.1f}",
                    psnr=f"{batch_psnr.item():.2f}",
                    refresh=False,
                )
        bar.close()
        if skipped == len(batches):
            # Nothing was learnt and there is no training error to calibrate σ on. Every rank skipped the
            # same steps (the gradients are averaged first), so every rank raises here together.
            raise TrainingDiverged(
                f"every step of epoch {epoch + 1} had non-finite gradients; "
                "lower --lr or raise --warmup-steps"
            )
        result = means.means()
        result.update(
            lr=self.sched.at(max(0, p.step - 1), p.planned_epochs, p.lr_anchor),
            beta=beta,
            skipped_steps=skipped,
        )
        return result, means.n

    # ------------------------------------------------------------ validation, best epoch, files

    def validate(self) -> dict[str, float]:
        shard = self.split.val[self.info.rank :: self.info.world_size]
        scores = score_images(
            self.eval_model, self.images, shard, self.device, channels_last=self.channels_last
        )
        return validation_summary(scores, self.cfg.recipe, self.cfg.beta)

    def _keep_if_best(self, val: dict[str, float]) -> bool:
        p = self.progress
        p.final_val = val
        if p.best_val is not None and not _better(val["loss"], p.best_val["loss"]):
            return False
        p.best_val, p.best_epoch = val, p.epochs_done
        self.best_weights = {
            k: v.detach().cpu().clone().contiguous() for k, v in self.eval_model.state_dict().items()
        }
        return True

    def _save_checkpoint(self, model: VAE, meta: dict[str, Any]) -> None:
        path = self.out / CHECKPOINT_FILE
        try:
            save_checkpoint(path, model, self.cfg.policy(), meta)
        except OSError as e:
            raise OutputError(f"cannot write {path}: {e.strerror or e}") from None

    def training_meta(self, complete: bool) -> dict[str, Any]:
        cfg, p = self.cfg, self.progress
        pick = ("psnr", "ssim", "loss", "recon", "kl", "mse")
        best = {k: p.best_val[k] for k in pick} if p.best_val else None
        return {
            "complete": complete,
            "signature": cfg.signature(self.data.fingerprint),
            "data": {**self.data.source, "fingerprint": self.data.fingerprint},
            "split": self.split.describe(),
            "recipe": cfg.recipe,
            "beta": cfg.beta,
            "kl_warmup_epochs": cfg.kl_warmup_epochs,
            # fitted: samples come from a Gaussian fitted to the training images' posterior means, not N(0, I)
            "prior": cfg.prior if complete else "standard",
            "batch_size": cfg.batch_size,
            "world_size": self.info.world_size,
            "augment": list(cfg.augment),
            "seed": cfg.seed,
            "epochs_requested": cfg.epochs,
            "epochs_done": p.epochs_done,
            "best_epoch": p.best_epoch,
            "best_val": best,  # validation figures of the weights in this file
            "final_val": {k: p.final_val[k] for k in pick} if p.final_val else None,
            "log_sigma": self._log_sigma(),
            "train_images_per_s": p.train_images / p.train_s if p.train_s else None,
            "train_seconds": round(p.elapsed_s, 1),
            "data_seconds": round(p.data_s, 1),
            "max_minutes": cfg.max_minutes,
            # Known at the end only: a run saved mid-way is short of --epochs whatever stops it later.
            "stopped_by_budget": complete and p.epochs_done < cfg.epochs,
            "lr_schedule": {**self.sched.describe(), "planned_epochs": p.planned_epochs},
            "device": str(self.device),
            "torch_version": torch.__version__,
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }

    def save_epoch_files(self) -> None:
        if not self.info.is_main:
            return
        write_metrics(self.out, self.rows)
        state = {
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.opt.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "progress": {**asdict(self.progress), "epochs_requested": self.cfg.epochs},
            "best_weights": self.best_weights,
            "data_fingerprint": self.data.fingerprint,
            "val_hash": self.split.val_hash,
            "config": self.cfg.to_dict(),
        }
        save_state(self.out, state)

    def write_run_json(self, status: str) -> None:
        if self.info.is_main:
            write_json(
                self.out / RUN_FILE,
                {
                    "status": status,
                    "config": self.cfg.to_dict(),
                    "data": {**self.data.source, "fingerprint": self.data.fingerprint},
                    "split": self.split.describe(),
                    "world_size": self.info.world_size,
                    "device": str(self.device),
                    "torch_version": torch.__version__,
                    "epochs_done": self.progress.epochs_done,
                    "best_epoch": self.progress.best_epoch,
                    "best_val": self.progress.best_val,
                },
            )

    # ------------------------------------------------------------ the loop

    def _replan(self) -> None:
        """Plan the run's length from this invocation's --epochs / --max-minutes and the pace so far."""
        p, cfg = self.progress, self.cfg
        budget = cfg.max_minutes * 60 if cfg.max_minutes else None
        # Each rank measures its own pace; rank 0's plan is everyone's, or a rank could stop an epoch
        # before the others and leave them waiting in a collective.
        epochs = distributed.from_main(
            plan_epochs(cfg.epochs, p.epochs_done, p.epoch_seconds, budget, p.elapsed_s)
        )
        p.lr_anchor = self.sched.replan(p.step, p.planned_epochs, epochs, p.lr_anchor)
        p.planned_epochs = epochs

    def _shown_plan(self) -> int | None:
        """The run's length as the next epoch's bar and summary name it: None while a time budget has
        not measured a pace (the plan is then the --epochs cap, which the budget will likely cut), unless
        only one epoch can be left anyway."""
        p = self.progress
        if self.cfg.max_minutes is None or p.epoch_seconds or p.planned_epochs <= p.epochs_done + 1:
            return p.planned_epochs
        return None

    def run(self) -> dict[str, Any]:
        cfg, p = self.cfg, self.progress
        # The budget counts the training time of every segment, so a resumed run whose --max-minutes is
        # already spent trains nothing; without a word, a larger --epochs looks like it was ignored.
        spent = self.resume and p.epochs_done >= p.planned_epochs and p.epochs_done < cfg.epochs
        if spent and self.info.is_main:
            log.warning(
                "nothing to train: the --max-minutes budget (%g min) is spent after %d epochs (%s of "
                "training); pass a larger --max-minutes to extend the run",
                cfg.max_minutes,
                p.epochs_done,
                duration(p.elapsed_s),
            )
        elif self.resume and p.epochs_done >= cfg.epochs and self.info.is_main:
            # Resuming a finished run only re-writes its files; said so, the missing --epochs is obvious.
            log.warning(
                "nothing to train: the run has completed its %d epochs; pass a larger --epochs to extend it",
                cfg.epochs,
            )
        self.write_run_json("running")
        while p.epochs_done < p.planned_epochs:
            t0 = time.perf_counter()
            epoch, planned = p.epochs_done, self._shown_plan()  # the plan its bar names (None: none yet)
            train, n_images = self.train_epoch(epoch)
            train_s = time.perf_counter() - t0
            # Calibrated decoder σ on the training set, so the checkpoint can report an ELBO in nats.
            self._set_log_sigma(0.5 * math.log(max(train["mse"], 1e-12)))
            p.epochs_done += 1
            due = p.epochs_done % cfg.eval_every == 0 or p.epochs_done >= p.planned_epochs
            val = self.validate() if due else None
            is_best = self._keep_if_best(val) if val else False
            epoch_s = time.perf_counter() - t0
            p.epoch_seconds.append(epoch_s)
            p.elapsed_s += epoch_s
            p.train_images += n_images
            p.train_s += train_s
            self._replan()
            if val is None and p.epochs_done >= p.planned_epochs:
                val = self.validate()  # the budget ended the run here: the last epoch must be scored
                is_best = self._keep_if_best(val)
            if is_best and self.info.is_main:
                # After the re-plan, so a run killed later says "epoch 1 of 53 planned", not of the
                # --epochs cap that the first epoch started with.
                self._save_checkpoint(self.eval_model, self.training_meta(False))
            self.rows.append(self._row(train, val, n_images, train_s, epoch_s, is_best))
            self.save_epoch_files()
            self._log_epoch(self.rows[-1], planned)
            if self.info.is_main and val is not None:
                plots.write_loss(self.out, self.rows)
            # The epoch's files and loss plot are part of what it costs the budget: with the default
            # model they take ~0.4 s, a third of an epoch on 40 photos, and left out of the pace a
            # --max-minutes 0.2 run of such epochs trained for 20 s. (The state just saved lacks this
            # epoch's share; a resumed run undercounts by that much.)
            written_s = time.perf_counter() - t0 - epoch_s
            p.epoch_seconds[-1] += written_s
            p.elapsed_s += written_s
        return self.finish()

    def _row(
        self,
        train: dict[str, float],
        val: dict[str, float] | None,
        n: int,
        train_s: float,
        epoch_s: float,
        is_best: bool,
    ) -> dict[str, Any]:
        row: dict[str, Any] = {
            "epoch": self.progress.epochs_done,
            "epochs_planned": self.progress.planned_epochs,
        }
        row.update({f"train_{k}": train[k] for k in ("loss", "recon", "kl", "mse", "psnr")})
        for k in ("loss", "recon", "kl", "mse", "psnr", "ssim"):
            row[f"val_{k}"] = val[k] if val else None
        row.update(
            lr=train["lr"],
            beta=train["beta"],
            log_sigma=self._log_sigma(),
            seconds=round(epoch_s, 3),
            train_seconds=round(train_s, 3),
            images_per_s=round(n / train_s, 2) if train_s > 0 else None,
            skipped_steps=int(train["skipped_steps"]),
            best=is_best,
        )
        return row

    def _log_epoch(self, r: dict[str, Any], planned: int | None) -> None:
        """One line per epoch, named as its progress bar was (under the plan it ran with; the row's
        epochs_planned is the plan after it), then the new plan if the budget changed it."""
        if not self.info.is_main:
            return
        val = (
            f" | val loss {r['val_loss']:.1f} psnr {r['val_psnr']:.2f} dB ssim {r['val_ssim']:.3f}"
            if r["val_loss"] is not None
            else ""
        )
        log.info(
            "%s  train loss %.1f (recon %.1f, kl %.1f) psnr %.2f%s | lr %.2e | %.1f s, %.0f img/s%s%s",
            epoch_label(r["epoch"], planned, self.cfg.max_minutes),
            r["train_loss"],
            r["train_recon"],
            r["train_kl"],
            r["train_psnr"],
            val,
            r["lr"],
            r["seconds"],
            r["images_per_s"] or 0,
            "  *best" if r["best"] else "",
            replan_note(r["epoch"], planned, r["epochs_planned"]),
        )

    @torch.no_grad()
    def _posterior_means(self, model: VAE, batch: int = 256) -> torch.Tensor:
        """μ of every training image (no augmentation), in the encoder's own coordinates."""
        model.eval()
        idx = self.split.train
        cpu = torch.device("cpu")
        return torch.cat(
            [
                model.encoder(to_batch(self.data.images, idx[i : i + batch], cpu, False))[0]
                for i in range(0, len(idx), batch)
            ]
        )

    def _fit_prior(self, model: VAE, meta: dict[str, Any]) -> None:
        """The fitted sampling prior, or N(0, I) when the training codes define none (one training image,
        identical images, a diverged model): a run that trained must not be lost to its sampling prior."""
        try:
            model.fit_prior(self._posterior_means(model))
        except ValueError as e:
            log.warning("cannot fit the sampling prior (%s); samples are drawn from N(0, I)", e)
            meta.update(prior="standard", prior_fit_error=str(e))

    def finish(self) -> dict[str, Any]:
        meta = self.training_meta(True)
        if self.info.is_main:
            best = VAE(self.cfg.model_config())
            if self.best_weights is not None:
                best.load_state_dict(self.best_weights)
            if self.cfg.prior == "fitted":
                self._fit_prior(best, meta)
            self._save_checkpoint(best, meta)
            plots.write_all(self.out, best, self.data.images, self.split.val, self.rows)
            self.write_run_json("complete")
            b = self.progress.best_val or {}
            log.info(
                "done: best epoch %d of %d, val psnr %.2f dB, ssim %.3f -> %s",
                self.progress.best_epoch,
                self.progress.epochs_done,
                b.get("psnr", float("nan")),
                b.get("ssim", float("nan")),
                self.out / CHECKPOINT_FILE,
            )
        distributed.barrier()
        return meta


def train(cfg: TrainConfig, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Train (or resume) the run in cfg.out; returns the checkpoint's `training` metadata. A fresh run
    into a folder that already holds a run is refused unless `overwrite`."""
    info = distributed.setup(cfg.device)
    run = None
    try:
        run = _Run(cfg, info, resume, overwrite)
        run.setup()
        return run.run()
    finally:
        if run is not None:
            run.close()
        distributed.cleanup()
