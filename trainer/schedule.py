"""Learning-rate and KL-weight schedules, and fitting the run into a time budget.

Schedules are pure functions of the step, the planned length and (after a re-plan) an `Anchor`, so
resuming needs only those three.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

LR_SCHEDULES = ("wsd", "cosine", "step", "constant")
ANNEALED = ("cosine", "wsd")  # the schedules that warm up and end at the floor where the plan ends
MIN_LR_RATIO = 0.01  # cosine and wsd end at 1 % of the peak rate
WSD_DECAY = 0.2  # wsd: the last fifth of the run (after the warm-up) decays linearly to the floor
STEP_FACTOR = 0.1  # the seeds' 1e-3 -> 1e-4


# Where a cosine schedule was re-planned: (step, cosine progress reached there, warm-up steps in force).
# A plain tuple, so it travels in train_state.pt, which is loaded with weights_only=True.
Anchor = tuple[int, float, int]


@dataclass(frozen=True)
class LRSchedule:
    kind: str
    lr: float
    steps_per_epoch: int
    warmup_steps: int = 100
    step_epoch: int = 50

    def __post_init__(self) -> None:
        if self.kind not in LR_SCHEDULES:
            raise ValueError(f"unknown lr schedule {self.kind!r}; choose one of {', '.join(LR_SCHEDULES)}")

    def at(self, step: int, planned_epochs: int, anchor: Anchor | None = None) -> float:
        """Rate for optimiser step `step` (0-based) of a run planned to last `planned_epochs` epochs.
        cosine: linear warm-up, then cosine from lr to MIN_LR_RATIO·lr at the planned end.
        wsd (warm-up, stable, decay): linear warm-up, lr until the last WSD_DECAY of the run, then a linear
        fall to MIN_LR_RATIO·lr at the planned end. Both follow the same progress, so a re-plan treats
        them alike (replan).
        step: lr, then STEP_FACTOR·lr from epoch `step_epoch` on (the seeds' recipe). constant: lr."""
        if self.kind == "constant":
            return self.lr
        if self.kind == "step":
            return self.lr * (STEP_FACTOR if step // self.steps_per_epoch >= self.step_epoch else 1.0)
        warmup = self._warmup(planned_epochs, anchor)
        if step < warmup:
            return self.lr * (step + 1) / warmup
        floor = self.lr * MIN_LR_RATIO
        progress = self._progress(step, planned_epochs, anchor)
        if self.kind == "wsd":
            return (
                self.lr
                if progress <= 1 - WSD_DECAY
                else floor + (self.lr - floor) * (1 - progress) / WSD_DECAY
            )
        return floor + (self.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    def replan(self, step: int, old_epochs: int, new_epochs: int, anchor: Anchor | None) -> Anchor | None:
        """The anchor to use from `step` on when the plan changes from `old_epochs` to `new_epochs`.

        A time budget plans from the pace measured so far, and the first epoch (warm-up, caches) is
        slow, so plans usually grow after it. Stretching the cosine over the new length from step 0 would
        move the run back to an earlier, higher point of the curve: with a short budget the rate had
        annealed to the floor and then jumped back up. Instead the curve continues from the point reached,
        and the remaining steps anneal from there to the floor at the new end.

        A warm-up keeps its length, except one still under way when the plan shrinks below ten of them (a
        budget of a few hundred steps, measured after the first epoch): kept, it would leave the rate
        climbing until the end and never at its peak, so it ends at the new plan's cap, or at once when
        the run is already past that."""
        if self.kind not in ANNEALED or new_epochs == old_epochs:
            return anchor
        warmup = self._warmup(old_epochs, anchor)
        reached = self._progress(step, old_epochs, anchor) if step >= warmup else 0.0
        cap = self._warmup(new_epochs, None)
        if step < warmup and cap < warmup:
            warmup = max(cap, step)
        if warmup == cap and (
            step <= warmup or math.isclose(self._progress(step, new_epochs, None), reached, abs_tol=1e-12)
        ):
            # The new plan's own curve passes through where the run is: no anchor, so a run resumed
            # under the plan it started with repeats the uninterrupted run's rates bit for bit.
            return None
        return (step, reached, warmup)

    def _warmup(self, planned_epochs: int, anchor: Anchor | None) -> int:
        if anchor is not None:
            return anchor[2]
        return min(self.warmup_steps, max(1, planned_epochs * self.steps_per_epoch) // 10)

    def _progress(self, step: int, planned_epochs: int, anchor: Anchor | None) -> float:
        """How far along the cosine (0 → 1) step `step` is; `anchor` fixes the start of the last stretch."""
        total = max(1, planned_epochs * self.steps_per_epoch)
        warmup = self._warmup(planned_epochs, anchor)
        start, reached = (warmup, 0.0) if anchor is None else (max(anchor[0], warmup), anchor[1])
        if step <= start:
            return reached
        return min(1.0, reached + (1.0 - reached) * (step - start) / max(1, total - start))

    def describe(self) -> dict[str, object]:
        d: dict[str, object] = {"kind": self.kind, "lr": self.lr}
        if self.kind in ANNEALED:
            d.update(warmup_steps=self.warmup_steps, min_lr=self.lr * MIN_LR_RATIO)
        if self.kind == "wsd":
            d.update(decay_fraction=WSD_DECAY)
        if self.kind == "step":
            d.update(step_epoch=self.step_epoch, lr_after=self.lr * STEP_FACTOR)
        return d


def kl_weight(beta: float, warmup_epochs: float, epoch_progress: float) -> float:
    """β ramped linearly from 0 over the first `warmup_epochs` epochs (epoch_progress counts epochs done,
    fractional within an epoch); no ramp when warmup_epochs is 0."""
    if warmup_epochs <= 0:
        return beta
    return beta * min(1.0, epoch_progress / warmup_epochs)


def plan_epochs(
    max_epochs: int,
    epochs_done: int,
    epoch_seconds: Sequence[float],
    budget_s: float | None,
    elapsed_s: float,
) -> int:
    """How many epochs the run will have in total. With a budget, the epochs that still fit at the measured
    pace (mean epoch time, leaving out the first epoch's warm-up once later ones exist) are added to those
    done — so the schedule is stretched to end when the budget does instead of being cut mid-way."""
    if budget_s is None or not epoch_seconds:
        return max_epochs
    times = list(epoch_seconds[1:] if len(epoch_seconds) > 1 else epoch_seconds)
    pace = sum(times) / len(times)
    fit = max(0.0, budget_s - elapsed_s) // max(pace, 1e-9)
    # Compared as a float first: a budget of 1e300 minutes fits inf (or, at inf seconds, nan) epochs,
    # which int() cannot hold.
    if not fit < max_epochs - epochs_done:
        return max(epochs_done, max_epochs)
    return max(epochs_done, epochs_done + int(fit))
