"""trainer.schedule and trainer.metrics: LR schedules, KL warm-up, budget planning, whole-set means."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from trainer.metrics import ImageScores, WeightedMeans, validation_summary
from trainer.schedule import MIN_LR_RATIO, WSD_DECAY, LRSchedule, kl_weight, plan_epochs


def test_cosine_warms_up_peaks_and_anneals_to_the_floor_at_the_planned_end() -> None:
    s = LRSchedule("cosine", lr=1e-3, steps_per_epoch=100, warmup_steps=50)
    lrs = [s.at(i, planned_epochs=10) for i in range(1000)]
    assert lrs[0] == pytest.approx(1e-3 / 50) and lrs[49] == pytest.approx(1e-3)
    assert all(a < b for a, b in itertools.pairwise(lrs[:50]))
    assert all(a >= b for a, b in itertools.pairwise(lrs[49:]))
    assert lrs[-1] == pytest.approx(1e-3 * MIN_LR_RATIO, rel=1e-3)
    # a shorter plan (the budget) anneals sooner: same step, lower rate
    assert s.at(400, planned_epochs=5) < s.at(400, planned_epochs=10)
    # warm-up never takes more than a tenth of a short run
    assert LRSchedule("cosine", 1e-3, 10, warmup_steps=500).at(1, planned_epochs=2) == pytest.approx(1e-3)


def test_wsd_warms_up_holds_the_peak_and_decays_linearly_over_the_last_fifth() -> None:
    s = LRSchedule("wsd", lr=1e-3, steps_per_epoch=100, warmup_steps=50)
    lrs = [s.at(i, planned_epochs=10) for i in range(1000)]
    assert lrs[0] == pytest.approx(1e-3 / 50) and lrs[49] == pytest.approx(1e-3)
    decay_from = 50 + round((1 - WSD_DECAY) * 950)  # the last fifth of the steps after the warm-up
    assert all(r == pytest.approx(1e-3) for r in lrs[49 : decay_from + 1])
    tail = lrs[decay_from:]
    assert all(a > b for a, b in itertools.pairwise(tail))
    steps = [a - b for a, b in itertools.pairwise(tail)]
    assert max(steps) == pytest.approx(min(steps), rel=1e-6)  # linear
    assert lrs[-1] == pytest.approx(1e-3 * MIN_LR_RATIO, abs=1e-5)
    assert s.describe() == {
        "kind": "wsd",
        "lr": 1e-3,
        "warmup_steps": 50,
        "min_lr": 1e-3 * MIN_LR_RATIO,
        "decay_fraction": WSD_DECAY,
    }


def test_wsd_across_a_budget_replan_never_rises_and_still_ends_at_the_floor() -> None:
    # planned at the --epochs cap (100) during the first epoch, re-planned to 4 after it, like --max-minutes
    s = LRSchedule("wsd", lr=1e-3, steps_per_epoch=50, warmup_steps=20)
    lrs = _rates_across_a_replan(s, 100, 4, at_step=50)
    assert all(a >= b for a, b in itertools.pairwise(lrs[20:]))
    assert lrs[50] == pytest.approx(1e-3)
    step = max(a - b for a, b in itertools.pairwise(lrs[50:]))
    assert lrs[-1] - 1e-3 * MIN_LR_RATIO <= 1.01 * step  # the last step of 200: one step short of the floor
    # after the warm-up, the decay takes the last fifth of the steps left at the re-plan (150 of 200)
    decaying = sum(1 for r in lrs[20:] if r < 1e-3 * (1 - 1e-9))
    assert abs(decaying - WSD_DECAY * 150) <= 2, decaying


def _rates_across_a_replan(s: LRSchedule, first: int, then: int, at_step: int) -> list[float]:
    """Every step's rate of a run planned for `first` epochs and re-planned to `then` at `at_step`."""
    anchor = s.replan(at_step, first, then, None)
    before = [s.at(i, first) for i in range(at_step)]
    return before + [s.at(i, then, anchor) for i in range(at_step, then * s.steps_per_epoch)]


def test_a_replan_continues_the_cosine_from_where_the_run_is() -> None:
    s = LRSchedule("cosine", lr=1e-3, steps_per_epoch=100, warmup_steps=20)
    floor = 1e-3 * MIN_LR_RATIO
    # A short budget first plans 2 epochs from a slow first epoch, then 5 once epochs run at full pace:
    # the rate has annealed to the floor by step 200 and must not climb back up.
    lrs = _rates_across_a_replan(s, 2, 5, at_step=200)
    assert all(a >= b for a, b in itertools.pairwise(lrs[20:]))
    assert lrs[199] == pytest.approx(floor, rel=1e-2) and lrs[-1] == pytest.approx(floor, rel=1e-3)
    assert s.at(200, planned_epochs=5) > 10 * lrs[199]  # what stretching from step 0 would have done
    # mid-curve: continuous at the re-plan, then annealed to the floor at the new end, monotonically
    a = s.replan(150, 10, 12, None)
    assert s.at(150, 12, a) == pytest.approx(s.at(150, 10), rel=1e-12)
    tail = [s.at(i, 12, a) for i in range(150, 1200)]
    assert all(x >= y for x, y in itertools.pairwise(tail)) and tail[-1] == pytest.approx(floor, rel=1e-3)
    # a plan that shrinks anneals sooner, from the same point
    b = s.replan(150, 10, 4, None)
    assert s.at(150, 4, b) == pytest.approx(s.at(150, 10))
    assert s.at(399, 4, b) == pytest.approx(floor, rel=1e-2)
    # re-plans chain: the second continues from where the first curve had got to
    c = s.replan(300, 12, 8, a)
    assert s.at(300, 8, c) == pytest.approx(s.at(300, 12, a), rel=1e-12)
    # in warm-up: the warm-up keeps the length it started with (a 1-epoch plan: a tenth of 100 steps)
    w = s.replan(5, 1, 10, None)
    assert s.at(5, 10, w) == pytest.approx(1e-3 * 6 / 10) and s.at(9, 10, w) == pytest.approx(1e-3)
    # a plan whose own curve passes through the current point needs no anchor (resume under the same plan)
    assert s.replan(150, 10, 10, None) is None and s.replan(150, 12, 10, a) is None
    assert LRSchedule("step", 1e-3, 10).replan(50, 2, 5, None) is None


