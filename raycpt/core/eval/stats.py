"""Seeded bootstrap confidence intervals for the two numbers a sweep's winner is picked by: macro-F1 and perplexity.

Why: the probe's test split and the held-out split are finite samples, so two trials' F1 (or perplexity) can differ
by noise alone. Each metric here comes with a 95% interval, and a comparison of two trials comes as a *paired*
difference whose interval says whether the gap is real (`Interval.excludes(0)`).

How: the percentile bootstrap. The evaluation units (test texts for F1; held-out blocks or documents for
perplexity) are resampled with replacement `samples` times, the metric is recomputed on every resample, and the
interval is the (1 - confidence) / 2 and (1 + confidence) / 2 quantiles of those recomputed values. The reported
`value` is always the metric on the full, unresampled set.

Paired differences: when two models are scored on the same units, their errors are correlated (most texts are
easy or hard for both). Resampling the *same* rows for both models and taking the difference on every resample
cancels that shared noise, so the paired interval is much narrower than two separate intervals would suggest
(two overlapping intervals do not mean "no difference").

Everything is plain numpy, seeded with `np.random.default_rng(seed)`: the same inputs and seed give the same
interval, bit for bit. Resamples are drawn and scored in chunks so memory stays at tens of MB for ~20k texts and
2000 resamples.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

CONFIDENCE = 0.95  # the conventional two-sided level: a 1-in-20 chance the interval misses the true value
BOOTSTRAP_SAMPLES = 2000  # enough that the 2.5%/97.5% quantiles move by well under their own width between seeds

# Elements per chunk of resampled indices (a [rows, n] block): 2**21 int64 is 16 MiB, and scoring a chunk holds a
# handful of such arrays, so peak memory stays well under a few hundred MB whatever n and `samples` are.
_CHUNK_ELEMENTS = 2**21


@dataclass(frozen=True)
class Interval:
    """A point estimate with its confidence interval [low, high]."""

    value: float
    low: float
    high: float

    def __post_init__(self) -> None:
        if math.isnan(self.low) or math.isnan(self.high) or self.low > self.high:
            raise ValueError(f"an interval needs low <= high, got [{self.low}, {self.high}]")

    def contains(self, x: float) -> bool:
        """Whether x lies in [low, high] (ends included)."""
        return self.low <= x <= self.high

    def excludes(self, x: float = 0.0) -> bool:
        """Whether x lies outside the interval: for a difference, `excludes(0)` means the gap is significant."""
        return not self.contains(x)

    @property
    def width(self) -> float:
        return self.high - self.low

    @property
    def half_width(self) -> float:
        return self.width / 2

    def to_dict(self, prefix: str) -> dict[str, float]:
        """Flat metrics: `{prefix: value, prefix_ci_low: low, prefix_ci_high: high}`."""
        return {prefix: float(self.value), f"{prefix}_ci_low": float(self.low), f"{prefix}_ci_high": float(self.high)}


# ---------------------------------------------------------------------------------------------------- validation


def _check_options(samples: int, confidence: float) -> None:
    if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 1:
        raise ValueError(f"samples must be a positive integer, got {samples!r}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be strictly between 0 and 1, got {confidence!r}")


def _is_missing(x: Any) -> bool:
    return x is None or (isinstance(x, (float, np.floating)) and math.isnan(x))


def _label_array(seq: Sequence[Hashable] | np.ndarray, what: str) -> list:
    if isinstance(seq, np.ndarray):
        if seq.ndim != 1:
            raise ValueError(f"{what} must be a 1-D sequence of labels, got shape {seq.shape}")
        values = seq.tolist()
    else:
        values = list(seq)  # not np.asarray: that would silently turn a mix of ints and strings into strings
    if any(_is_missing(x) for x in values):
        raise ValueError(f"{what} contains missing (None/NaN) labels")
    return values


def _float_array(values: Sequence[float] | np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{what} is empty: a bootstrap needs at least one unit")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} contains NaN or infinite values")
    return arr


def _check_codes(codes: np.ndarray, n_classes: int, what: str) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.ndim != 1:
        raise ValueError(f"{what} must be 1-D, got shape {codes.shape}")
    if codes.size == 0:
        return codes.astype(np.intp)  # an empty list is float64 to numpy; the caller reports the emptiness
    if codes.dtype.kind not in "iu":
        raise ValueError(f"{what} must be integer class codes (see encode_labels), got dtype {codes.dtype}")
    if codes.min() < 0 or codes.max() >= n_classes:
        raise ValueError(f"{what} has codes outside [0, {n_classes})")
    return codes.astype(np.intp, copy=False)


# ---------------------------------------------------------------------------------------------------- labels


def encode_labels(y_true: Sequence[Hashable] | np.ndarray, *preds: Sequence[Hashable] | np.ndarray,
                  labels: Sequence[Hashable] | None = None) -> tuple:
    """Map labels (strings, ints, ...) to int codes 0..K-1, the same mapping for the truth and every prediction.

    Returns `(true_codes, *pred_codes, classes)`; `classes` is the sorted list of labels, code i meaning
    `classes[i]`. By default the classes are the union of all labels seen; pass `labels` (e.g. the probe's
    train-and-test classes) to fix them, which also counts a class absent from this split as F1 0, as sklearn's
    `f1_score(labels=...)` does. Missing labels (None/NaN) and sequences of different lengths raise ValueError."""
    seqs = [_label_array(y_true, "y_true")] + [_label_array(p, f"prediction {i}") for i, p in enumerate(preds)]
    for i, seq in enumerate(seqs[1:]):
        if len(seq) != len(seqs[0]):
            raise ValueError(f"prediction {i} has {len(seq)} labels but y_true has {len(seqs[0])}")
    try:
        seen = set().union(*seqs)
        if labels is None:
            classes = sorted(seen)
        else:
            classes = sorted(set(_label_array(labels, "labels")))
    except TypeError as exc:
        raise ValueError(f"labels must be hashable and of one comparable type (e.g. all strings): {exc}") from None
    unknown = seen - set(classes)
    if unknown:
        raise ValueError(f"labels not in the given classes: {sorted(map(repr, unknown))[:5]}")
    index = {c: i for i, c in enumerate(classes)}
    codes = [np.fromiter((index[x] for x in seq), dtype=np.intp, count=len(seq)) for seq in seqs]
    return (*codes, classes)


# ---------------------------------------------------------------------------------------------------- macro-F1


def _f1_from_counts(tp: np.ndarray, true_sum: np.ndarray, pred_sum: np.ndarray) -> np.ndarray:
    """Macro-F1 over the last axis, as sklearn computes it: per class 2*tp / (true + pred), 0 where both are 0
    (labels given, zero_division=0), then the plain mean over all classes."""
    tp = tp.astype(np.float64, copy=False)
    denom = true_sum.astype(np.float64) + pred_sum.astype(np.float64)
    per_class = np.divide(2.0 * tp, denom, out=np.zeros_like(denom), where=denom != 0)
    return per_class.sum(axis=-1) / per_class.shape[-1]


def macro_f1(y_true_codes: Sequence[int] | np.ndarray, y_pred_codes: Sequence[int] | np.ndarray, n_classes: int,
             weights: Sequence[float] | np.ndarray | None = None) -> float:
    """Macro-F1 over all `n_classes` classes; equals `sklearn.metrics.f1_score(y_true, y_pred, average="macro",
    labels=range(n_classes), zero_division=0, sample_weight=weights)`.

    A class neither true nor predicted anywhere scores 0 and still counts in the mean (sklearn's behaviour when the
    labels are given). `weights` are non-negative per-row weights (e.g. bootstrap counts)."""
    if n_classes < 1:
        raise ValueError(f"n_classes must be >= 1, got {n_classes}")
    t = _check_codes(np.asarray(y_true_codes), n_classes, "y_true_codes")
    p = _check_codes(np.asarray(y_pred_codes), n_classes, "y_pred_codes")
    if t.shape != p.shape:
        raise ValueError(f"y_true_codes has {t.size} rows but y_pred_codes has {p.size}")
    if t.size == 0:
        raise ValueError("macro_f1 of an empty set is undefined")
    w = None
    if weights is not None:
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != t.shape:
            raise ValueError(f"weights has shape {w.shape}, expected {t.shape}")
        if not np.isfinite(w).all() or (w < 0).any():
            raise ValueError("weights must be finite and non-negative")
    hit = t == p
    tp = np.bincount(t[hit], weights=None if w is None else w[hit], minlength=n_classes)
    true_sum = np.bincount(t, weights=w, minlength=n_classes)
    pred_sum = np.bincount(p, weights=w, minlength=n_classes)
    return float(_f1_from_counts(tp[None], true_sum[None], pred_sum[None])[0])


def _resampled_counts(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int,
                      index_matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-resample per-class (tp, true, pred) counts, [B, K] each, via one bincount on offset codes per count."""
    b = index_matrix.shape[0]
    offsets = (np.arange(b, dtype=np.intp) * (n_classes + 1))[:, None]
    # a true positive is counted under its class; a miss goes to a spare bin K that is dropped afterwards
    tp_codes = np.where(y_true == y_pred, y_true, n_classes)
    size = b * (n_classes + 1)

    def count(codes: np.ndarray) -> np.ndarray:
        flat = (codes[index_matrix] + offsets).ravel()
        return np.bincount(flat, minlength=size).reshape(b, n_classes + 1)[:, :n_classes]

    return count(tp_codes), count(y_true), count(y_pred)


