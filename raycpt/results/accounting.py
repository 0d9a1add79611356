"""Compute accounting of a sweep: tokens trained, trial wall time, resource-seconds (CPU-s, GPU-s of each trial's
bundle held for its wall time), and what the scheduler saved against running every trial to its own full
`train.steps`.

Per trial (keys added to its row): `compute/tokens`, `compute/tokens_full_budget`, `compute/tokens_saved_by_scheduler`,
`compute/wall_s`, `compute/cpu_s` (and `compute/gpu_s` with GPUs), `compute/cpu_s_saved_by_scheduler` (...). For the
sweep (`Summary.compute`): the `compute.*` totals below (`sweep_compute`).

Tokens are exact: a trial's full budget is its own steps x tokens per step (global batch x block size, with its
sampled values), and tokens_trained + tokens_saved_by_scheduler + tokens_not_run == tokens_full_budget, where only
trials ASHA stopped count as saved, and `tokens_not_run` is what failed, still running, pending or early-stopped
(train.early_stopping_patience) trials did not train. Resource-seconds saved are an estimate: a stopped trial's
remaining steps x its seconds per step between its first and last report (start-up excluded), or the sweep's median
of that when it reported once.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

import pandas as pd

from raycpt.core import metrics
from raycpt.core.config import ExperimentConfig
from raycpt.core.resources import trial_resources
from raycpt.results.collect import HP_PREFIX
from raycpt.results.format import duration, num, tokens_text

PREFIX = "compute/"
"""Per-trial keys in a trial row: 'compute/tokens'."""
KEY = "compute."
"""Sweep keys in Summary.compute: 'compute.tokens_trained'."""
RESOURCES = ("CPU", "GPU")
"""Resources counted in resource-seconds (custom resources and memory are not time-shared compute)."""
ENDED = ("finished", "stopped", "failed", "terminated", "error")


def trial_value(row: dict[str, Any], cfg: ExperimentConfig, dotted: str) -> Any:
    """A trial's value of a config field: its sampled `hp/<field>` when swept, else the config's."""
    value = row.get(HP_PREFIX + dotted)
    if value is not None and not (isinstance(value, float) and math.isnan(value)):
        return value
    section, name = dotted.split(".", 1)
    return getattr(getattr(cfg, section), name)


def tokens_per_step(row: dict[str, Any], cfg: ExperimentConfig) -> int:
    """Training tokens of one optimizer step of this trial: global batch (blocks) x block size."""
    global_batch = int(trial_value(row, cfg, "train.global_batch_size")) or (
        int(trial_value(row, cfg, "train.batch_size")) * int(trial_value(row, cfg, "train.grad_accum")))
    return global_batch * int(trial_value(row, cfg, "data.block_size"))


def trial_steps(row: dict[str, Any], cfg: ExperimentConfig) -> int:
    """The optimizer steps this trial was set to run: its own sampled train.steps, or with a token budget
    (train.tokens) ceil(tokens / tokens per step), as `TrainConfig.total_steps` counts them."""
    tokens = int(round(float(trial_value(row, cfg, "train.tokens"))))
    if tokens > 0:
        return max(1, math.ceil(tokens / tokens_per_step(row, cfg)))
    return int(round(float(trial_value(row, cfg, "train.steps"))))


def trial_budget(row: dict[str, Any], cfg: ExperimentConfig) -> int:
    """Tokens this trial trains when it runs all its steps."""
    return tokens_per_step(row, cfg) * trial_steps(row, cfg)


def _seconds_per_step(history: pd.DataFrame | None) -> float | None:
    """Seconds per step between a trial's first and last report (excludes start-up, model load, first eval)."""
    if history is None or metrics.STEP not in history or "time_total_s" not in history:
        return None
    h = history.dropna(subset=[metrics.STEP, "time_total_s"])
    if len(h) < 2:
        return None
    steps = float(h[metrics.STEP].iloc[-1] - h[metrics.STEP].iloc[0])
    seconds = float(h["time_total_s"].iloc[-1] - h["time_total_s"].iloc[0])
    return seconds / steps if steps > 0 and seconds >= 0 else None


def _int(value: Any) -> int:
    value = num(value)
    return 0 if math.isnan(value) else int(round(value))


