"""The export's reload check keeps the README's promise: the reloaded model must reproduce its trial's validation
domain ppl, general ppl and F1 within 1e-3, or the check fails."""

from raycpt.results.export import verify_reload

REPORTED = {"eval/domain_ppl": 50.0, "eval/general_ppl": 30.0, "eval/f1": 0.700}


def test_reload_that_reproduces_every_number_passes():
    got = {"eval/domain_ppl": 50.02, "eval/general_ppl": 29.99, "eval/f1": 0.7005}
    check = verify_reload(REPORTED, got)
    assert check["ok"], check["problem"]
    assert set(check["checks"]) == {"domain_ppl", "general_ppl", "f1"}


def test_reload_whose_f1_moved_fails():
    got = {"eval/domain_ppl": 50.0, "eval/general_ppl": 30.0, "eval/f1": 0.697}  # one text of 300 flipped
    check = verify_reload(REPORTED, got)
    assert not check["ok"] and "f1" in check["problem"] and "ppl" not in check["problem"]


def test_reload_that_does_not_score_a_reported_number_fails():
    check = verify_reload(REPORTED, {"eval/domain_ppl": 50.0, "eval/general_ppl": 30.0})
    assert not check["ok"] and "f1" in check["problem"]


def test_numbers_the_trial_never_reported_are_not_checked():
    check = verify_reload({"eval/domain_ppl": 50.0}, {"eval/domain_ppl": 50.0, "eval/f1": 0.5})
    assert check["ok"] and set(check["checks"]) == {"domain_ppl"}
