"""`raycpt analyze DIR --suggest`: turn a sweep's mixing law into the next configs.

* `DIR/final.yaml`: one run at the law's target budget (law.target_tokens), at the law's best mix and the best lr
  region's learning rate (the reference trial's: the winner's), with the reference trial's other sampled values;
  steps = target tokens / tokens per step, warmup and eval_every scaled by the same factor; no search space. Ready
  for `raycpt train` (its name is the sweep's + "-final", so it never writes into the sweep's dir).
* `DIR/next.yaml`: the same sweep with its search space narrowed around the optimum: train.lr log-uniform over the
  best lr region, train.mix_ratio uniform over the law's interval for the best mix (MIX_HALF_WIDTH either side when
  the law has no interval); other swept fields as they were, and as many trials as the sweep made. Ready for
  `raycpt sweep` (name + "-next").
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

from raycpt.core.config import ExperimentConfig, config_from_dict, to_dict
from raycpt.core.errors import ConfigError, InputError
from raycpt.results.accounting import tokens_per_step, trial_steps, trial_value
from raycpt.results.collect import HP_PREFIX
from raycpt.results.summary import Summary
from raycpt.results.sweep_law import ERROR, LR_REGION_FACTOR

FINAL_FILE = "final.yaml"
NEXT_FILE = "next.yaml"
MIX_HALF_WIDTH = 0.1
"""next.yaml's mix range either side of the best mix when the law has no (or a zero-width) interval."""
MIX_DIGITS = 3
"""Mix ratios are written rounded to this many decimals (the law's interval is far wider)."""


def _law_or_error(summary: Summary) -> dict[str, Any]:
    law = summary.law or {}
    if "law.best_mix_ratio" not in law:
        why = law.get(ERROR, "the summary has no mixing law")
        raise InputError(f"--suggest: {summary.experiment_dir}: no mixing law to plan from ({why}); sweep at least 3 "
                         "trials over 2 or more values of search.space.train.mix_ratio, then run analyze again")
    return law


def _reference(summary: Summary, law: dict[str, Any]) -> dict[str, Any]:
    tid = law.get("law.lr_reference_trial")
    return next((t for t in summary.trials if t["trial_id"] == tid), summary.trials[0])


def _checked(raw: dict[str, Any], what: str) -> dict[str, Any]:
    try:
        config_from_dict(raw)
    except ConfigError as err:
        raise InputError(f"--suggest: the {what} config would not validate ({err}); fix the sweep's config") from None
    return raw


def final_config(cfg: ExperimentConfig, summary: Summary, exp_dir: Path) -> dict[str, Any]:
    """The raw config of one run at the law's target budget (see the module docstring)."""
    law = _law_or_error(summary)
    ref = _reference(summary, law)
    raw = to_dict(cfg)
    for key in cfg.search.space:  # the reference trial's sampled values, then the law's
        section, name = key.split(".", 1)
        raw[section][name] = trial_value(ref, cfg, key)
    target = int(law["law.target_tokens"])
    old_steps = trial_steps(ref, cfg)
    steps = max(1, math.ceil(target / tokens_per_step(ref, cfg)))
    scale = steps / old_steps
    train = raw["train"]
    train["lr"] = float(trial_value(ref, cfg, "train.lr"))
    train["mix_ratio"] = round(float(law["law.best_mix_ratio"]), MIX_DIGITS)
    train["steps"], train["tokens"] = steps, 0  # the final run is counted in steps (a token budget would win)
    train["warmup_steps"] = min(steps, int(round(int(train["warmup_steps"]) * scale)))
    train["eval_every"] = max(1, int(round(int(train["eval_every"]) * scale)))
    raw["search"]["space"] = {}
    raw["search"]["num_samples"] = 1
    raw["law"]["target_tokens"] = target
    raw["name"], raw["storage_path"] = f"{Path(exp_dir).resolve().name}-final", str(Path(exp_dir).resolve().parent)
    return _checked(raw, FINAL_FILE)


def next_config(cfg: ExperimentConfig, summary: Summary, exp_dir: Path) -> dict[str, Any]:
    """The raw config of the next sweep, its space narrowed around the law's optimum (see the module docstring)."""
    law = _law_or_error(summary)
    ref = _reference(summary, law)
    raw = to_dict(cfg)
    lo, hi = law.get("law.lr_region") or [float(trial_value(ref, cfg, "train.lr")) / LR_REGION_FACTOR,
                                          float(trial_value(ref, cfg, "train.lr")) * LR_REGION_FACTOR]
    space = dict(raw["search"]["space"])
    space["train.lr"] = {"loguniform": [float(f"{lo:.3g}"), float(f"{min(hi, 1.0):.3g}")]}
    best = float(law["law.best_mix_ratio"])
    ci = law.get("law.best_mix_ratio_ci")
    low, high = ci if ci and ci[1] - ci[0] > 10 ** -MIX_DIGITS else (best - MIX_HALF_WIDTH, best + MIX_HALF_WIDTH)
    low, high = round(max(0.0, low), MIX_DIGITS), round(min(1.0, high), MIX_DIGITS)
    space["train.mix_ratio"] = {"uniform": [low, high]} if high > low else {"choice": [round(best, MIX_DIGITS)]}
    raw["search"]["space"] = space
    # as many trials as the sweep ran, though grids over lr or mix_ratio became ranges
    raw["search"]["num_samples"] = math.ceil(_trials(cfg.search.space, cfg.search.num_samples) / _trials(space, 1))
    raw["law"]["target_tokens"] = int(law["law.target_tokens"])
    raw["name"], raw["storage_path"] = f"{Path(exp_dir).resolve().name}-next", str(Path(exp_dir).resolve().parent)
    return _checked(raw, NEXT_FILE)


def _trials(space: dict[str, Any], num_samples: int) -> int:
    """Trials a space makes: num_samples x the size of every grid."""
    return num_samples * math.prod(len(spec["grid"]) for spec in space.values() if "grid" in spec)


def _write(path: Path, raw: dict[str, Any], header: str) -> Path:
    path.write_text(header + yaml.safe_dump(raw, sort_keys=False))
    return path


def write_suggestions(exp_dir: Path, cfg: ExperimentConfig, summary: Summary) -> list[Path]:
    """Write DIR/final.yaml and DIR/next.yaml; raises InputError when the sweep has no mixing law."""
    exp_dir = Path(exp_dir)
    final, nxt = final_config(cfg, summary, exp_dir), next_config(cfg, summary, exp_dir)
    law = summary.law
    ci = law.get("law.best_mix_ratio_ci")
    why = (f"# From the mixing law of {exp_dir} ({law['law.scope']}): best mix {law['law.best_mix_ratio']:.3f}"
           + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "") + f" at {int(law['law.target_tokens']):,} tokens.\n")
    ref = _reference(summary, law)
    swept = {k.removeprefix(HP_PREFIX) for k in ref if k.startswith(HP_PREFIX)}
    others = sorted(swept - {"train.lr", "train.mix_ratio", "train.steps"})
    final_note = (f"# One run at the target budget: raycpt train {exp_dir / FINAL_FILE}\n# lr"
                  + "".join(f", {k}" for k in others) + f" from trial {ref['trial_id']}; steps, warmup_steps and "
                  "eval_every scaled to the budget.\n")
    next_note = f"# The next sweep, narrowed around the optimum: raycpt sweep {exp_dir / NEXT_FILE}\n"
    return [_write(exp_dir / FINAL_FILE, final, why + final_note), _write(exp_dir / NEXT_FILE, nxt, why + next_note)]
