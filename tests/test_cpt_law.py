"""The schedule-aware CPT law (core.forecast.cpt_law): areas under the lr curve by hand, parameters recovered from
curves the law itself generated under cosine, wsd and constant schedules with noise, a held-out longer schedule
predicted, a recommendation that keeps the forgetting bound, and a fallback that engages and says so."""

import math

import numpy as np
import pytest

from raycpt.core.forecast.cpt_law import (
    CptLawFit,
    Curve,
    RunSchedule,
    areas,
    fit_cpt_law,
    horizon_lr,
    recommend,
)

UNIT = 1e-3
"""The generator's forward-area unit (params below are per this many lr-steps)."""
TRUE = {"domain": {"log_e": math.log(0.3), "beta": 0.8, "b_own": -0.9, "b_other": 0.15, "c": 0.01},
        "general": {"log_e": math.log(0.3), "beta": 0.8, "b_own": -0.3, "b_other": 0.4, "c": 0.005}}
BASE = {"domain": 4.5, "general": 3.4}
SPECS = [("a", 3e-4, 24, "cosine", 0.6), ("b", 1e-4, 24, "wsd", 1.0), ("c", 1e-3, 16, "constant", 0.8),
         ("d", 6e-4, 24, "wsd", 0.9), ("e", 2e-4, 16, "cosine", 0.5)]


def run(lr, steps, schedule):
    return RunSchedule(lr, steps, warmup_steps=1, schedule=schedule, decay_fraction=0.25, min_lr_ratio=0.1)


def generated(tid, lr, steps, schedule, mix, rng, noise=0.002, truth=TRUE):
    """A trial's evals every 2 steps, from the law with known parameters, with multiplicative noise."""
    r = run(lr, steps, schedule)
    evals = np.arange(2, steps + 1, 2)
    losses = {}
    for target in ("domain", "general"):
        clean = CptLawFit(target, BASE[target], truth[target], UNIT).curve(r, mix)[evals]
        losses[target] = clean * (1 + noise * rng.standard_normal(len(evals)))
    return Curve(tid, r, mix, evals, losses["domain"], losses["general"])


def test_areas_by_hand():
    # lr 1, 1, 0.5, 0.25 with momentum 0.5: drops below the peak 0, 0, 0.5, 0.25; m = 0, 0, 0.5, 0.5
    s1, s2 = areas(np.array([1.0, 1.0, 0.5, 0.25]), momentum=0.5)
    assert s1.tolist() == [0.0, 1.0, 2.0, 2.5, 2.75]
    assert s2.tolist() == [0.0, 0.0, 0.0, 0.5, 1.0]
    # a re-warm adds forward area and no annealing area; a constant lr none either
    s1, s2 = areas(np.array([0.25, 0.5, 1.0, 1.0]))
    assert s1[-1] == 2.75 and not s2.any()


@pytest.mark.parametrize("target", ["domain", "general"])
@pytest.mark.parametrize(("noise", "tolerance"), [(0.0, 0.01), (0.0002, 0.15)])
def test_fit_recovers_the_generating_parameters_and_predicts_a_longer_held_out_schedule(target, noise, tolerance):
    """Exact curves give back the generating parameters (the search reaches the optimum, not a point where the
    optimizer's tolerance stopped it); with 0.02% noise they are recovered within 15% (the general loss's E, beta
    and C trade off against each other: at 0.05% noise its best fit has beta 15% off)."""
    rng = np.random.default_rng(0)
    curves = [generated(*spec, rng, noise=noise) for spec in SPECS]
    fit = fit_cpt_law(curves, target, BASE[target])
    truth = TRUE[target]
    # E and C in the generator's units (the fit measures area in units of the largest trial's)
    e = math.exp(fit.params["log_e"]) / fit.scale * UNIT
    c = fit.params["c"] / fit.scale * UNIT
    assert e == pytest.approx(math.exp(truth["log_e"]), rel=tolerance)
    assert c == pytest.approx(truth["c"], rel=tolerance)
    assert fit.params["beta"] == pytest.approx(truth["beta"], rel=tolerance)
    assert fit.params["b_own"] == pytest.approx(truth["b_own"], rel=tolerance)
    assert fit.params["b_other"] == pytest.approx(truth["b_other"], rel=tolerance)
    assert fit.loo_error is not None and fit.loo_error < 0.01
    # with the noise of real evals (0.2%), a wsd run 2.5x longer than any trial, at an lr and mix no trial used, is
    # predicted within 1% at every eval
    noisy = [generated(*spec, rng, noise=0.002) for spec in SPECS]
    held = generated("held", 4e-4, 60, "wsd", 0.7, rng, noise=0.0)
    predicted = fit_cpt_law(noisy, target, BASE[target], loo=False).curve(held.run, 0.7)[held.steps]
    assert np.max(np.abs(predicted / held.loss(target) - 1)) < 0.01


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_each_schedule_of_a_longer_run_is_predicted_from_short_mixed_schedule_trials(schedule):
    """The schedules end apart (a constant run moves further and never anneals) and the fit tells them apart."""
    rng = np.random.default_rng(6)
    fit = fit_cpt_law([generated(*spec, rng) for spec in SPECS], "domain", BASE["domain"], loo=False)
    held = generated("held", 5e-4, 48, schedule, 0.8, rng, noise=0.0)
    assert np.max(np.abs(fit.curve(held.run, 0.8)[held.steps] / held.domain_loss - 1)) < 0.01


