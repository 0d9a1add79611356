"""The mixing law of a sweep: raycpt.core.law fitted on every report of the sweep's trials, stored as
`Summary.law` (`law.*` keys, or `{"law.error": ...}` when it cannot be fitted).

Which reports: every report (not only the last) of every trial in the sweep's *best learning-rate region*: the
trials whose train.lr is within a factor LR_REGION_FACTOR (3) of the reference trial's, the reference being the
winner (else the best trial under the rule, else the best on search.metric). The law ignores the learning rate, so
mixing trials whose loss differs because of a poor lr into the fit would blur the mix effect; the region keeps
comparable trials. When the region holds fewer than law.MIN_TRIALS trials or fewer than law.MIN_RATIOS mix ratios,
every trial is used instead (`law.scope` says which). Losses are eval/domain_loss and eval/general_loss (nats),
tokens the report's `tokens`, the mix the trial's sampled train.mix_ratio or the config's.

The budget: `law.target_tokens` from the config, or TARGET_MULTIPLE x the sweep's largest trial budget (a trial's
train.steps x tokens per step); the general-loss bound is the base model's general loss and select.max_forgetting.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from raycpt.core import cpt_law, law, metrics
from raycpt.core.config import ExperimentConfig
from raycpt.results.accounting import tokens_per_step, trial_budget, trial_steps, trial_value

LR_REGION_FACTOR = 3.0
"""Trials whose lr is within this factor of the reference trial's (either way) form the best lr region."""
TARGET_MULTIPLE = 10
"""law.target_tokens = 0 plans for this many times the sweep's largest trial budget."""
BOOTSTRAP = 200
"""Bootstrap resamples of trials for the interval on the best mix."""
ERROR = "law.error"


def reference_trial(trials: list[dict[str, Any]], winner: str | None, order: list[str], metric: str,
                    mode: str) -> dict[str, Any] | None:
    """The trial the best lr region is centred on: the winner, else the first under the rule, else the best last
    value of `metric` (search.metric)."""
    by_id = {t["trial_id"]: t for t in trials}
    for tid in [winner, *(order or [])]:
        if tid in by_id:
            return by_id[tid]
    scored = [t for t in trials if isinstance(t.get(metric), (int, float)) and math.isfinite(t[metric])]
    if not scored:
        return None
    return (min if mode == "min" else max)(scored, key=lambda t: t[metric])


def lr_region(reference: dict[str, Any], cfg: ExperimentConfig) -> tuple[float, float]:
    lr = float(trial_value(reference, cfg, "train.lr"))
    return lr / LR_REGION_FACTOR, lr * LR_REGION_FACTOR


def observations(trials: list[dict[str, Any]], histories: dict[str, pd.DataFrame],
                 cfg: ExperimentConfig) -> list[law.Observation]:
    """Every report of these trials with a finite domain loss and tokens > 0, as law observations."""
    found = []
    for trial in trials:
        history = histories.get(trial["trial_id"])
        if history is None or metrics.DOMAIN_LOSS not in history or metrics.TOKENS not in history:
            continue
        mix = float(trial_value(trial, cfg, "train.mix_ratio"))
        for _, report in history.iterrows():
            tokens, domain = float(report[metrics.TOKENS]), float(report[metrics.DOMAIN_LOSS])
            if not (tokens > 0 and math.isfinite(domain)):
                continue
            general = report.get(metrics.GENERAL_LOSS)
            general = float(general) if general is not None and math.isfinite(float(general)) else None
            found.append(law.Observation(trial["trial_id"], mix, tokens, domain, general))
    return found


def _mixes(trials: list[dict[str, Any]], cfg: ExperimentConfig) -> set[float]:
    return {float(trial_value(t, cfg, "train.mix_ratio")) for t in trials}


