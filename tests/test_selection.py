"""Selection rule v2 (raycpt.results.select): statistics decide ties and the base model is a candidate."""

import numpy as np
import pandas as pd

from raycpt.core.config import SelectConfig
from raycpt.results.select import select_winner

BASE = {"base/domain_ppl": 70.0, "base/general_ppl": 30.0}
CLASSES = ["neg", "pos"]


def frame(*rows):
    cols = ["trial_id", "status", "step", "eval/domain_ppl", "eval/general_ppl", "eval/f1", "error"]
    return pd.DataFrame([dict(zip(cols, r, strict=True)) for r in rows])


def predictions(labels: list[str], wrong: np.ndarray) -> list[str]:
    """The labels with the rows in `wrong` flipped."""
    return [("pos" if y == "neg" else "neg") if w else y for y, w in zip(labels, wrong, strict=True)]


def scored(labels, rows, wrong_masks):
    """rows of (id, domain ppl) with predictions that get `wrong_masks` wrong; F1 computed by sklearn here."""
    from sklearn.metrics import f1_score

    out = []
    for (tid, domain), wrong in zip(rows, wrong_masks, strict=True):
        pred = predictions(labels, wrong)
        out.append({"trial_id": tid, "status": "finished", "step": 16, "eval/domain_ppl": domain,
                    "eval/general_ppl": 30.0, "error": "", "eval/predictions": pred,
                    "eval/f1": f1_score(labels, pred, average="macro", labels=CLASSES)})
    return pd.DataFrame(out)


LABELS = ["neg", "pos"] * 200  # 400 validation texts
BASE_WRONG = np.random.default_rng(0).random(len(LABELS)) < 0.30


def flip(wrong: np.ndarray, fix: int, break_: int) -> np.ndarray:
    """`wrong` with its first `fix` mistakes fixed and the first `break_` correct rows made wrong."""
    out = wrong.copy()
    out[np.flatnonzero(wrong)[:fix]] = False
    out[np.flatnonzero(~wrong)[:break_]] = True
    return out


def test_lowest_domain_ppl_wins_without_f1_and_bound_excludes_forgetting():
    trials = frame(("a", "finished", 16, 50.0, 31.0, None, ""),
                   ("b", "finished", 16, 45.0, 34.0, None, ""),    # general 34 > 1.1 x 30 = 33
                   ("c", "stopped", 4, 40.0, 30.0, None, ""),
                   ("d", "failed", 2, None, None, None, "OOM"))
    sel = select_winner(trials, BASE, SelectConfig(max_forgetting=0.1))
    assert sel.trial_id == "a" and not sel.flagged
    assert "forgetting" in sel.excluded["b"] and "stopped" in sel.excluded["c"] and "OOM" in sel.excluded["d"]
    assert sel.order[0] == "a" and set(sel.order) == {"a", "b", "c", "d"}


def test_statistically_tied_trials_go_to_lower_domain_ppl():
    # a: 20% wrong; b: a's mistakes plus 1% more (tied: the paired interval of F1(b) - F1(a) holds 0) and lower
    # domain ppl; c: 35% wrong, clearly worse than a.
    wrong_a = flip(BASE_WRONG, fix=50, break_=0)  # fixes 50 of the base model's ~120 mistakes
    wrong_b = flip(wrong_a, fix=0, break_=3)
    wrong_c = flip(BASE_WRONG, fix=0, break_=20)
    trials = scored(LABELS, [("a", 50.0), ("b", 46.0), ("c", 40.0)], [wrong_a, wrong_b, wrong_c])
    assert trials.set_index("trial_id")["eval/f1"]["a"] > trials.set_index("trial_id")["eval/f1"]["b"]
    base = {**BASE, "base/predictions": predictions(LABELS, BASE_WRONG), "base/f1": 0.70}
    sel = select_winner(trials, base, SelectConfig(), LABELS, CLASSES)
    assert sel.trial_id == "b" and sel.order == ["b", "a", "c"]
    assert "tie broken by lower domain ppl" in sel.reasons[0]
    assert sel.beats_base and "beats the base model" in sel.verdict


def test_a_trial_significantly_worse_than_base_on_f1_is_excluded():
    wrong_good = flip(BASE_WRONG, fix=12, break_=0)  # fixes a tenth of the base model's mistakes
    wrong_bad = flip(BASE_WRONG, fix=0, break_=40)   # adds many mistakes
    trials = scored(LABELS, [("good", 60.0), ("bad", 40.0)], [wrong_good, wrong_bad])
    base = {**BASE, "base/predictions": predictions(LABELS, BASE_WRONG), "base/f1": 0.70}
    sel = select_winner(trials, base, SelectConfig(), LABELS, CLASSES)
    assert "F1 significantly below the base model's" in sel.excluded["bad"]
    assert sel.trial_id == "good"


def test_when_no_trial_beats_the_base_model_the_verdict_says_so():
    wrong_same = flip(BASE_WRONG, fix=4, break_=3)  # as good as the base model, within noise
    trials = scored(LABELS, [("a", 50.0)], [wrong_same])
    base = {**BASE, "base/predictions": predictions(LABELS, BASE_WRONG), "base/f1": 0.70}
    sel = select_winner(trials, base, SelectConfig(), LABELS, CLASSES)
    assert sel.trial_id == "a" and sel.beats_base is False
    assert "no trial beats the base model on downstream F1" in sel.verdict


