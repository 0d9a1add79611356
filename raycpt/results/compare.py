"""Paired comparisons of two models on the same held-out texts and blocks: the differences the selection and
the card report with 95% bootstrap intervals (`lift/...` against the base model, `vs_best/...` against the
winner). Inputs are the flat metric rows trials and the base model report."""

from __future__ import annotations

from typing import Any

import numpy as np

from raycpt.core import metrics
from raycpt.core.eval.stats import Interval, paired_f1_difference, paired_ppl_change

VS_BEST_PREFIX = "vs_best/"
"""Paired difference of a trial against the winner: 'vs_best/f1'."""


def _as_losses(value: Any) -> np.ndarray | None:
    """Per-block losses as an array (None when `value` is not a non-empty list of them)."""
    return np.asarray(value, dtype=np.float64) if isinstance(value, (list, tuple)) and value else None


def _losses(row: dict[str, Any], name: str) -> np.ndarray | None:
    return _as_losses(row.get(name))


def _paired_block_ppl(mine: np.ndarray, theirs: np.ndarray, block_size: int) -> Interval:
    """ppl(mine) / ppl(theirs) - 1 on the same blocks (each block_size - 1 predicted tokens), paired bootstrap."""
    tokens = np.full(len(mine), block_size - 1, dtype=np.float64)
    return paired_ppl_change(mine * tokens, tokens, theirs * tokens, tokens)


def paired_lifts(row: dict[str, Any], reference: dict[str, Any], *, row_prefix: str, reference_prefix: str,
                 out_prefix: str, labels: list[str] | None, classes: list[str] | None, block_size: int
                 ) -> dict[str, float]:
    """F1(row) - F1(reference) on the same texts (absolute) and ppl(row) / ppl(reference) - 1 on the same blocks
    (relative), each with its interval, under `out_prefix` ('lift/f1', 'lift/f1_ci_low', ...). Metrics are read
    from each row under its prefix ('eval/', 'base/', 'test/', 'base/test/'); missing inputs give no entry."""
    def name(prefix: str, metric: str) -> str:
        return prefix + metric.removeprefix(metrics.EVAL_PREFIX)

    out: dict[str, float] = {}
    for f1_name, predictions in metrics.DOWNSTREAM.items():  # the probe's F1 and prompted classification's
        preds, ref_preds = row.get(name(row_prefix, predictions)), reference.get(name(reference_prefix, predictions))
        if labels and preds and ref_preds and len(preds) == len(labels) == len(ref_preds):
            out.update(paired_f1_difference(labels, list(preds), list(ref_preds), labels=classes).to_dict(
                name(out_prefix, f1_name)))
    for losses_name, ppl_name in ((metrics.DOMAIN_BLOCK_LOSSES, metrics.DOMAIN_PPL),
                                  (metrics.GENERAL_BLOCK_LOSSES, metrics.GENERAL_PPL)):
        mine, theirs = _losses(row, name(row_prefix, losses_name)), _losses(reference, name(reference_prefix,
                                                                                              losses_name))
        if mine is not None and theirs is not None and len(mine) == len(theirs):
            out.update(_paired_block_ppl(mine, theirs, block_size).to_dict(name(out_prefix, ppl_name)))
    return out


STOP_NOISE = "asha/within_noise_of"
"""A trial row's key: the trial ids it was not worse than beyond noise when ASHA stopped it (empty: a clear stop)."""


def stops_within_noise(rows: list[dict[str, Any]], histories: dict[str, Any], *, metric: str, block_size: int
                       ) -> dict[str, list[str]]:
    """For every trial ASHA stopped: the trials that went on past its last report yet were not better than it at
    that step beyond the noise of the validation blocks (the paired 95% interval of their ppl ratio on the same
    blocks includes 0). A stop with such trials was decided inside the noise. Only ppl metrics (`metric`
    eval/domain_ppl or eval/general_ppl) have the per-block losses this needs; other metrics give {}."""
    losses_name = {metrics.DOMAIN_PPL: metrics.DOMAIN_BLOCK_LOSSES,
                   metrics.GENERAL_PPL: metrics.GENERAL_BLOCK_LOSSES}.get(metric)
    if losses_name is None:
        return {}

    def blocks_at(tid: str, step: int) -> np.ndarray | None:
        history = histories.get(tid)
        if history is None or losses_name not in history or metrics.STEP not in history:
            return None
        at = history[history[metrics.STEP] == step]
        return _as_losses(at[losses_name].iloc[-1]) if len(at) else None

    out: dict[str, list[str]] = {}
    for row in rows:
        if row.get("status") != "stopped" or row.get(metrics.STEP) is None:
            continue
        tid, step = row["trial_id"], int(row[metrics.STEP])
        mine = blocks_at(tid, step)
        if mine is None:
            continue
        close = []
        for other in rows:
            if other is row or int(other.get(metrics.STEP) or 0) <= step:
                continue  # only the trials that went on past this rung
            theirs = blocks_at(other["trial_id"], step)
            if theirs is None or len(theirs) != len(mine):
                continue
            if not _paired_block_ppl(mine, theirs, block_size).excludes(0):
                close.append(other["trial_id"])
        out[tid] = close
    return out