def test_recommendation_keeps_the_forgetting_bound_and_a_looser_bound_buys_more_domain_data():
    rng = np.random.default_rng(1)
    curves = [generated(*spec, rng) for spec in SPECS]
    kwargs = dict(base_domain_loss=BASE["domain"], base_general_loss=BASE["general"], reference=curves[0],
                  total_steps=30, tokens_per_step=512, bootstrap=0)
    tight, fits = recommend(curves, max_forgetting=0.05, **kwargs)
    loose, _ = recommend(curves, max_forgetting=0.5, **kwargs)
    assert tight.source == "law" and loose.source == "law"
    assert tight.predicted_general_loss <= BASE["general"] + math.log1p(0.05) + 1e-12
    # what the generating law says of the pick: it really is within the bound (up to the fit's error)
    truth = CptLawFit("general", BASE["general"], TRUE["general"], UNIT)
    picked = RunSchedule(tight.peak_lr, 30, warmup_steps=1, schedule=tight.schedule, decay_fraction=0.25,
                         min_lr_ratio=0.1)
    assert truth.curve(picked, tight.mix_ratio)[-1] <= BASE["general"] + math.log1p(0.05) + 0.01
    assert loose.mix_ratio > tight.mix_ratio and loose.predicted_domain_loss < tight.predicted_domain_loss
    # searched only inside the trials' ranges
    assert 1e-4 <= tight.peak_lr <= 1e-3 and 0.5 <= tight.mix_ratio <= 1.0
    assert set(fits) == {"domain", "general"}


def test_bootstrap_interval_brackets_the_prediction():
    rng = np.random.default_rng(2)
    curves = [generated(*spec, rng) for spec in SPECS]
    rec, _ = recommend(curves, base_domain_loss=BASE["domain"], base_general_loss=BASE["general"],
                       reference=curves[0], total_steps=30, tokens_per_step=512, max_forgetting=0.2, bootstrap=30)
    low, high = rec.domain_loss_ci
    assert low <= rec.predicted_domain_loss <= high and high - low < 0.1


def test_fallback_engages_and_says_why_on_curves_the_law_cannot_fit():
    rng = np.random.default_rng(3)
    curves = [generated(*spec, rng, noise=0.15) for spec in SPECS]  # 15% noise: no law survives leave-one-out
    rec, _ = recommend(curves, base_domain_loss=BASE["domain"], base_general_loss=BASE["general"],
                       reference=curves[0], total_steps=48, tokens_per_step=512, max_forgetting=0.1, bootstrap=0)
    assert rec.source == "fallback" and rec.predicted_domain_loss is None
    assert "leave-one-trial-out error" in rec.reasons[0] and "Ibrahim" in rec.reasons[-1]
    # Ibrahim et al.'s recipe around the reference trial (lr 3e-4 for 24 steps, mix 0.6): its lr scaled down for
    # a run twice as long, re-warmed over 1% of 48 steps (rounds to 0: at least 1), cosine to 0.1 x, its own
    # replay (40%: more than the recipe's 5%)
    assert rec.peak_lr == pytest.approx(3e-4 * 2 ** -0.3)
    assert (rec.mix_ratio, rec.schedule, rec.warmup_steps, rec.min_lr_ratio) == (0.6, "cosine", 1, 0.1)