def sweep_compute(rows: list[dict[str, Any]], cfg: ExperimentConfig,
                  histories: dict[str, pd.DataFrame] | None = None) -> dict[str, Any]:
    """Add the per-trial `compute/...` keys to every row (in place) and return the sweep's `compute.*` totals."""
    histories = histories or {}
    bundle = trial_resources(cfg.resources).totals()
    held = {k: float(bundle[k]) for k in RESOURCES if bundle.get(k, 0.0) > 0}
    rates = {row["trial_id"]: _seconds_per_step(histories.get(row["trial_id"])) for row in rows}
    known = [r for r in rates.values() if r is not None]
    median_rate = statistics.median(known) if known else None

    totals = {"tokens": 0, "full": 0, "saved": 0, "seconds": 0.0}
    used = dict.fromkeys(held, 0.0)
    saved_res = dict.fromkeys(held, 0.0)
    full_res = dict.fromkeys(held, 0.0)
    budgets = []
    for row in rows:
        steps_done, tokens = _int(row.get(metrics.STEP)), _int(row.get(metrics.TOKENS))
        full_steps, budget = trial_steps(row, cfg), trial_budget(row, cfg)
        wall = num(row.get("time_total_s"))
        wall = 0.0 if math.isnan(wall) else max(0.0, wall)
        stopped = row.get("status") == "stopped"
        saved = max(0, budget - tokens) if stopped else 0
        rate = rates[row["trial_id"]] or median_rate or (wall / steps_done if steps_done else 0.0)
        rest_s = max(0, full_steps - steps_done) * rate
        row.update({f"{PREFIX}tokens": tokens, f"{PREFIX}tokens_full_budget": budget,
                    f"{PREFIX}tokens_saved_by_scheduler": saved, f"{PREFIX}wall_s": wall})
        for key, amount in held.items():
            name = key.lower()
            row[f"{PREFIX}{name}_s"] = amount * wall
            row[f"{PREFIX}{name}_s_saved_by_scheduler"] = amount * rest_s if stopped else 0.0
            used[key] += amount * wall
            saved_res[key] += row[f"{PREFIX}{name}_s_saved_by_scheduler"]
            full_res[key] += amount * (wall + rest_s)
        totals["tokens"] += tokens
        totals["full"] += budget
        totals["saved"] += saved
        totals["seconds"] += wall
        budgets.append(budget)
    main = "GPU" if "GPU" in held else "CPU" if "CPU" in held else None
    return {
        f"{KEY}trials": len(rows),
        f"{KEY}complete": all(row.get("status") in ENDED for row in rows),
        f"{KEY}tokens_trained": totals["tokens"],
        f"{KEY}tokens_full_budget": totals["full"],
        f"{KEY}tokens_saved_by_scheduler": totals["saved"],
        f"{KEY}tokens_not_run": totals["full"] - totals["tokens"] - totals["saved"],
        f"{KEY}saved_by_scheduler_fraction": totals["saved"] / totals["full"] if totals["full"] else 0.0,
        f"{KEY}largest_trial_budget": max(budgets, default=0),
        f"{KEY}trial_seconds": totals["seconds"],
        f"{KEY}resources_per_trial": held,
        f"{KEY}resource_seconds": used,
        f"{KEY}resource_seconds_full_budget": full_res,
        f"{KEY}resource_seconds_saved_by_scheduler": saved_res,
        f"{KEY}resource_saved_by_scheduler_fraction": (saved_res[main] / full_res[main]
                                                       if main and full_res[main] else 0.0),
        f"{KEY}scheduler": cfg.search.scheduler,
    }


def _resource_text(seconds: dict[str, float]) -> str:
    return ", ".join(f"{value:,.0f} {key}-s" for key, value in seconds.items()) or "-"


def describe_compute(compute: dict[str, Any]) -> str:
    """One line: tokens trained of the full budget, what the scheduler saved, trial time and resource-seconds."""
    if not compute:
        return "no trials yet"
    k = KEY
    text = (f"{tokens_text(compute[k + 'tokens_trained'])} tokens trained of a "
            f"{tokens_text(compute[k + 'tokens_full_budget'])} full budget (every trial to its train.steps)")
    if compute.get(k + "scheduler") == "asha":
        text += (f"; ASHA saved {tokens_text(compute[k + 'tokens_saved_by_scheduler'])} tokens "
                 f"({compute[k + 'saved_by_scheduler_fraction']:.0%}) and about "
                 f"{_resource_text(compute[k + 'resource_seconds_saved_by_scheduler'])}")
    if compute.get(k + "tokens_not_run"):
        text += f"; {tokens_text(compute[k + 'tokens_not_run'])} not run (failed, running, pending or early-stopped)"
    return (text + f"; {compute[k + 'trials']} trial(s), {duration(compute[k + 'trial_seconds'])} of trial time, "
            f"{_resource_text(compute[k + 'resource_seconds'])}")
