"""The lr schedules (raycpt.core.schedule.lr_at) and the loop's scheduler built from them."""

from __future__ import annotations

import math

import pytest
import torch

from raycpt.core.config import config_from_dict
from raycpt.core.errors import ConfigError
from raycpt.core.schedule import DECAY_SHAPES, decay_steps, lr_at, stable_end
from raycpt.core.train.loop import build_scheduler

PEAK = 1e-3


def _lrs(scheduler, optimizer, steps: int) -> list[float]:
    """The lr of every optimizer step 0..steps-1, then the one set after the last."""
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs + [optimizer.param_groups[0]["lr"]]


def _optimizer() -> torch.optim.Optimizer:
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(2, 2))], lr=PEAK)


@pytest.mark.parametrize("warmup,total,ratio", [(0, 1, 0.1), (2, 24, 0.1), (5, 37, 0.0), (3, 3, 0.5), (1, 100, 1.0)])
def test_cosine_equals_transformers_schedule_at_every_step(warmup, total, ratio):
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    optimizer = _optimizer()
    reference = _lrs(get_cosine_with_min_lr_schedule_with_warmup(optimizer, num_warmup_steps=warmup,
                                                                 num_training_steps=total, min_lr_rate=ratio),
                     optimizer, total)
    ours = [lr_at(step, peak_lr=PEAK, warmup_steps=warmup, total_steps=total, schedule="cosine",
                  min_lr_ratio=ratio) for step in range(total + 1)]
    assert max(abs(a - b) for a, b in zip(ours, reference, strict=True)) <= 1e-12


