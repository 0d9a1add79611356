"""The CPT mixing law (raycpt.core.law) on synthetic sweeps drawn from known laws.

The synthetic sweep: 8 trials with domain shares spread over [0.2, 1.0], 4 reports each at token counts spaced
geometrically over 1e6..1e8, 1% multiplicative Gaussian noise on every loss, fixed seeds.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from raycpt.core.law import FORMS, LawFit, Observation, best_mix_ratio, fit_law, summarize_law

RATIOS = np.linspace(0.2, 1.0, 8)
TOKENS = np.geomspace(1e6, 1e8, 4)
NOISE = 0.01
TARGET_TOKENS = 10 * TOKENS[-1]

_POWER = {"E": 2.0, "A": 1e7**0.5, "alpha": 0.5, "d0": 1e5}
DOMAIN_TRUTH = {"power": _POWER, "dcpt": {**_POWER, "C": 0.3, "gamma": 1.5}}
GENERAL_TRUTH = {"E": 2.8, "A": 0.3 * 1e7**0.3, "alpha": 0.3, "d0": 1e6, "C": 0.05, "gamma": 1.0}


def truth(form: str, params: dict[str, float], target: str = "domain") -> LawFit:
    return LawFit(form=form, params=params, loo_error=0.0, target=target)


def sweep(domain_form: str, seed: int, with_general: bool = True, noise: float = NOISE) -> list[Observation]:
    rng = np.random.default_rng(seed)
    dom = truth(domain_form, DOMAIN_TRUTH[domain_form])
    gen = truth("dcpt", GENERAL_TRUTH, "general")
    out = []
    for i, r in enumerate(RATIOS):
        for d in TOKENS:
            ld = float(dom.predict(d, r)) * (1 + noise * rng.standard_normal())
            lg = float(gen.predict(d, r)) * (1 + noise * rng.standard_normal()) if with_general else None
            out.append(Observation(trial_id=f"trial_{i}", mix_ratio=float(r), tokens=float(d), domain_loss=ld,
                                   general_loss=lg))
    return out


@pytest.mark.parametrize("form", ["power", "dcpt"])
def test_parameter_recovery_and_extrapolation(form):
    """Fitting the generating form recovers E within 7%, alpha within 15%, gamma within 25% (relative), and predicts
    domain loss at 10x the largest sweep budget within 3% for every share in [0.2, 1].

    Tolerances are ~1.5x the worst errors over 30 noise seeds (E 4.3%, alpha 9.5%, gamma 14%, prediction 3.0%);
    A and d0 trade off against alpha and are not checked. Seed 0 is one of those 30, not a hand-picked one.
    """
    fit = fit_law(sweep(form, seed=0), "domain", forms=(form,))
    want = DOMAIN_TRUTH[form]
    assert fit.form == form
    assert fit.params["E"] == pytest.approx(want["E"], rel=0.07)
    assert fit.params["alpha"] == pytest.approx(want["alpha"], rel=0.15)
    if form == "dcpt":
        assert fit.params["gamma"] == pytest.approx(want["gamma"], rel=0.25)
    shares = np.linspace(0.2, 1.0, 9)
    predicted = fit.predict(TARGET_TOKENS, shares)
    expected = truth(form, want).predict(TARGET_TOKENS, shares)
    assert predicted.shape == shares.shape
    np.testing.assert_allclose(predicted, expected, rtol=0.03)


@pytest.mark.parametrize("form", ["power", "dcpt"])
def test_leave_one_trial_out_picks_the_generating_form(form):
    """Over 30 noise seeds the generating form was chosen 28/30 times for power data and 30/30 for dcpt data."""
    fit = fit_law(sweep(form, seed=0), "domain")
    assert set(fit.loo_errors) == set(FORMS)
    assert fit.form == form
    assert fit.loo_error == fit.loo_errors[form]
    assert fit.loo_error <= min(fit.loo_errors.values()) * 1.02 + 1e-12
    # The right law predicts held-out trials at about the noise level (mean |N(0, 1%)| ~ 0.8%).
    assert 0.003 < fit.loo_error < 0.02


def test_general_law_uses_the_general_share():
    fit = fit_law(sweep("power", seed=1), "general")
    expected = truth("dcpt", GENERAL_TRUTH, "general").predict(TOKENS[-1], RATIOS)
    np.testing.assert_allclose(fit.predict(TOKENS[-1], RATIOS), expected, rtol=0.02)
    # More domain share, less general data: general loss rises with r.
    assert np.all(np.diff(fit.predict(TOKENS[-1], RATIOS)) > 0)


def test_diverged_reports_are_ignored():
    obs = sweep("power", seed=2)
    obs.append(Observation("diverged", 0.5, 1e7, math.nan, math.inf))
    fit = fit_law(obs, "domain")
    assert fit.n_trials == len(RATIOS)
    assert fit.n_points == len(RATIOS) * len(TOKENS)


# --- constrained optimum, on the true laws (no fitting noise) --------------------------------------------------------

DOMAIN = truth("power", DOMAIN_TRUTH["power"])
DOMAIN_DCPT = truth("dcpt", DOMAIN_TRUTH["dcpt"])
GENERAL = truth("dcpt", GENERAL_TRUTH, "general")


def test_optimum_meets_the_general_bound():
    bound = float(GENERAL.predict(TARGET_TOKENS, 0.6))
    choice = best_mix_ratio(DOMAIN, GENERAL, TARGET_TOKENS, bound)
    assert choice.feasible
    assert choice.general_loss <= bound + 1e-9
    assert float(GENERAL.predict(TARGET_TOKENS, choice.mix_ratio)) <= bound + 1e-9
    # Domain loss falls with r, so the optimum presses against the bound, here at r = 0.6.
    assert choice.mix_ratio == pytest.approx(0.6, abs=1e-6)
    assert choice.domain_loss == pytest.approx(float(DOMAIN.predict(TARGET_TOKENS, choice.mix_ratio)))


def test_looser_bound_moves_toward_domain():
    tight = float(GENERAL.predict(TARGET_TOKENS, 0.4))
    ratios = [
        best_mix_ratio(DOMAIN, GENERAL, TARGET_TOKENS, tight + math.log1p(f)).mix_ratio for f in (0.0, 0.01, 0.03)
    ]
    assert ratios[0] < ratios[1] < ratios[2]
    loosest = best_mix_ratio(DOMAIN, GENERAL, TARGET_TOKENS, 100.0)
    assert loosest.mix_ratio == 1.0
    assert loosest.feasible


def test_no_feasible_mix_is_flagged():
    lowest = float(GENERAL.predict(TARGET_TOKENS, 0.0))  # general loss is lowest with no domain data
    choice = best_mix_ratio(DOMAIN, GENERAL, TARGET_TOKENS, lowest - 0.1)
    assert not choice.feasible
    assert choice.mix_ratio == 0.0
    assert choice.general_loss == pytest.approx(lowest)


def test_without_general_law_domain_loss_alone_decides():
    choice = best_mix_ratio(DOMAIN, None, TARGET_TOKENS, None)
    assert choice.mix_ratio == 1.0
    assert choice.general_loss is None
    assert choice.feasible


# --- too little data -------------------------------------------------------------------------------------------------


def test_too_few_trials_or_ratios():
    obs = sweep("power", seed=0)
    two_trials = [o for o in obs if o.trial_id in ("trial_0", "trial_7")]
    with pytest.raises(ValueError, match="at least 3 trials"):
        fit_law(two_trials, "domain")
    one_ratio = [Observation(f"t{i}", 0.5, d, 3.0 - 0.1 * i, 3.0) for i, d in enumerate([1e6, 2e6, 4e6, 8e6])]
    with pytest.raises(ValueError, match="mix ratio"):
        fit_law(one_ratio, "domain")
    with pytest.raises(ValueError, match="trials"):
        summarize_law(two_trials, sweep_tokens=1e8, target_tokens=1e9, base_general_loss=3.0, max_forgetting=0.05)
    # Three trials, one report each: fewer reports than any form has parameters.
    one_report_each = [o for o in obs if o.tokens == TOKENS[-1]][:3]
    with pytest.raises(ValueError, match="more reports"):
        fit_law(one_report_each, "domain")


def test_predict_rejects_ratios_outside_unit_interval():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        DOMAIN.predict(1e6, 1.5)


# --- summary and bootstrap -------------------------------------------------------------------------------------------

MAX_FORGETTING = 0.05
# Base general loss chosen so that the forgetting budget binds near r = 0.7 at the target budget.
BASE_GENERAL = float(GENERAL.predict(TARGET_TOKENS, 0.7)) - math.log1p(MAX_FORGETTING)


def summarize(obs: list[Observation], seed: int = 0, bootstrap: int = 200, base: float | None = BASE_GENERAL):
    return summarize_law(obs, sweep_tokens=float(TOKENS[-1]), target_tokens=float(TARGET_TOKENS),
                         base_general_loss=base, max_forgetting=MAX_FORGETTING, seed=seed, bootstrap=bootstrap)


@pytest.fixture(scope="module")
def summary():
    """A full summary (200 bootstrap refits) of a sweep with the standard 1% noise."""
    return summarize(sweep("dcpt", seed=0))


def test_summary_picks_the_budgeted_mix():
    """With 0.2% noise r* is well determined: over 8 seeds it fell in [0.665, 0.744] (true 0.70) at the target and
    in [0.28, 0.36] at the sweep's budget, where the true law's general loss is higher."""
    s = summarize(sweep("dcpt", seed=0, noise=0.002), bootstrap=0)
    assert s.form_domain == "dcpt" and s.form_general == "dcpt"
    assert s.n_reports == 32 and s.n_trials == 8
    assert s.feasible and s.feasible_at_sweep_budget
    assert s.best_mix_ratio == pytest.approx(0.7, abs=0.08)
    exact_at_sweep = best_mix_ratio(DOMAIN_DCPT, GENERAL, float(TOKENS[-1]), s.general_loss_bound).mix_ratio
    assert s.best_mix_ratio_at_sweep_budget == pytest.approx(exact_at_sweep, abs=0.08)
    # The forgetting budget binds: general ppl ends exactly at (1 + max_forgetting) x base.
    assert s.general_loss_bound == pytest.approx(BASE_GENERAL + math.log1p(MAX_FORGETTING))
    assert s.predicted_general_change == pytest.approx(MAX_FORGETTING, abs=1e-9)
    assert s.predicted_general_ppl == pytest.approx(math.exp(BASE_GENERAL) * (1 + MAX_FORGETTING), rel=1e-9)
    true_domain = float(DOMAIN_DCPT.predict(TARGET_TOKENS, s.best_mix_ratio))
    assert s.predicted_domain_ppl == pytest.approx(math.exp(true_domain), rel=0.01)
    assert s.best_mix_ratio_ci is None  # no bootstrap asked for


def test_bootstrap_interval_contains_estimate_and_is_seeded(summary):
    """With 1% noise on general loss and a 5% ppl budget (0.049 nats) r* at 10x the budget is poorly determined
    (0.36-0.84 over 10 seeds; intervals up to [0, 0.81]), so only containment and seeding are checked (containment
    held for all 10 seeds)."""
    low, high = summary.best_mix_ratio_ci
    assert 0.0 <= low <= summary.best_mix_ratio <= high <= 1.0
    assert summary.bootstrap_ok >= 190
    obs = sweep("dcpt", seed=0)
    again = summarize(obs, seed=7, bootstrap=15)
    assert summarize(obs, seed=7, bootstrap=15).best_mix_ratio_ci == again.best_mix_ratio_ci
    assert summarize(obs, seed=8, bootstrap=15).best_mix_ratio_ci != again.best_mix_ratio_ci


def test_summary_dict_and_sentence(summary):
    d = summary.to_dict()
    json.dumps(d)
    assert all(k.startswith("law.") for k in d)
    assert d["law.best_mix_ratio"] == summary.best_mix_ratio
    assert d["law.best_mix_ratio_ci"] == list(summary.best_mix_ratio_ci)
    assert d["law.loo_error"] == summary.loo_error_domain
    assert d["law.form"] == "dcpt"
    assert {"law.form_general", "law.loo_error_general", "law.feasible", "law.predicted_domain_ppl"} <= set(d)
    text = summary.describe()
    assert text.startswith("fit from 32 reports of 8 trials (domain law: dcpt, leave-one-trial-out error ")
    assert "at 1B tokens the best mix is " in text
    assert "vs base" in text and "\n" not in text


def test_summary_without_general_corpus():
    s = summarize(sweep("power", seed=4, with_general=False), bootstrap=20, base=None)
    assert s.form_general is None and s.predicted_general_ppl is None and s.predicted_general_change is None
    assert s.best_mix_ratio == 1.0 and s.feasible
    assert "general" not in s.describe()