def test_none_qualifies_falls_back_flagged():
    trials = frame(("a", "finished", 16, 50.0, 60.0, 0.7, ""), ("b", "stopped", 4, 48.0, 30.0, None, ""))
    sel = select_winner(trials, BASE, SelectConfig(max_forgetting=0.1))
    assert sel.flagged and sel.trial_id == "b"
    assert "no trial met the rule" in sel.reasons[0]


def test_empty_sweep_has_no_winner():
    sel = select_winner(pd.DataFrame(), BASE, SelectConfig())
    assert sel.trial_id is None and sel.flagged


def test_fallback_picks_only_a_trial_whose_weights_were_kept():
    """Every finished trial breaks the bound; the stopped trial has the lowest domain ppl but the disk policy
    deleted its weights: the fallback must pick an exportable trial and say why the other was passed over."""
    trials = frame(("fin", "finished", 16, 50.0, 60.0, 0.7, ""), ("stop", "stopped", 4, 40.0, 30.0, None, ""))
    trials["weights_kept"] = [True, False]
    sel = select_winner(trials, BASE, SelectConfig(max_forgetting=0.1))
    assert sel.flagged and sel.trial_id == "fin"
    assert "kept their weights" in sel.reasons[0] and "1 without weights" in sel.reasons[0]
    trials["weights_kept"] = [False, False]
    sel = select_winner(trials, BASE, SelectConfig(max_forgetting=0.1))
    assert sel.trial_id is None and sel.flagged and "keep_weights=all" in sel.reasons[0]


def test_f1_gap_refuses_predictions_of_the_wrong_length_on_either_side():
    from raycpt.results.select import f1_gap

    labels = ["neg", "pos"] * 10
    right = {"eval/predictions": list(labels)}
    short = {"eval/predictions": labels[:-1]}
    assert f1_gap(right, right, labels, CLASSES) is not None
    assert f1_gap(short, right, labels, CLASSES) is None
    assert f1_gap(right, short, labels, CLASSES) is None


def test_a_trial_without_general_ppl_is_not_eligible_when_the_sweep_measures_forgetting():
    # the base model's general ppl is missing (no base measurement), but the sweep has a general corpus: the
    # bound cannot be checked, so no trial is eligible (the fallback still picks, flagged)
    trials = frame(("a", "finished", 16, 50.0, None, None, ""), ("b", "finished", 16, 55.0, 30.0, None, ""))
    sel = select_winner(trials, {"base/domain_ppl": 70.0}, SelectConfig())
    assert "no general ppl" in sel.excluded["a"] and "base model has no general ppl" in sel.excluded["b"]
    assert sel.flagged
    # no general corpus at all: forgetting is not measured and the bound does not apply
    trials = frame(("a", "finished", 16, 50.0, None, None, ""), ("b", "finished", 16, 55.0, None, None, ""))
    sel = select_winner(trials, {"base/domain_ppl": 70.0}, SelectConfig())
    assert sel.trial_id == "a" and not sel.flagged and not sel.excluded


def test_an_lm_eval_accuracy_picks_the_trial_that_is_significantly_better_and_ties_go_to_lower_domain_ppl():
    """select.metric lm_eval/<task>/<metric>: paired over the per-example values of the same documents."""
    name = "lm_eval/known_mc/acc"
    right = (~BASE_WRONG).astype(float)  # 400 documents, the base model right on ~70%

    def row(tid, domain, values):
        return {"trial_id": tid, "status": "finished", "step": 16, "eval/domain_ppl": domain, "eval/general_ppl": 30.0,
                "error": "", name: float(np.mean(values)), name + "_samples": list(values)}

    better = right.copy()
    better[np.flatnonzero(right == 0)[:60]] = 1.0  # 60 more documents right: +15 points
    tied = better.copy()
    tied[np.flatnonzero(tied == 1)[:2]] = 0.0  # 2 fewer: inside the noise of 400 documents
    base = {**BASE, "base/" + name: float(right.mean()), "base/" + name + "_samples": list(right)}
    rule = SelectConfig(metric=name)
    sel = select_winner(pd.DataFrame([row("low", 40.0, right), row("high", 55.0, better)]), base, rule)
    assert sel.trial_id == "high" and "highest validation lm_eval/known_mc/acc (0.8" in sel.reasons[0]
    assert sel.beats_base is True and "beats the base model on validation lm_eval/known_mc/acc (+0.150" in sel.verdict
    sel = select_winner(pd.DataFrame([row("best", 55.0, better), row("close", 45.0, tied)]), base, rule)
    assert sel.trial_id == "close" and "tie broken by lower domain ppl (45.00)" in sel.reasons[0]
    worse = right.copy()
    worse[np.flatnonzero(right == 1)[:80]] = 0.0
    sel = select_winner(pd.DataFrame([row("worse", 30.0, worse), row("ok", 50.0, right)]), base, rule)
    assert "lm_eval/known_mc/acc significantly below the base model's" in sel.excluded["worse"]
