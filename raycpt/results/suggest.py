"""`raycpt analyze DIR --suggest`: turn a sweep into the next configs.

* `DIR/final.yaml`: one run at the target budget (law.target_tokens) as the sweep recommends it
  (`Summary.recommendation`, raycpt.results.recommendation.sweep_recommendation): the schedule-aware CPT law's peak lr,
  mix and schedule when its fit is good enough and the run within its support, else the fallback (law.fallback:
  Ibrahim et al.'s re-warm / cosine re-decay / replay recipe around the reference trial's lr, or that trial's own
  settings; the lr scaled by the token-horizon rule) — the file's header says which, and why. The reference
  trial's other sampled values; steps = target tokens / tokens per step, the recommendation's warmup and min lr,
  eval_every scaled by the same factor; no search space. Ready for `raycpt train` (its name is the sweep's +
  "-final", so it never writes into the sweep's dir).
* `DIR/next.yaml`: the same sweep with its search space narrowed around the recommendation (the law's pick or the
  fallback, as in final.yaml): train.lr log-uniform from lr / LR_REGION_FACTOR to lr x LR_REGION_FACTOR (capped at
  1), lr being the recommended peak lr brought back from the target budget to the reference trial's tokens by the
  horizon rule (the next sweep runs at the sweep's budget; for the fallback it is the reference trial's own lr),
  train.mix_ratio uniform over the recommended mix +- MIX_HALF_WIDTH (clipped to
  [0, 1]); the recommendation's bootstrap intervals are on its predicted losses, not on its lr or mix, so the widths
  are these fixed ones. Other swept fields as they were, and as many trials as the sweep made. Ready for `raycpt
  sweep` (name + "-next").
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any

import yaml

from raycpt.core import metrics
from raycpt.core.config import ExperimentConfig, config_from_dict, to_dict
from raycpt.core.errors import ConfigError, InputError
from raycpt.core.forecast.cpt_law import horizon_lr
from raycpt.results.accounting import trial_steps, trial_value
from raycpt.results.collect import HP_PREFIX
from raycpt.results.recommendation import describe_recommendation
from raycpt.results.summary import Summary

FINAL_FILE = "final.yaml"
NEXT_FILE = "next.yaml"
LR_REGION_FACTOR = 3.0
"""next.yaml's lr range: the recommended peak lr divided and multiplied by this."""
MIX_HALF_WIDTH = 0.1
"""next.yaml's mix range either side of the recommended mix."""
MIX_DIGITS = 3
"""Mix ratios are written rounded to this many decimals."""


def _recommendation_or_error(summary: Summary) -> dict[str, Any]:
    rec = summary.recommendation or {}
    if "peak_lr" not in rec:
        why = rec.get("error", "the summary has no recommendation; run `raycpt analyze DIR` with this raycpt")
        raise InputError(f"--suggest: {summary.experiment_dir}: nothing to plan from ({why}); run at least one trial "
                         "to its first eval and measure the base model, then run analyze again")
    return rec


def _reference(summary: Summary, tid: str | None) -> dict[str, Any]:
    return next((t for t in summary.trials if t["trial_id"] == tid), summary.trials[0])


def _checked(raw: dict[str, Any], what: str) -> dict[str, Any]:
    try:
        config_from_dict(raw)
    except ConfigError as err:
        raise InputError(f"--suggest: the {what} config would not validate ({err}); fix the sweep's config") from None
    return raw


def final_config(cfg: ExperimentConfig, summary: Summary, exp_dir: Path) -> dict[str, Any]:
    """The raw config of one run at the recommended budget and settings (see the module docstring)."""
    rec = _recommendation_or_error(summary)
    ref = _reference(summary, rec.get("reference_trial"))
    raw = to_dict(cfg)
    for key in cfg.search.space:  # the reference trial's sampled values, then the recommendation's
        section, name = key.split(".", 1)
        raw[section][name] = trial_value(ref, cfg, key)
    steps = int(rec["total_steps"])
    scale = steps / trial_steps(ref, cfg)
    train = raw["train"]
    train["lr"] = float(f"{float(rec['peak_lr']):.4g}")
    train["mix_ratio"] = round(float(rec["mix_ratio"]), MIX_DIGITS)
    train["schedule"] = rec["schedule"]
    train["steps"], train["tokens"] = steps, 0  # the final run is counted in steps (a token budget would win)
    if rec.get("warmup_steps") is not None:  # the recommendation's own (summaries before it carried one: scaled)
        train["warmup_steps"] = int(rec["warmup_steps"])
    else:
        train["warmup_steps"] = min(steps, int(round(int(train["warmup_steps"]) * scale)))
    if rec.get("min_lr_ratio") is not None:
        train["min_lr_ratio"] = float(rec["min_lr_ratio"])
    train["eval_every"] = max(1, int(round(int(train["eval_every"]) * scale)))
    raw["search"]["space"] = {}
    raw["search"]["num_samples"] = 1
    raw["law"]["target_tokens"] = int(rec["target_tokens"])
    raw["name"], raw["storage_path"] = f"{Path(exp_dir).resolve().name}-final", str(Path(exp_dir).resolve().parent)
    return _checked(raw, FINAL_FILE)