def macro_f1_resampled(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray, n_classes: int,
                       index_matrix: np.ndarray) -> np.ndarray:
    """Macro-F1 of every resample at once: row b of the [B, n] `index_matrix` lists the rows of resample b.

    Returns a float64 array of B scores, each equal to `macro_f1(y_true[row], y_pred[row], n_classes)`. There is no
    Python loop over B: per-class counts come from bincounts of class codes offset by the resample number. Rows are
    processed in chunks, so the temporaries stay small whatever B is."""
    if n_classes < 1:
        raise ValueError(f"n_classes must be >= 1, got {n_classes}")
    t = _check_codes(np.asarray(y_true), n_classes, "y_true")
    p = _check_codes(np.asarray(y_pred), n_classes, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_true has {t.size} rows but y_pred has {p.size}")
    idx = np.asarray(index_matrix)
    if idx.ndim != 2 or idx.dtype.kind not in "iu":
        raise ValueError(f"index_matrix must be a 2-D integer array [B, n], got {idx.dtype} {idx.shape}")
    if idx.shape[1] == 0:
        raise ValueError("index_matrix has empty resamples: macro-F1 of an empty set is undefined")
    if idx.size and (idx.min() < 0 or idx.max() >= t.size):
        raise ValueError(f"index_matrix has row indices outside [0, {t.size})")
    out = np.empty(idx.shape[0], dtype=np.float64)
    step = max(1, _CHUNK_ELEMENTS // idx.shape[1])
    for start in range(0, idx.shape[0], step):
        out[start:start + step] = _f1_from_counts(*_resampled_counts(t, p, n_classes, idx[start:start + step]))
    return out


# ---------------------------------------------------------------------------------------------------- bootstrap


def _index_chunks(n: int, samples: int, seed: int) -> Iterator[np.ndarray]:
    """The bootstrap's resampled row indices, `samples` rows of n draws with replacement, in [rows, n] chunks.

    The chunking depends only on n and samples, so the draws (and the interval) are a function of (seed, n, samples)."""
    rng = np.random.default_rng(seed)
    step = max(1, min(samples, _CHUNK_ELEMENTS // n))
    for start in range(0, samples, step):
        yield rng.integers(0, n, size=(min(step, samples - start), n), dtype=np.intp)


def _percentile_interval(value: float, stats: np.ndarray, confidence: float) -> Interval:
    alpha = 1.0 - confidence
    low, high = np.quantile(stats, [alpha / 2, 1.0 - alpha / 2])
    return Interval(float(value), float(low), float(high))


def _encode_for_f1(y_true, preds, labels) -> tuple[np.ndarray, list[np.ndarray], int]:
    *codes, classes = encode_labels(y_true, *preds, labels=labels)
    if codes[0].size == 0:
        raise ValueError("y_true is empty: an F1 interval needs at least one labelled text")
    return codes[0], codes[1:], len(classes)


def f1_interval(y_true: Sequence[Hashable] | np.ndarray, y_pred: Sequence[Hashable] | np.ndarray, *, seed: int = 0,
                samples: int = BOOTSTRAP_SAMPLES, confidence: float = CONFIDENCE,
                labels: Sequence[Hashable] | None = None) -> Interval:
    """Macro-F1 of `y_pred` against `y_true` with a percentile-bootstrap interval over texts (rows).

    `value` is the macro-F1 on the full set; `labels` fixes the class list (default: every label seen)."""
    _check_options(samples, confidence)
    t, (p,), k = _encode_for_f1(y_true, [y_pred], labels)
    stats = np.concatenate([macro_f1_resampled(t, p, k, idx) for idx in _index_chunks(t.size, samples, seed)])
    return _percentile_interval(macro_f1(t, p, k), stats, confidence)


def paired_f1_difference(y_true: Sequence[Hashable] | np.ndarray, pred_a: Sequence[Hashable] | np.ndarray,
                         pred_b: Sequence[Hashable] | np.ndarray, *, seed: int = 0, samples: int = BOOTSTRAP_SAMPLES,
                         confidence: float = CONFIDENCE, labels: Sequence[Hashable] | None = None) -> Interval:
    """F1(a) - F1(b) on the same texts, with a paired bootstrap interval: both predictors are scored on the same
    resampled rows every time. `value` is the observed difference; `excludes(0)` means a significant gap."""
    _check_options(samples, confidence)
    t, (a, b), k = _encode_for_f1(y_true, [pred_a, pred_b], labels)
    stats = np.concatenate([macro_f1_resampled(t, a, k, idx) - macro_f1_resampled(t, b, k, idx)
                            for idx in _index_chunks(t.size, samples, seed)])
    return _percentile_interval(macro_f1(t, a, k) - macro_f1(t, b, k), stats, confidence)


def paired_mean_difference(values_a: Sequence[float] | np.ndarray, values_b: Sequence[float] | np.ndarray, *,
                           seed: int = 0, samples: int = BOOTSTRAP_SAMPLES, confidence: float = CONFIDENCE) -> Interval:
    """mean(a) - mean(b) over the same examples (a per-example score such as lm-eval's acc: 1 right, 0 wrong), with
    a paired bootstrap interval: both are averaged over the same resampled examples every time."""
    _check_options(samples, confidence)
    a, b = _float_array(values_a, "values_a"), _float_array(values_b, "values_b")
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"paired values must be two non-empty lists of one length (got {a.size} and {b.size})")
    diff = a - b
    stats = np.concatenate([diff[idx].mean(axis=1) for idx in _index_chunks(diff.size, samples, seed)])
    return _percentile_interval(float(diff.mean()), stats, confidence)


# ---------------------------------------------------------------------------------------------------- perplexity


def _ppl_units(loss_sums, token_counts, what: str = "") -> tuple[np.ndarray, np.ndarray]:
    losses = _float_array(loss_sums, f"loss_sums{what}")
    counts = _float_array(token_counts, f"token_counts{what}")
    if losses.shape != counts.shape:
        raise ValueError(f"loss_sums{what} has {losses.size} units but token_counts{what} has {counts.size}")
    if (losses < 0).any():
        raise ValueError(f"loss_sums{what} must be summed negative log-likelihoods (>= 0)")
    if (counts <= 0).any():
        raise ValueError(f"token_counts{what} must be positive: every unit needs at least one scored token")
    return losses, counts


def _resampled_sums(values: np.ndarray, idx: np.ndarray) -> np.ndarray:
    return values[idx].sum(axis=1)


def ppl_interval(loss_sums: Sequence[float] | np.ndarray, token_counts: Sequence[float] | np.ndarray, *,
                 seed: int = 0, samples: int = BOOTSTRAP_SAMPLES, confidence: float = CONFIDENCE) -> Interval:
    """Perplexity exp(sum(loss_sums) / sum(token_counts)) with a percentile-bootstrap interval over units.

    A unit is a held-out block or document: `loss_sums[i]` is its summed token NLL (nats), `token_counts[i]` its
    number of scored tokens. Units, not tokens, are resampled (tokens within a unit are correlated), and each
    resample's perplexity is the ratio of its sums, like the point value."""
    _check_options(samples, confidence)
    losses, counts = _ppl_units(loss_sums, token_counts)
    stats = np.concatenate([np.exp(_resampled_sums(losses, idx) / _resampled_sums(counts, idx))
                            for idx in _index_chunks(losses.size, samples, seed)])
    return _percentile_interval(math.exp(losses.sum() / counts.sum()), stats, confidence)


def paired_ppl_change(loss_sums_a: Sequence[float] | np.ndarray, counts_a: Sequence[float] | np.ndarray,
                      loss_sums_b: Sequence[float] | np.ndarray, counts_b: Sequence[float] | np.ndarray, *,
                      seed: int = 0, samples: int = BOOTSTRAP_SAMPLES, confidence: float = CONFIDENCE) -> Interval:
    """Relative perplexity change ppl_a / ppl_b - 1 of model a against model b on the same units, paired bootstrap.

    Unit i must be the same block/document for both models (normally counts_a == counts_b). Negative means a has
    the lower perplexity; `excludes(0)` means the change is significant."""
    _check_options(samples, confidence)
    la, ca = _ppl_units(loss_sums_a, counts_a, "_a")
    lb, cb = _ppl_units(loss_sums_b, counts_b, "_b")
    if la.size != lb.size:
        raise ValueError(f"model a has {la.size} units but model b has {lb.size}: pairing needs the same units")

    def change(la_sum, ca_sum, lb_sum, cb_sum):  # ppl_a / ppl_b - 1 = exp(mean_a - mean_b) - 1
        return np.expm1(la_sum / ca_sum - lb_sum / cb_sum)

    stats = np.concatenate([change(_resampled_sums(la, idx), _resampled_sums(ca, idx),
                                   _resampled_sums(lb, idx), _resampled_sums(cb, idx))
                            for idx in _index_chunks(la.size, samples, seed)])
    return _percentile_interval(float(change(la.sum(), ca.sum(), lb.sum(), cb.sum())), stats, confidence)


# ---------------------------------------------------------------------------------------------------- corpus scores


def corpus_interval(unit_stats: Sequence[Sequence[float]] | np.ndarray, score: Callable[[np.ndarray], float], *,
                    seed: int = 0, samples: int = BOOTSTRAP_SAMPLES, confidence: float = CONFIDENCE) -> Interval:
    """A corpus-level score with a percentile-bootstrap interval over units (examples).

    `unit_stats[i]` is unit i's sufficient statistics (BLEU's n-gram matches and lengths, chrF's character n-gram
    counts, or a per-example score) and `score(sums)` the metric of a set of units from their column sums: the value
    is `score` of every unit's sums, each resample's the sums of n units drawn with replacement (sacrebleu's own
    bootstrap does the same)."""
    _check_options(samples, confidence)
    units = np.asarray(unit_stats, dtype=np.float64)
    if units.ndim != 2 or units.shape[0] == 0:
        raise ValueError(f"unit_stats must be [units, statistics] with at least one unit, got shape {units.shape}")
    if not np.isfinite(units).all():
        raise ValueError("unit_stats contains NaN or infinite values")
    n = units.shape[0]
    stats = []
    for idx in _index_chunks(n, samples, seed):
        # how often each resample drew each unit ([rows, n]), so the sums are one matmul, not a [rows, n, k] copy
        rows = np.arange(idx.shape[0])[:, None] * n
        counts = np.bincount((rows + idx).ravel(), minlength=idx.size).reshape(idx.shape).astype(np.float64)
        stats += [score(sums) for sums in counts @ units]
    return _percentile_interval(score(units.sum(axis=0)), np.asarray(stats), confidence)