def sweep_law(trials: list[dict[str, Any]], histories: dict[str, pd.DataFrame], cfg: ExperimentConfig,
              base: dict[str, Any], winner: str | None, order: list[str]) -> dict[str, Any]:
    """The sweep's `law.*` dict (LawSummary.to_dict() plus how it was scoped), or {"law.error": plain words}."""
    reported = [t for t in trials if t["trial_id"] in histories]
    reference = reference_trial(reported, winner, order, cfg.search.metric, cfg.search.mode)
    if reference is None:
        return {ERROR: "no trial has reported held-out losses yet"}
    if len(_mixes(reported, cfg)) < law.MIN_RATIOS:
        return {ERROR: f"every trial trains at train.mix_ratio {float(cfg.train.mix_ratio):g}, so the law cannot "
                       "tell mixes apart; sweep search.space.train.mix_ratio over 2 or more values"}
    lo, hi = lr_region(reference, cfg)
    region = [t for t in reported if lo * (1 - 1e-9) <= float(trial_value(t, cfg, "train.lr")) <= hi * (1 + 1e-9)]
    enough = len(region) >= law.MIN_TRIALS and len(_mixes(region, cfg)) >= law.MIN_RATIOS
    used = region if enough else reported
    scope = (f"lr region {lo:.3g}-{hi:.3g} ({len(region)} of {len(reported)} trials)" if enough else
             f"all {len(reported)} trials (the lr region {lo:.3g}-{hi:.3g} has {len(region)} trial(s) at "
             f"{len(_mixes(region, cfg))} mix ratio(s), too few)")
    largest = max(trial_budget(t, cfg) for t in trials)
    target = cfg.law.target_tokens or TARGET_MULTIPLE * largest
    base_general = base.get(metrics.base_name(metrics.GENERAL_LOSS))
    try:
        fitted = law.summarize_law(observations(used, histories, cfg), sweep_tokens=largest, target_tokens=target,
                                   base_general_loss=base_general, max_forgetting=cfg.select.max_forgetting,
                                   bootstrap=BOOTSTRAP)
    except ValueError as err:
        return {ERROR: f"{err}; tried on {scope}"}
    return {**fitted.to_dict(), "law.describe": fitted.describe(), "law.scope": scope,
            "law.trials": [t["trial_id"] for t in used], "law.lr_reference_trial": reference["trial_id"],
            "law.lr_reference": float(trial_value(reference, cfg, "train.lr")),
            "law.lr_region": [lo, hi] if enough else None,
            "law.target_tokens_from": "law.target_tokens" if cfg.law.target_tokens else
            f"{TARGET_MULTIPLE} x the largest trial budget ({largest:,} tokens)"}


def describe_law(law_dict: dict[str, Any]) -> str:
    """One line for the terminal and reports."""
    if not law_dict:
        return "not fitted"
    if ERROR in law_dict:
        return f"not fitted: {law_dict[ERROR]}"
    return f"{law_dict['law.describe']}; {law_dict['law.scope']}"


def law_fits(law_dict: dict[str, Any]) -> tuple[law.LawFit, law.LawFit | None]:
    """The domain and general LawFit back from a `law.*` dict (to draw or re-evaluate the curves)."""
    domain = law.LawFit(form=law_dict["law.form"], params=dict(law_dict["law.params_domain"]),
                        loo_error=law_dict["law.loo_error"], target="domain")
    general = None
    if law_dict.get("law.params_general"):
        general = law.LawFit(form=law_dict["law.form_general"], params=dict(law_dict["law.params_general"]),
                             loo_error=law_dict.get("law.loo_error_general") or math.nan, target="general")
    return domain, general


# --- the schedule-aware CPT law and its recommendation for the final run (raycpt.core.cpt_law) ---------------------

REC_BOOTSTRAP = 100
"""Bootstrap resamples of trials for the recommendation's intervals."""


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
        tokens_per_step=per_step, max_forgetting=cfg.select.max_forgetting, bootstrap=REC_BOOTSTRAP,
        seed=cfg.data.seed, max_loo_error=cfg.law.max_loo_error, max_extrapolation=cfg.law.max_extrapolation,
        lr_exponent=cfg.law.lr_horizon_exponent)
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