def next_config(cfg: ExperimentConfig, summary: Summary, exp_dir: Path) -> dict[str, Any]:
    """The raw config of the next sweep, its space narrowed around the recommendation (see the module docstring)."""
    rec = _recommendation_or_error(summary)
    raw = to_dict(cfg)
    # next.yaml sweeps at the sweep's own budget: the recommended lr (for the target budget) brought back to the
    # reference trial's tokens by the same horizon rule; for the fallback that is the reference trial's own lr
    ref_tokens = _reference(summary, rec.get("reference_trial")).get(metrics.TOKENS)
    lr = float(rec["peak_lr"])
    if ref_tokens and rec.get("target_tokens"):
        lr = horizon_lr(lr, float(rec["target_tokens"]), float(ref_tokens), cfg.law.lr_horizon_exponent)
    space = dict(raw["search"]["space"])
    space["train.lr"] = {"loguniform": [float(f"{lr / LR_REGION_FACTOR:.3g}"),
                                        float(f"{min(lr * LR_REGION_FACTOR, 1.0):.3g}")]}
    best = float(rec["mix_ratio"])
    low = round(max(0.0, best - MIX_HALF_WIDTH), MIX_DIGITS)
    high = round(min(1.0, best + MIX_HALF_WIDTH), MIX_DIGITS)
    space["train.mix_ratio"] = {"uniform": [low, high]} if high > low else {"choice": [round(best, MIX_DIGITS)]}
    raw["search"]["space"] = space
    # as many trials as the sweep ran, though grids over lr or mix_ratio became ranges
    raw["search"]["num_samples"] = math.ceil(_trials(cfg.search.space, cfg.search.num_samples) / _trials(space, 1))
    raw["law"]["target_tokens"] = int(rec["target_tokens"])
    raw["name"], raw["storage_path"] = f"{Path(exp_dir).resolve().name}-next", str(Path(exp_dir).resolve().parent)
    return _checked(raw, NEXT_FILE)


def _trials(space: dict[str, Any], num_samples: int) -> int:
    """Trials a space makes: num_samples x the size of every grid."""
    return num_samples * math.prod(len(spec["grid"]) for spec in space.values() if "grid" in spec)


def _write(path: Path, raw: dict[str, Any], header: str) -> Path:
    path.write_text(header + yaml.safe_dump(raw, sort_keys=False))
    return path


def write_suggestions(exp_dir: Path, cfg: ExperimentConfig, summary: Summary) -> list[Path]:
    """Write DIR/final.yaml and DIR/next.yaml; raises InputError when the sweep has nothing to plan from."""
    exp_dir = Path(exp_dir)
    final, nxt = final_config(cfg, summary, exp_dir), next_config(cfg, summary, exp_dir)
    rec = summary.recommendation
    why = "".join(f"# {line}\n" for line in textwrap.wrap(
        f"From {exp_dir}: {describe_recommendation(rec)}.", 116))
    ref = _reference(summary, rec.get("reference_trial"))
    swept = {k.removeprefix(HP_PREFIX) for k in ref if k.startswith(HP_PREFIX)}
    others = sorted(swept - {"train.lr", "train.mix_ratio", "train.steps", "train.schedule"})
    source = ("the CPT law's pick" if rec["source"] == "law" else
              "NOT the law's pick: the fallback (its reasons above); no prediction comes with it")
    final_note = (f"# One run at the target budget: raycpt train {exp_dir / FINAL_FILE}\n# lr, mix_ratio and schedule: "
                  f"{source}" + "".join(f"; {k}" for k in others) + f" from trial {ref['trial_id']}; warmup_steps "
                  "and eval_every scaled to the budget.\n")
    ranges = (f"train.lr from the recommended lr {float(rec['peak_lr']):.3g} / {LR_REGION_FACTOR:g} to x "
              f"{LR_REGION_FACTOR:g}, train.mix_ratio the recommended mix {float(rec['mix_ratio']):.3g} +- "
              f"{MIX_HALF_WIDTH:g} (fixed widths: the CPT law's intervals are on its predicted losses, not on lr or "
              "mix).")
    next_note = (f"# The next sweep, narrowed around the recommendation: raycpt sweep {exp_dir / NEXT_FILE}\n"
                 + "".join(f"# {line}\n" for line in textwrap.wrap(ranges, 116)))
    return [_write(exp_dir / FINAL_FILE, final, why + final_note), _write(exp_dir / NEXT_FILE, nxt, why + next_note)]
