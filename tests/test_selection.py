import pandas as pd

from raycpt.core.config import SelectConfig
from raycpt.results.summary import select_winner

BASE = {"base/domain_ppl": 70.0, "base/general_ppl": 30.0}


def frame(*rows):
    cols = ["trial_id", "status", "step", "eval/domain_ppl", "eval/general_ppl", "eval/f1", "error"]
    return pd.DataFrame([dict(zip(cols, r, strict=True)) for r in rows])


def test_lowest_domain_ppl_wins_without_f1_and_bound_excludes_forgetting():
    trials = frame(("a", "finished", 16, 50.0, 31.0, None, ""),
                   ("b", "finished", 16, 45.0, 34.0, None, ""),    # general 34 > 1.1 x 30 = 33
                   ("c", "stopped", 4, 40.0, 30.0, None, ""),
                   ("d", "failed", 2, None, None, None, "OOM"))
    sel = select_winner(trials, BASE, SelectConfig(max_forgetting=0.1))
    assert sel.trial_id == "a" and not sel.flagged
    assert "forgetting" in sel.excluded["b"] and "stopped" in sel.excluded["c"] and "OOM" in sel.excluded["d"]
    assert sel.order[0] == "a" and set(sel.order) == {"a", "b", "c", "d"}


def test_highest_f1_wins_and_ties_go_to_lower_domain_ppl():
    trials = frame(("a", "finished", 16, 50.0, 30.0, 0.700, ""),
                   ("b", "finished", 16, 46.0, 30.0, 0.698, ""),   # tie within 0.005, lower domain ppl
                   ("c", "finished", 16, 40.0, 30.0, 0.650, ""))
    sel = select_winner(trials, BASE, SelectConfig(f1_tolerance=0.005))
    assert sel.trial_id == "b"
    assert "tie broken by lower domain ppl" in sel.reasons[0]
    assert sel.order == ["b", "a", "c"]
    strict = select_winner(trials, BASE, SelectConfig(f1_tolerance=0.0))
    assert strict.trial_id == "a"


def test_none_qualifies_falls_back_flagged():
    trials = frame(("a", "finished", 16, 50.0, 60.0, 0.7, ""), ("b", "stopped", 4, 48.0, 30.0, None, ""))
    sel = select_winner(trials, BASE, SelectConfig(max_forgetting=0.1))
    assert sel.flagged and sel.trial_id == "b"
    assert "no trial met the rule" in sel.reasons[0]


def test_empty_sweep_has_no_winner():
    sel = select_winner(pd.DataFrame(), BASE, SelectConfig())
    assert sel.trial_id is None and sel.flagged
