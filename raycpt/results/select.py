"""The selection rule: a pure function of the trials table (one row per trial) and the base metrics, testable
without Ray."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from raycpt.core import metrics
from raycpt.core.config import SelectConfig
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


def select_winner(trials: pd.DataFrame, base: dict[str, Any], rule: SelectConfig) -> Selection:
    """Among finished trials whose general ppl <= (1 + max_forgetting) x base, the highest F1 (ties within
    f1_tolerance broken by lower domain ppl); without F1, the lowest domain ppl. If none qualifies, the lowest
    domain ppl overall, flagged."""
    if trials.empty:
        return Selection(None, ["no trials ran"], flagged=True)
    base_general = num(base.get(metrics.base_name(metrics.GENERAL_PPL)))
    bound = (1 + rule.max_forgetting) * base_general if not math.isnan(base_general) else math.inf
    excluded: dict[str, str] = {}
    for row in trials.to_dict("records"):
        general, domain, tid = num(row.get(metrics.GENERAL_PPL)), num(row.get(metrics.DOMAIN_PPL)), row["trial_id"]
        if row["status"] == "stopped":
            excluded[tid] = f"stopped by the scheduler at step {int(num(row.get(metrics.STEP)))}"
        elif row["status"] == "failed":
            excluded[tid] = f"failed: {row.get('error') or 'see its error.txt'}"
        elif row["status"] != "finished":
            excluded[tid] = f"status {row['status']}"
        elif math.isnan(domain):
            excluded[tid] = "no held-out metrics"
        elif general > bound:
            excluded[tid] = (f"forgetting: general ppl {general:.2f} > bound {bound:.2f} "
                             f"({1 + rule.max_forgetting:.2f} x base {base_general:.2f})")
    frame = trials.assign(_domain=trials[metrics.DOMAIN_PPL].map(num),
                          _f1=trials.get(metrics.F1, pd.Series([None] * len(trials))).map(num))
    use_f1 = bool(frame["_f1"].notna().any())

    def ranked(candidates: pd.DataFrame) -> list[str]:
        if not use_f1:
            return list(candidates.sort_values("_domain", na_position="last")["trial_id"])
        # Group F1 values that are within tolerance of the best of the remaining, then order by domain ppl.
        order: list[str] = []
        rest = candidates.sort_values(["_f1", "_domain"], ascending=[False, True], na_position="last")
        while not rest.empty:
            top = rest["_f1"].iloc[0]
            tied = rest[(rest["_f1"] >= top - rule.f1_tolerance) | (rest["_f1"].isna() & math.isnan(top))]
            order += list(tied.sort_values("_domain")["trial_id"])
            rest = rest.drop(tied.index)
        return order

    qualified = frame[~frame["trial_id"].isin(excluded)]
    others = frame[frame["trial_id"].isin(excluded)].sort_values("_domain", na_position="last")
    order = ranked(qualified) + list(others["trial_id"])
    if not qualified.empty:
        winner = order[0]
        row = frame.set_index("trial_id").loc[winner]
        if use_f1:
            tied = qualified[qualified["_f1"] >= row["_f1"] - rule.f1_tolerance]
            reason = (f"highest downstream F1 ({row['_f1']:.4f}) among {len(qualified)} finished trial(s) within "
                      f"the forgetting bound")
            if len(tied) > 1:
                reason += (f"; {len(tied) - 1} other(s) within f1_tolerance {rule.f1_tolerance}, tie broken by "
                           f"lower domain ppl ({row['_domain']:.2f})")
        else:
            reason = (f"lowest domain ppl ({row['_domain']:.2f}) among {len(qualified)} finished trial(s) within "
                      f"the forgetting bound (no F1 measured)")
        return Selection(winner, [reason], False, excluded, order)
    fallback = frame.dropna(subset=["_domain"]).sort_values("_domain")
    if fallback.empty:
        return Selection(None, ["no trial reported held-out metrics"], True, excluded, order)
    winner = fallback["trial_id"].iloc[0]
    return Selection(winner, [f"no trial met the rule (finished and general ppl <= {bound:.2f}); fell back to the "
                              f"lowest domain ppl ({fallback['_domain'].iloc[0]:.2f})"], True, excluded,
                     [winner] + [t for t in order if t != winner])