def test_fallback_recipe_keeps_some_replay_and_the_winner_fallback_keeps_the_trials_schedule():
    rng = np.random.default_rng(3)
    curves = [generated(*spec, rng, noise=0.15) for spec in SPECS]
    reference = curves[1]  # trial b: lr 1e-4, 24 steps, wsd, no replay (mix 1.0), warmup 1
    common = dict(base_domain_loss=BASE["domain"], base_general_loss=BASE["general"], reference=reference,
                  total_steps=240, tokens_per_step=512, max_forgetting=0.1, bootstrap=0)
    recipe, _ = recommend(curves, **common)
    assert recipe.source == "fallback" and recipe.mix_ratio == 0.95  # 5% replay at least
    assert (recipe.schedule, recipe.warmup_steps, recipe.min_lr_ratio) == ("cosine", 2, 0.1)  # 1% of 240 = 2.4
    assert recipe.peak_lr == pytest.approx(1e-4 * 10 ** -0.3)
    winner, _ = recommend(curves, **common, fallback_kind="winner")
    # the trial's own schedule, mix and min lr; its warmup of 1 in 24 steps stretched to 10 in 240
    assert (winner.schedule, winner.mix_ratio, winner.warmup_steps, winner.min_lr_ratio) == ("wsd", 1.0, 10, 0.1)
    assert "trial b's settings" in winner.reasons[-1]
    no_general, _ = recommend(curves, **{**common, "base_general_loss": None})
    assert no_general.mix_ratio == 1.0  # no general corpus: nothing to replay


def test_fallback_when_too_few_trials_or_the_run_reaches_beyond_the_data():
    rng = np.random.default_rng(4)
    curves = [generated(*spec, rng) for spec in SPECS]
    common = dict(base_domain_loss=BASE["domain"], base_general_loss=BASE["general"], reference=curves[0],
                  tokens_per_step=512, max_forgetting=0.5, bootstrap=0)
    few, _ = recommend(curves[:2], total_steps=30, **common)
    assert few.source == "fallback" and "needs 3" in few.reasons[0]
    far, _ = recommend(curves, total_steps=2400, **common)  # 100x the longest trial
    assert far.source == "fallback" and "beyond the 4x" in far.reasons[0] and far.predicted_domain_loss is None


def test_horizon_rule():
    assert horizon_lr(1e-3, 1000, 1000) == pytest.approx(1e-3)
    assert horizon_lr(1e-3, 1000, 10_000) == pytest.approx(1e-3 * 10 ** -0.3)


def test_a_continuation_is_predicted_only_inside_the_laws_support():
    from raycpt.core.forecast.cpt_law import predict_run

    rng = np.random.default_rng(7)
    curves = [generated(*spec, rng) for spec in SPECS]
    fits = {t: fit_cpt_law(curves, t, BASE[t]) for t in ("domain", "general")}
    # a wsd trial of 24 steps continued to 48: the same wsd run, longer (inside 4x the data's forward area)
    predicted, said = predict_run(fits, run(3e-4, 48, "wsd"), 0.6)
    truth = {t: CptLawFit(t, BASE[t], TRUE[t], UNIT).curve(run(3e-4, 48, "wsd"), 0.6)[-1] for t in BASE}
    assert predicted["domain_loss"] == pytest.approx(truth["domain"], rel=0.01)
    assert predicted["general_loss"] == pytest.approx(truth["general"], rel=0.01)
    assert "predicts" in said
    far, said = predict_run(fits, run(1e-3, 400, "wsd"), 0.6)
    assert far is None and "beyond the 4x" in said
    bad = {t: dataclasses_replace(f, loo_error=0.2) for t, f in fits.items()}
    assert predict_run(bad, run(3e-4, 48, "wsd"), 0.6)[0] is None


def dataclasses_replace(obj, **changes):
    import dataclasses

    return dataclasses.replace(obj, **changes)