def test_a_budget_shorter_than_ten_warm_ups_still_reaches_the_peak_and_the_floor() -> None:
    # 270 photos at batch 16: 17 steps an epoch. --max-minutes plans 100 epochs (warm-up 100 steps) until
    # the first epoch's pace says 4 fit (68 steps); a warm-up kept at 100 steps never peaked.
    s = LRSchedule("cosine", lr=1e-3, steps_per_epoch=17, warmup_steps=100)
    floor = 1e-3 * MIN_LR_RATIO
    lrs = _rates_across_a_replan(s, 100, 4, at_step=17)
    assert max(lrs) == pytest.approx(1e-3) and lrs[17] == pytest.approx(1e-3)  # past the new cap: peak now
    assert all(a >= b for a, b in itertools.pairwise(lrs[17:]))
    assert lrs[-1] < 1.1 * floor  # the last step of 68: one step short of the floor
    # re-planned while still inside the new plan's warm-up: the ramp ends there (a tenth of 68 steps)
    early = s.replan(3, 100, 4, None)
    assert early is None  # the new plan's own curve, so a resume under it repeats the rates exactly
    assert s.at(3, 4, early) == pytest.approx(1e-3 * 4 / 6) and s.at(5, 4, early) == pytest.approx(1e-3)
    # a warm-up already done, or a plan that grows, keeps the warm-up's length (as before)
    assert s.replan(17, 4, 100, s.replan(17, 100, 4, None)) == (17, 0.0, 17)


def test_step_schedule_is_the_seed_recipe_and_constant_is_constant() -> None:
    s = LRSchedule("step", lr=1e-3, steps_per_epoch=10, step_epoch=3)
    assert s.at(29, 100) == pytest.approx(1e-3) and s.at(30, 100) == pytest.approx(1e-4)
    assert LRSchedule("constant", 2e-4, 10).at(12345, 3) == 2e-4
    with pytest.raises(ValueError):
        LRSchedule("linear", 1e-3, 10)


def test_kl_weight_ramps_linearly() -> None:
    assert kl_weight(2.0, 0, 0.0) == 2.0
    assert kl_weight(2.0, 4, 1.0) == pytest.approx(0.5)
    assert kl_weight(2.0, 4, 9.0) == 2.0


def test_plan_epochs_fits_the_budget() -> None:
    assert plan_epochs(50, 1, [10.0], None, 10.0) == 50  # no budget: the requested epochs
    assert plan_epochs(50, 1, [10.0], 100.0, 10.0) == 10  # 90 s left at 10 s/epoch -> 9 more
    # a slow first epoch (warm-up) is left out once later epochs show the real pace
    assert plan_epochs(50, 2, [30.0, 10.0], 100.0, 40.0) == 8
    assert plan_epochs(5, 1, [1.0], 1000.0, 1.0) == 5  # never more than requested
    assert plan_epochs(50, 3, [10.0, 10.0, 10.0], 25.0, 30.0) == 3  # over budget: stop now
    assert plan_epochs(50, 1, [10.0], 1e300 * 60, 10.0) == 50  # a budget of ~forever fits them all
    assert plan_epochs(50, 1, [10.0], 1e308 * 60, 10.0) == 50  # ... even when it overflows to inf seconds


def test_weighted_means_cover_every_batch_by_size() -> None:
    m = WeightedMeans(torch.device("cpu"))
    values = torch.arange(10, dtype=torch.float64)
    for chunk in (values[:7], values[7:9], values[9:]):  # batches of 7, 2 and 1
        m.add(len(chunk), loss=chunk.mean(), psnr=float(chunk.mean() * 2))
    means = m.means()
    assert m.n == 10 and means["loss"] == pytest.approx(4.5) and means["psnr"] == pytest.approx(9.0)


def test_validation_loss_is_the_whole_set_objective() -> None:
    sq_err = torch.tensor([12.0, 30.0, 6.0], dtype=torch.float64)
    kl = torch.tensor([5.0, 7.0, 9.0], dtype=torch.float64)
    psnr, ssim = torch.tensor([20.0, 22.0, 24.0]).double(), torch.tensor([0.5, 0.6, 0.7]).double()
    scores = ImageScores(psnr=psnr, ssim=ssim, kl=kl, sq_err=sq_err, dims=300)
    summary = validation_summary(scores, "sigma-vae", beta=0.5)
    mse = 48.0 / 900
    # at σ² = mse of the whole set, the mean NLL is the closed form the summary uses
    assert summary["recon"] == pytest.approx(float(scores.nll(0.5 * math.log(mse)).mean()))
    assert summary["loss"] == pytest.approx(summary["recon"] + 0.5 * 7.0)
    assert summary["psnr"] == pytest.approx(22.0) and summary["ssim"] == pytest.approx(0.6)
    mse_recipe = validation_summary(scores, "mse", beta=1.0)
    assert mse_recipe["recon"] == pytest.approx(16.0) and mse_recipe["loss"] == pytest.approx(23.0)
