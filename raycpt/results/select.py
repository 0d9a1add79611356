"""The selection rule (v2): a pure function of the trials table (one row per trial, with each finished trial's
validation predictions and per-block losses) and the base model's metrics, testable without Ray.

1. Eligible: finished; general ppl (point estimate) within (1 + select.max_forgetting) x the base model's (when
   the sweep has a general corpus, a trial without a general ppl, or a base model without one, is not eligible;
   without a general corpus forgetting is not measured and the bound does not apply); validation F1 not
   significantly below the base model's (the paired 95% interval of F1(trial) - F1(base) lies wholly below 0).
2. Among eligible trials, the one with the highest validation F1 (select.metric: the probe's or the prompt's;
   or an lm-eval score, `lm_eval/<task>/<metric>`, paired through its per-example values) leads; every eligible
   trial whose paired difference to the leader has an interval that includes 0 is tied with it, and ties go to
   the lower domain ppl.
   The rest are ranked the same way, group by group. Without a labelled task: lowest domain ppl.
3. None eligible: the lowest domain ppl among the trials that kept their weights wins, flagged (the disk policy
   deletes stopped trials' weights; a pick that cannot be exported is no pick).
4. The base model is a candidate: unless the winner beats it on validation F1 significantly (the paired interval
   lies wholly above 0) and lowers domain ppl within the forgetting bound, the verdict says that no trial beats
   the base model (the winner is still exported: the user asked for an adapted model).

The bound uses the point estimate of general ppl: the interval of a trial's forgetting is reported beside it, but
a bound on an interval would let noisier held-out sets admit more forgetting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from raycpt.core import metrics
from raycpt.core.config import SelectConfig
from raycpt.core.eval.stats import Interval, paired_f1_difference, paired_mean_difference
from raycpt.results.collect import WEIGHTS_KEPT
from raycpt.results.format import num


@dataclass
class Selection:
    trial_id: str | None
    reasons: list[str] = field(default_factory=list)
    flagged: bool = False
    """True when no trial met the rule and the fallback picked the winner."""
    excluded: dict[str, str] = field(default_factory=dict)
    """trial id -> why the rule excluded it."""
    order: list[str] = field(default_factory=list)
    """All trial ids, best first under the rule."""
    beats_base: bool | None = None
    """The winner beats the base model (rule 4); None without a labelled task."""
    verdict: str = ""
    """Rule 4 in plain words."""


def _predictions(row: dict[str, Any], key: str = metrics.PREDICTIONS) -> list[str] | None:
    value = row.get(key)
    return list(value) if isinstance(value, (list, tuple)) and value else None


def f1_gap(a: dict[str, Any], b: dict[str, Any], labels: list[str] | None, classes: list[str] | None,
           predictions: str = metrics.PREDICTIONS) -> Interval | None:
    """Paired interval of F1(a) - F1(b) on the validation texts, from the per-text `predictions` (the probe's, or
    prompted classification's); None when either lacks them."""
    pred_a, pred_b = _predictions(a, predictions), _predictions(b, predictions)
    if labels is None or pred_a is None or pred_b is None or len(pred_a) != len(labels) or len(pred_b) != len(labels):
        return None
    return paired_f1_difference(labels, pred_a, pred_b, labels=classes)


def score_label(metric: str) -> str:
    """How the rule's lines name select.metric: 'F1', 'prompt_f1', 'lm_eval/known_mc/acc'."""
    return "F1" if metric == metrics.F1 else metrics.short_name(metric) if metric in metrics.DOWNSTREAM else metric


def score_gap(a: dict[str, Any], b: dict[str, Any], labels: list[str] | None, classes: list[str] | None,
              metric: str = metrics.F1) -> Interval | None:
    """Paired interval of score(a) - score(b) for `metric` (select.metric): F1 from the per-text predictions, an
    lm-eval score from its per-example values on the same documents; None when either lacks them."""
    if metric in metrics.DOWNSTREAM:
        return f1_gap(a, b, labels, classes, metrics.DOWNSTREAM[metric])
    values_a, values_b = _predictions(a, metrics.paired_values(metric)), _predictions(b, metrics.paired_values(metric))
    if values_a is None or values_b is None or len(values_a) != len(values_b):
        return None
    return paired_mean_difference(values_a, values_b)


def select_winner(trials: pd.DataFrame, base: dict[str, Any], rule: SelectConfig,
                  labels: list[str] | None = None, classes: list[str] | None = None) -> Selection:
    """The rule above. `labels`/`classes`: the task's validation labels and classes, which the predictions in
    `trials` and `base` (under `eval/predictions` and `base/predictions`) are scored against."""
    if trials.empty:
        return Selection(None, ["no trials ran"], flagged=True)
    base_general = num(base.get(metrics.base_name(metrics.GENERAL_PPL)))
    bound = (1 + rule.max_forgetting) * base_general if not math.isnan(base_general) else math.inf
    metric, paired = rule.metric, metrics.paired_values(rule.metric)
    base_row = {paired: base.get(metrics.base_name(paired))}
    rows = {row["trial_id"]: row for row in trials.to_dict("records")}
    # a general corpus exists when the base model or any trial has a general ppl; without one, forgetting is not
    # measured and the bound does not apply
    general_measured = not math.isnan(base_general) or any(
        not math.isnan(num(row.get(metrics.GENERAL_PPL))) for row in rows.values())
    excluded: dict[str, str] = {}
    for tid, row in rows.items():
        general, domain = num(row.get(metrics.GENERAL_PPL)), num(row.get(metrics.DOMAIN_PPL))
        below_base = score_gap(row, base_row, labels, classes, metric)
        if row["status"] == "stopped":
            excluded[tid] = f"stopped by the scheduler at step {int(num(row.get(metrics.STEP)))}"
        elif row["status"] == "failed":
            excluded[tid] = f"failed: {row.get('error') or 'see its error.txt'}"
        elif row["status"] != "finished":
            excluded[tid] = f"status {row['status']}"
        elif math.isnan(domain):
            excluded[tid] = "no held-out metrics"
        elif math.isnan(general) and general_measured:
            excluded[tid] = "no general ppl to check forgetting against"
        elif math.isnan(base_general) and general_measured:
            excluded[tid] = "the base model has no general ppl to bound forgetting by (its measurement is missing)"
        elif general > bound:
            excluded[tid] = (f"forgetting: general ppl {general:.2f} > bound {bound:.2f} "
                             f"({1 + rule.max_forgetting:.2f} x base {base_general:.2f})")
        elif below_base is not None and below_base.high < 0:
            excluded[tid] = (f"{score_label(metric)} significantly below the base model's (paired difference "
                             f"{below_base.value:+.3f}, 95% CI [{below_base.low:+.3f}, {below_base.high:+.3f}])")
    eligible = [tid for tid in rows if tid not in excluded]
    use_f1 = any(not math.isnan(num(rows[t].get(metric))) for t in eligible)

    def domain(tid: str) -> float:
        value = num(rows[tid].get(metrics.DOMAIN_PPL))
        return math.inf if math.isnan(value) else value

    def f1(tid: str) -> float:
        value = num(rows[tid].get(metric))
        return -math.inf if math.isnan(value) else value

    def tied_with(leader: str, candidates: list[str]) -> list[str]:
        tied = []
        for tid in candidates:
            gap = score_gap(rows[tid], rows[leader], labels, classes, metric)
            # without predictions (results of an older raycpt), only equal F1 ties
            if tid == leader or (gap.contains(0.0) if gap is not None else f1(tid) == f1(leader)):
                tied.append(tid)
        return sorted(tied, key=domain)

    order: list[str] = []
    rest = list(eligible)
    while rest:
        if not use_f1:
            order += sorted(rest, key=domain)
            break
        leader = max(rest, key=lambda t: (f1(t), -domain(t)))
        group = tied_with(leader, rest)
        order += group
        rest = [t for t in rest if t not in group]
    others = sorted(excluded, key=domain)
    if not eligible:
        scored = [t for t in sorted(rows, key=domain) if not math.isnan(num(rows[t].get(metrics.DOMAIN_PPL)))]
        # only a trial whose weights were kept can be exported (the disk policy deletes stopped trials' weights)
        fallback = [t for t in scored if rows[t].get(WEIGHTS_KEPT, True) is not False]
        if not fallback:
            why = ("no trial reported held-out metrics" if not scored else
                   "no trial met the rule and none kept its weights to fall back on (set checkpoint.keep_weights=all "
                   "to keep stopped trials' weights)")
            return Selection(None, [why], True, excluded, others)
        winner = fallback[0]
        without = len(scored) - len(fallback)
        beats, verdict = _versus_base(rows[winner], base, base_row, labels, classes, metric)
        return Selection(winner, [f"no trial met the rule (finished, general ppl <= {bound:.2f}, F1 not below the "
                                  f"base model's); fell back to the lowest domain ppl ({domain(winner):.2f})"
                                  + (f" among the trials that kept their weights ({without} without weights left out)"
                                     if without else "")],
                         True, excluded, [winner] + [t for t in others if t != winner],
                         None if beats is None else False, verdict)
    winner = order[0]
    if use_f1:
        leader = max(eligible, key=lambda t: (f1(t), -domain(t)))
        tied = tied_with(leader, eligible)
        label = score_label(metric)
        reason = (f"highest validation {label} ({f1(leader):.4f}) among {len(eligible)} eligible trial(s)"
                  if winner == leader else
                  f"tied with the highest validation {label} ({f1(leader):.4f}, trial {leader})")
        if len(tied) > 1:
            reason += (f"; {len(tied) - 1} other(s) within the paired 95% interval of the best, tie broken by lower "
                       f"domain ppl ({domain(winner):.2f})")
    else:
        reason = (f"lowest domain ppl ({domain(winner):.2f}) among {len(eligible)} eligible trial(s) (no F1 "
                  "measured)")
    beats, verdict = _versus_base(rows[winner], base, base_row, labels, classes, metric)
    return Selection(winner, [reason], False, excluded, order + others, beats, verdict)


def _versus_base(row: dict[str, Any], base: dict[str, Any], base_row: dict[str, Any], labels: list[str] | None,
                 classes: list[str] | None, metric: str = metrics.F1) -> tuple[bool | None, str]:
    """Rule 4: does the winner beat the base model (significantly higher validation F1 and lower domain ppl)?"""
    base_domain = num(base.get(metrics.base_name(metrics.DOMAIN_PPL)))
    lower_domain = not math.isnan(base_domain) and num(row.get(metrics.DOMAIN_PPL)) < base_domain
    if math.isnan(num(row.get(metric))) or math.isnan(num(base.get(metrics.base_name(metric)))):
        if math.isnan(base_domain):
            return None, ""
        return None, ("it lowers domain ppl below the base model's" if lower_domain
                      else "no trial lowers domain ppl below the base model's")
    gap = score_gap(row, base_row, labels, classes, metric)
    label = score_label(metric)
    if gap is None:
        return None, f"{label} against the base model has no interval (no per-text values recorded)"
    if gap.low > 0 and lower_domain:
        return True, (f"it beats the base model on validation {label} ({gap.value:+.3f}, 95% CI [{gap.low:+.3f}, "
                      f"{gap.high:+.3f}]) and lowers domain ppl")
    return False, (f"no trial beats the base model on downstream {label} (best: {gap.value:+.3f}, 95% CI "
                   f"[{gap.low:+.3f}, {gap.high:+.3f}] on validation)" if gap.low <= 0 else
                   f"no trial beats the base model: the best {label} comes without lower domain ppl")