@pytest.mark.parametrize("shape", DECAY_SHAPES)
@pytest.mark.parametrize("total,fraction", [(24, 0.2), (10, 0.5), (8, 0.75), (100, 0.1)])
def test_wsd_warms_holds_then_cools_down_to_the_floor(shape, total, fraction):
    warmup, ratio = 2, 0.1
    cool = decay_steps(total, fraction)
    assert cool == min(total, max(1, round(fraction * total)))
    start = stable_end(total, fraction)
    lrs = [lr_at(s, peak_lr=PEAK, warmup_steps=warmup, total_steps=total, schedule="wsd", decay_fraction=fraction,
                 decay_shape=shape, min_lr_ratio=ratio) for s in range(total + 1)]
    assert lrs[0] == 0.0
    assert lrs[:warmup + 1] == pytest.approx([PEAK * s / warmup for s in range(warmup + 1)])  # linear re-warm
    assert lrs[warmup:start + 1] == pytest.approx([PEAK] * (start + 1 - warmup))  # stable, and at the decay's start
    decay = lrs[start:]
    assert all(a >= b for a, b in zip(decay, decay[1:], strict=False))  # monotone cool-down
    assert decay[-1] == pytest.approx(PEAK * ratio)  # the floor at total_steps
    assert min(lrs[warmup:]) >= PEAK * ratio - 1e-18
    if cool >= 2:  # the shape, at the cool-down's middle step
        p = (cool // 2) / cool
        want = {"linear": 1 - p, "cosine": 0.5 * (1 + math.cos(math.pi * p)), "1-sqrt": 1 - math.sqrt(p)}[shape]
        assert lrs[start + cool // 2] == pytest.approx(PEAK * (ratio + (1 - ratio) * want))


def test_wsd_decay_depends_on_the_total_only_and_stable_phases_agree():
    """A run of T steps and a longer run share every step up to the shorter one's last stable step; the decay of a
    run of T2 steps is the same however it got there."""
    short, long = 20, 50
    kw = dict(peak_lr=PEAK, warmup_steps=3, schedule="wsd", decay_fraction=0.2, decay_shape="1-sqrt",
              min_lr_ratio=0.1)
    a = [lr_at(s, total_steps=short, **kw) for s in range(short + 1)]
    b = [lr_at(s, total_steps=long, **kw) for s in range(long + 1)]
    assert a[:stable_end(short, 0.2) + 1] == b[:stable_end(short, 0.2) + 1]
    assert stable_end(long, 0.2) == long - 10


def test_constant_warms_then_holds_the_peak():
    lrs = [lr_at(s, peak_lr=PEAK, warmup_steps=4, total_steps=12, schedule="constant", min_lr_ratio=0.1)
           for s in range(13)]
    assert lrs[:5] == pytest.approx([0, 2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert lrs[4:] == [PEAK] * 9


@pytest.mark.parametrize("schedule", ["wsd", "constant", "cosine"])
def test_build_scheduler_follows_lr_at_and_round_trips_its_step_count(schedule):
    total = 16
    kw = dict(schedule=schedule, decay_fraction=0.25, decay_shape="linear")
    optimizer = _optimizer()
    lrs = _lrs(build_scheduler(optimizer, 2, total, 0.1, **kw), optimizer, total)
    want = [lr_at(s, peak_lr=PEAK, warmup_steps=2, total_steps=total, min_lr_ratio=0.1, **kw)
            for s in range(total + 1)]
    assert lrs == pytest.approx(want, rel=1e-12, abs=1e-15)
    # a state_dict round trip into a scheduler rebuilt for a longer run restores the step count, not the schedule
    optimizer = _optimizer()
    first = build_scheduler(optimizer, 2, total, 0.1, **kw)
    _lrs(first, optimizer, 5)
    rebuilt = build_scheduler(_optimizer(), 2, 4 * total, 0.1, **kw)
    rebuilt.load_state_dict(first.state_dict())
    assert rebuilt.last_epoch == 5
    assert rebuilt.lr_lambdas[0](rebuilt.last_epoch) == pytest.approx(
        lr_at(5, peak_lr=1.0, warmup_steps=2, total_steps=4 * total, min_lr_ratio=0.1, **kw))


def _cfg(**train):
    return {"data": {"domain": "x.txt", "general": "y.txt"}, "train": train}


def test_schedule_fields_are_validated_naming_the_fix():
    with pytest.raises(ConfigError) as err:
        config_from_dict(_cfg(schedule="wds", decay_shape="sqrt", decay_fraction=0.0))
    text = str(err.value)
    assert "train.schedule: 'wds'" in text and "wsd" in text
    assert "train.decay_shape: 'sqrt'" in text
    assert "train.decay_fraction: 0.0 is out of range" in text
    with pytest.raises(ConfigError, match="train.decay_fraction: 0.9 of 10 steps leaves 1 steps"):
        config_from_dict(_cfg(schedule="wsd", decay_fraction=0.9, steps=10, warmup_steps=2))
    cfg = config_from_dict(_cfg(schedule="wsd"))
    assert (cfg.train.decay_fraction, cfg.train.decay_shape) == (0.2, "1-sqrt")
    assert config_from_dict(_cfg()).train.schedule == "cosine"


@pytest.mark.parametrize("sets,says", [
    ([], "ASHA rungs at step(s) 6, 12 find every trial at the same point of its cosine schedule"),
    (["train.schedule=wsd"], "fall in every trial's stable phase (wsd)"),
    (["train.schedule=wsd", "train.decay_fraction=0.6"], "step(s) 12 fall in the cool-down of the shortest trials "
                                                         "(stable to step 10)"),
    (["search.space.train.steps={choice: [12, 24]}"], "trials of different lengths (12-24 steps) are at different "
                                                      "points of their cosine decay"),
    (["search.space.train.schedule={choice: [wsd, cosine]}"], "compare trials under different lr schedules"),
    (["search.scheduler=none"], ""),
])
def test_the_sweep_says_whether_asha_rungs_compare_trials_at_the_same_schedule_phase(sets, says):
    from raycpt.core.config import load_config
    from raycpt.edge.tune import asha_rungs, rung_phases
    from tests.conftest import ROOT

    cfg = load_config(ROOT / "experiments" / "smoke.yaml", sets)
    assert asha_rungs(cfg) == [6, 12, 24]  # grace 1 x eval_every 6 x 2^k, up to 24 steps
    assert says in rung_phases(cfg) if says else rung_phases(cfg) == ""
