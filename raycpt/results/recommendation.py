"""The sweep's schedule-aware CPT law and the final run it recommends: core.forecast.cpt_law fitted on every eval of
every trial that reported one (ASHA-stopped trials included), each trial described by the lr curve it ran, stored as
`Summary.recommendation` (`sweep_recommendation`; {"error": ...} when none can be made). `raycpt analyze --suggest`
turns it into final.yaml and next.yaml (raycpt.results.suggest), `raycpt extend` predicts with its fits, and
plots/cpt_law.png draws them.

The reference trial (the fallback's settings, the candidates' warmup): the winner, else the best trial under the
rule, else the best on search.metric. The budget: `law.target_tokens` from the config, or TARGET_MULTIPLE x the
sweep's largest trial budget (a trial's train.steps x tokens per step); the general-loss bound is the base model's
general loss and select.max_forgetting.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from raycpt.core import metrics
from raycpt.core.config import ExperimentConfig
from raycpt.core.forecast import cpt_law
from raycpt.results.accounting import tokens_per_step, trial_budget, trial_steps, trial_value

TARGET_MULTIPLE = 10
"""law.target_tokens = 0 plans for this many times the sweep's largest trial budget."""
BOOTSTRAP = 100
"""Bootstrap resamples of trials for the recommendation's intervals."""


def reference_trial(trials: list[dict[str, Any]], winner: str | None, order: list[str], metric: str,
                    mode: str) -> dict[str, Any] | None:
    """The trial the recommendation starts from: the winner, else the first under the rule, else the best last
    value of `metric` (search.metric)."""
    by_id = {t["trial_id"]: t for t in trials}
    for tid in [winner, *(order or [])]:
        if tid in by_id:
            return by_id[tid]
    scored = [t for t in trials if isinstance(t.get(metric), (int, float)) and math.isfinite(t[metric])]
    if not scored:
        return None
    return (min if mode == "min" else max)(scored, key=lambda t: t[metric])


def trial_run(trial: dict[str, Any], cfg: ExperimentConfig) -> cpt_law.RunSchedule:
    """The lr curve a trial ran: its own sampled values, else the config's."""
    def value(name: str) -> Any:
        return trial_value(trial, cfg, f"train.{name}")

    return cpt_law.RunSchedule(float(value("lr")), trial_steps(trial, cfg), int(value("warmup_steps")),
                               str(value("schedule")), float(value("decay_fraction")), str(value("decay_shape")),
                               float(value("min_lr_ratio")))


def trial_curves(trials: list[dict[str, Any]], histories: dict[str, pd.DataFrame], cfg: ExperimentConfig
                 ) -> list[cpt_law.Curve]:
    """Every eval of every trial that reported one (ASHA-stopped trials included), as law curves."""
    found = []
    for trial in trials:
        history = histories.get(trial["trial_id"])
        if history is None or metrics.DOMAIN_LOSS not in history or metrics.STEP not in history:
            continue
        rows = history[history[metrics.STEP].notna() & history[metrics.DOMAIN_LOSS].notna()]
        if rows.empty:
            continue
        general = (rows[metrics.GENERAL_LOSS].astype(float).to_numpy()
                   if metrics.GENERAL_LOSS in rows and rows[metrics.GENERAL_LOSS].notna().all() else None)
        found.append(cpt_law.Curve(trial["trial_id"], trial_run(trial, cfg),
                                   float(trial_value(trial, cfg, "train.mix_ratio")),
                                   rows[metrics.STEP].astype(int).to_numpy(),
                                   rows[metrics.DOMAIN_LOSS].astype(float).to_numpy(), general))
    return found


def sweep_recommendation(trials: list[dict[str, Any]], histories: dict[str, pd.DataFrame], cfg: ExperimentConfig,
                         base: dict[str, Any], winner: str | None, order: list[str]) -> dict[str, Any]:
    """The final run the sweep recommends at law.target_tokens (cpt_law.recommend: the law's pick, or the
    fallback with its reasons), with the fits it came from; {"error": ...} without a trial to start from."""
    curves = trial_curves(trials, histories, cfg)
    by_id = {c.trial_id: c for c in curves}
    reference_row = reference_trial([t for t in trials if t["trial_id"] in by_id], winner, order,
                                    cfg.search.metric, cfg.search.mode)
    base_domain = base.get(metrics.base_name(metrics.DOMAIN_LOSS))
    if reference_row is None or base_domain is None:
        return {"error": "no trial has reported held-out losses yet" if reference_row is None else
                "the base model has not been measured"}
    per_step = tokens_per_step(reference_row, cfg)
    largest = max(trial_budget(t, cfg) for t in trials)
    target = cfg.law.target_tokens or TARGET_MULTIPLE * largest
    base_general = base.get(metrics.base_name(metrics.GENERAL_LOSS))
    rec, fits = cpt_law.recommend(
        curves, base_domain_loss=float(base_domain),
        base_general_loss=float(base_general) if base_general is not None else None,
        reference=by_id[reference_row["trial_id"]], total_steps=max(1, math.ceil(target / per_step)),
        tokens_per_step=per_step, max_forgetting=cfg.select.max_forgetting, bootstrap=BOOTSTRAP,
        seed=cfg.data.seed, max_loo_error=cfg.law.max_loo_error, max_extrapolation=cfg.law.max_extrapolation,
        lr_exponent=cfg.law.lr_horizon_exponent, fallback_kind=cfg.law.fallback)
    return {**rec.to_dict(), "target_tokens": target, "tokens_per_step": per_step,
            "reference_trial": reference_row["trial_id"], "curves": len(curves),
            "fits": {name: fit.to_dict() for name, fit in fits.items()}}


def describe_recommendation(rec: dict[str, Any]) -> str:
    """One line for the terminal and reports: what to run next, and how sure the law is."""
    if not rec:
        return "not made"
    if "error" in rec:
        return f"not made: {rec['error']}"
    run = (f"{rec['total_steps']:,} steps ({rec['target_tokens']:,} tokens) at lr {rec['peak_lr']:.3g}, mix "
           f"{rec['mix_ratio']:.2f}, {rec['schedule']}")
    fits = rec.get("fits") or {}
    errors = ", ".join(f"{name} {fit['loo_error']:.1%}" for name, fit in fits.items()
                       if fit.get("loo_error") is not None)
    if rec["source"] == "fallback":
        return f"{run} (fallback: {'; '.join(rec['reasons'])})"

    def loss_text(name: str) -> str:
        value, ci = rec[f"predicted_{name}_loss"], rec.get(f"{name}_loss_ci")
        if value is None:
            return ""
        text = f"{name} ppl {math.exp(value):.2f}"
        return text + (f" [{math.exp(ci[0]):.2f}, {math.exp(ci[1]):.2f}]" if ci else "")

    predicted = ", ".join(t for t in (loss_text("domain"), loss_text("general")) if t)
    return (f"{run}; the CPT law (fit on {rec['curves']} trials' curves, leave-one-trial-out error {errors}) "
            f"predicts {predicted}" + "".join(f"; WARNING: {flag}" for flag in rec.get("flags") or []))
