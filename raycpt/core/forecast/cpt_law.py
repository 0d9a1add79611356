"""A schedule-aware law of continued pre-training: held-out domain and general loss at every step of a run, as a
function of the learning rates the run used and its domain share. Fitted on every eval of every trial of a sweep
(ASHA-stopped trials included), it predicts the whole curve of a run nobody ran yet: another peak lr, schedule, mix
or length, or the continuation of a trial. No torch, no Ray: numpy and scipy on a few dozen numbers.

The form follows the CPT learning-dynamics law of Wang et al. 2025 ("Learning Dynamics in Continual Pre-Training
for Large Language Models", ICML), built on the lr-annealing law of Tissue et al. 2024 (arXiv 2408.11029): a run is
described by two areas under its lr curve,

    S1(k) = sum of lr over the first k steps                       (forward area: how far the weights have moved)
    S2(k) = sum over i <= k of m_i,  m_i = LAMBDA * m_(i-1) + a_i  (annealing area: how much the lr has come down,
                                                                    a_i the drop below the running peak at step i)

and the loss of a target corpus (domain or general) whose share of the training blocks is s (s = r for the domain
loss, 1 - r for the general loss) is

    L(k) = L_base + B_own * g(s * S1) + B_other * g((1 - s) * S1) - C * S2,     g(x) = 1 - (1 + E * x)**-beta

* L_base is the base model's loss on the same held-out blocks (measured, not fitted): every curve starts there.
* The two g terms are Wang et al.'s distribution-shift term, split by where the forward area was spent: area spent
  on the target's own corpus moves its loss towards that corpus's floor (B_own < 0 for the domain loss), area spent
  on the other corpus moves it away (forgetting: B_other > 0 for the general loss). g saturates, as CPT curves do:
  the shift is fast early and levels off; E sets the area at which it bends, beta how sharply. With s = 1 (no
  replay) the general loss only sees the other corpus; with replay the own term pulls it back.
* -C * S2 is the annealing drop: the part of the loss that the lr's noise holds up and that comes off when the lr
  decays (C >= 0). It is what makes a cosine, a wsd and a constant run of equal S1 end at different losses.

Fitting: B_own, B_other and C enter linearly, so for given (E, beta) they are solved exactly (bounded linear least
squares on relative residuals); E and beta are searched on a grid and refined with L-BFGS-B. Quality is reported as
the leave-one-trial-out error on curves: each trial's whole curve predicted by a fit on the other trials, mean
absolute relative error over its evals.

What it ignores, said plainly: dropout, weight decay and batch size (trials of one sweep share the global batch;
a candidate run is predicted at that batch); data repetition (small corpora repeat blocks); the pre-training
curve's own continuation (negligible over a CPT run of a pre-trained model). LAMBDA is Tissue et al.'s 0.999.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
from scipy import optimize

from raycpt.core.schedule import lr_factor

Target = Literal["domain", "general"]

ANNEAL_MOMENTUM = 0.999
"""LAMBDA of the annealing area (Tissue et al. 2024's value): how long an lr drop keeps lowering the loss."""
LOG_E_BOUNDS = (math.log(1e-2), math.log(1e3))
"""log E, with the forward area in units of the largest area a trial of the sweep reached."""
BETA_BOUNDS = (0.05, 3.0)
"""The shift's curvature: from nearly logarithmic to a sharp knee."""
GRID = (9, 7)
"""Starts for the (log E, beta) search: a grid of this size, the best few refined."""
STARTS_KEPT = 3
MIN_CURVES = 3
"""Trials with at least one eval needed to fit (leave-one-trial-out needs two left to fit on)."""
MIN_POINTS = 6
"""Evals in all needed to fit the 5 parameters of one target."""


@dataclass(frozen=True)
class RunSchedule:
    """A run's lr curve: everything `lr_at` needs."""

    peak_lr: float
    total_steps: int
    warmup_steps: int = 0
    schedule: str = "cosine"
    decay_fraction: float = 0.2
    decay_shape: str = "1-sqrt"
    min_lr_ratio: float = 0.0

    def lrs(self) -> np.ndarray:
        """The lr of each optimizer step, 0 .. total_steps - 1."""
        return np.array([self.peak_lr * lr_factor(k, warmup_steps=self.warmup_steps, total_steps=self.total_steps,
                                                   schedule=self.schedule, decay_fraction=self.decay_fraction,
                                                   decay_shape=self.decay_shape, min_lr_ratio=self.min_lr_ratio)
                         for k in range(self.total_steps)])


def areas(lrs: np.ndarray, momentum: float = ANNEAL_MOMENTUM) -> tuple[np.ndarray, np.ndarray]:
    """(S1, S2) after 0, 1, ..., len(lrs) steps (arrays of len(lrs) + 1; see the module docstring). Only a drop below
    the running peak anneals: a re-warm adds forward area and no annealing area."""
    lrs = np.asarray(lrs, dtype=float)
    s1 = np.concatenate([[0.0], np.cumsum(lrs)])
    below_peak = np.maximum.accumulate(lrs) - lrs if len(lrs) else lrs
    drops = np.diff(np.concatenate([[0.0], below_peak]))
    s2 = np.zeros(len(lrs) + 1)
    m = 0.0
    for i, drop in enumerate(drops):
        m = momentum * m + drop
        s2[i + 1] = s2[i] + m
    return s1, s2


@dataclass
class Curve:
    """One trial's evals: the held-out losses after `steps[i]` optimizer steps of `run` at domain share `mix`."""

    trial_id: str
    run: RunSchedule
    mix_ratio: float
    steps: np.ndarray
    domain_loss: np.ndarray
    general_loss: np.ndarray | None = None

    def loss(self, target: Target) -> np.ndarray | None:
        return self.domain_loss if target == "domain" else self.general_loss


@dataclass
class CptLawFit:
    """The fitted law of one target. `scale`: the forward-area unit (the largest S1 a fitted trial reached)."""

    target: Target
    base_loss: float
    params: dict[str, float]
    scale: float
    loo_error: float | None = None
    """Mean over trials of the mean |relative error| of a trial's curve predicted by a fit on the other trials."""
    fit_error: float = math.nan
    """Mean |relative error| of the fit on its own data."""
    max_s1: float = 0.0
    """The largest forward area among the fitted curves: the edge of the data."""

    def predict(self, s1: np.ndarray, s2: np.ndarray, mix_ratio: float) -> np.ndarray:
        share = mix_ratio if self.target == "domain" else 1.0 - mix_ratio
        return self.base_loss + _basis(self.params["log_e"], self.params["beta"], np.asarray(s1) / self.scale,
                                       np.asarray(s2) / self.scale, np.full(np.shape(s1), share)) @ np.array(
            [self.params["b_own"], self.params["b_other"], self.params["c"]])

    def curve(self, run: RunSchedule, mix_ratio: float) -> np.ndarray:
        """The predicted loss after 0 .. run.total_steps steps."""
        s1, s2 = areas(run.lrs())
        return self.predict(s1, s2, mix_ratio)

    def to_dict(self) -> dict[str, object]:
        return {"target": self.target, "base_loss": self.base_loss, "params": dict(self.params),
                "scale": self.scale, "loo_error": self.loo_error, "fit_error": self.fit_error, "max_s1": self.max_s1}

    @classmethod
    def from_dict(cls, raw: dict[str, object]) -> CptLawFit:
        return cls(**raw)  # type: ignore[arg-type]


def _basis(log_e: float, beta: float, s1: np.ndarray, s2: np.ndarray, share: np.ndarray) -> np.ndarray:
    """[N, 3] columns multiplying (B_own, B_other, C)."""
    e = math.exp(log_e)

    def g(x: np.ndarray) -> np.ndarray:
        return 1.0 - (1.0 + e * x) ** -beta

    return np.stack([g(share * s1), g((1.0 - share) * s1), -s2], axis=-1)


@dataclass
class _Points:
    s1: np.ndarray
    s2: np.ndarray
    share: np.ndarray
    loss: np.ndarray
    trial: np.ndarray


def _points(curves: Sequence[Curve], target: Target, scale: float) -> _Points:
    rows = []
    for curve in curves:
        losses = curve.loss(target)
        if losses is None:
            continue
        s1, s2 = areas(curve.run.lrs())
        share = curve.mix_ratio if target == "domain" else 1.0 - curve.mix_ratio
        for step, loss in zip(curve.steps, losses, strict=True):
            if 0 < step <= curve.run.total_steps and math.isfinite(loss):
                rows.append((s1[int(step)] / scale, s2[int(step)] / scale, share, float(loss), curve.trial_id))
    if not rows:
        return _Points(*(np.zeros(0) for _ in range(4)), np.zeros(0, dtype=object))
    s1, s2, share, loss, trial = zip(*rows, strict=True)
    return _Points(np.array(s1), np.array(s2), np.array(share), np.array(loss), np.array(trial, dtype=object))


def _solve(log_e: float, beta: float, pts: _Points, base_loss: float) -> tuple[np.ndarray, float]:
    """(B_own, B_other, C), sum of squared relative residuals, for fixed (log E, beta)."""
    design = _basis(log_e, beta, pts.s1, pts.s2, pts.share) / pts.loss[:, None]
    target = (pts.loss - base_loss) / pts.loss
    solved = optimize.lsq_linear(design, target, bounds=([-np.inf, -np.inf, 0.0], [np.inf, np.inf, np.inf]),
                                 method="bvls")
    residual = design @ solved.x - target
    return solved.x, float(residual @ residual)


def _fit_points(pts: _Points, base_loss: float, start: tuple[float, float] | None = None, grid_starts: int = 0
                ) -> tuple[dict[str, float], float]:
    """Best (params, sse) refined from `start` and the `grid_starts` best points of the (log E, beta) grid (a fit
    from scratch: STARTS_KEPT; a refit near a known optimum: the warm start and one grid point, so a fold cannot
    stay stuck in the full fit's basin)."""

    def sse(x: np.ndarray) -> float:
        return _solve(float(x[0]), float(x[1]), pts, base_loss)[1]

    def log_sse(x: np.ndarray) -> float:
        # searched on a log scale: the sse of a good fit is ~1e-5, below L-BFGS-B's stopping tolerance (relative to
        # max(|f|, 1)), which left fits short of their optimum
        return math.log(sse(x) + 1e-300)

    starts = [] if start is None else [start]
    if grid_starts:
        grid = [(le, b) for le in np.linspace(*LOG_E_BOUNDS, GRID[0]) for b in np.linspace(*BETA_BOUNDS, GRID[1])]
        starts += sorted(grid, key=lambda p: sse(np.array(p)))[:grid_starts]
    best_x, best_sse = None, math.inf
    for x0 in starts:
        result = optimize.minimize(log_sse, np.array(x0), method="L-BFGS-B", bounds=[LOG_E_BOUNDS, BETA_BOUNDS],
                                   options={"ftol": 1e-12, "gtol": 1e-10, "maxiter": 500})
        if sse(result.x) < best_sse:
            best_x, best_sse = result.x, sse(result.x)
    linear, best_sse = _solve(float(best_x[0]), float(best_x[1]), pts, base_loss)
    return {"log_e": float(best_x[0]), "beta": float(best_x[1]), "b_own": float(linear[0]),
            "b_other": float(linear[1]), "c": float(linear[2])}, best_sse


def fit_cpt_law(curves: Sequence[Curve], target: Target, base_loss: float, *, loo: bool = True,
                start: tuple[float, float] | None = None) -> CptLawFit:
    """Fit the law of `target` on every eval of `curves`; ValueError (plain words) when the data cannot carry it.
    `start`: a known (log E, beta) to refine from instead of searching the grid (bootstrap refits)."""
    usable = [c for c in curves if c.loss(target) is not None and len(c.steps)]
    if len(usable) < MIN_CURVES:
        raise ValueError(f"{len(usable)} trial(s) reported {target} losses; the law needs {MIN_CURVES}")
    if not math.isfinite(base_loss):
        raise ValueError(f"the base model's {target} loss is unknown; the law starts every curve there")
    scale = max(float(areas(c.run.lrs())[0][int(max(c.steps))]) for c in usable)
    pts = _points(usable, target, scale)
    if len(pts.loss) < MIN_POINTS:
        raise ValueError(f"{len(pts.loss)} {target} evals in all; the law needs {MIN_POINTS}")
    params, _ = _fit_points(pts, base_loss, start, grid_starts=STARTS_KEPT if start is None else 0)
    fit = CptLawFit(target, base_loss, params, scale, max_s1=scale)
    fit.fit_error = _mean_rel_error(fit, usable)
    if loo:
        errors = []
        for curve in usable:
            rest = [c for c in usable if c is not curve]
            rest_pts = _points(rest, target, scale)
            if len(rest_pts.loss) < MIN_POINTS - 1:
                continue
            fold, _ = _fit_points(rest_pts, base_loss, (params["log_e"], params["beta"]), grid_starts=1)
            errors.append(_mean_rel_error(replace(fit, params=fold), [curve]))
        fit.loo_error = float(np.mean(errors)) if errors else None
    return fit


def _mean_rel_error(fit: CptLawFit, curves: Sequence[Curve]) -> float:
    errors = []
    for curve in curves:
        s1, s2 = areas(curve.run.lrs())
        steps = np.asarray(curve.steps, dtype=int)
        observed = np.asarray(curve.loss(fit.target), dtype=float)
        predicted = fit.predict(s1[steps], s2[steps], curve.mix_ratio)
        errors.append(float(np.mean(np.abs(predicted / observed - 1.0))))
    return float(np.mean(errors))


# --- the recommendation ------------------------------------------------------------------------------------------

MAX_LOO_ERROR = 0.05
"""A fit whose leave-one-trial-out error on curves exceeds this does not recommend (the fallback does)."""
MAX_EXTRAPOLATION = 4.0
"""The law predicts runs whose forward area is at most this multiple of the largest a trial reached: no study here
has checked a law further than short runs predicting 4x longer ones yet (the retired mixing law's bench_law);
benchmarks/bench_payoff.py prints this law's error and reach on held-out longer runs."""
LR_HORIZON_EXPONENT = 0.3
"""The fallback's lr rule, LR*(D) proportional to D**-beta (Bjorck et al. 2025, "Scaling Optimal LR Across Token
Horizons"): a run of k times the tokens gets k**-0.3 times the lr."""
Fallback = Literal["recipe", "winner"]
"""What the recommendation falls back to when the law cannot carry the run (law.fallback):
recipe: Ibrahim et al. 2024's continual pre-training recipe around the reference trial's lr (re-warm over
RECIPE_WARMUP_FRACTION of the steps, cosine re-decay to RECIPE_MIN_LR_RATIO x the peak, at least RECIPE_MIN_REPLAY
general replay); winner: the reference trial's own schedule, warmup and mix."""
RECIPE_WARMUP_FRACTION = 0.01
"""Ibrahim et al.'s re-warming: 1% of the run's steps (at least one)."""
RECIPE_MIN_LR_RATIO = 0.1
"""Ibrahim et al.'s re-decay: cosine down to 0.1 x the peak lr."""
RECIPE_MIN_REPLAY = 0.05
"""Ibrahim et al.'s replay: a few percent of general data at least (5% their smallest that held forgetting)."""


@dataclass
class Candidate:
    peak_lr: float
    mix_ratio: float
    schedule: str
    domain_loss: float
    general_loss: float | None


@dataclass
class Recommendation:
    """What `raycpt analyze --suggest`, final.yaml and extend use: a run of `total_steps` at these settings."""

    source: Literal["law", "fallback"]
    peak_lr: float
    mix_ratio: float
    schedule: str
    total_steps: int
    reasons: list[str] = field(default_factory=list)
    warmup_steps: int | None = None
    """The run's warmup steps (None: the reference trial's, scaled to the run's length)."""
    min_lr_ratio: float | None = None
    """Where the schedule decays to, as a fraction of the peak lr (None: the reference trial's)."""
    predicted_domain_loss: float | None = None
    predicted_general_loss: float | None = None
    domain_loss_ci: tuple[float, float] | None = None
    general_loss_ci: tuple[float, float] | None = None
    extrapolation: float = 0.0
    """The recommended run's forward area over the largest a trial reached."""
    flags: list[str] = field(default_factory=list)
    """Warnings that travel with the recommendation (e.g. predicted forgetting below what any trial showed)."""

    def to_dict(self) -> dict[str, object]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def horizon_lr(lr: float, tokens_from: float, tokens_to: float, exponent: float = LR_HORIZON_EXPONENT) -> float:
    """The lr for a run of `tokens_to` tokens from the best lr of `tokens_from` (Bjorck et al.'s horizon rule)."""
    return lr * (tokens_to / tokens_from) ** -exponent


def fallback_run(reference: Curve, total_steps: int, tokens_per_step: int, why: list[str], *,
                 kind: Fallback = "recipe", lr_exponent: float = LR_HORIZON_EXPONENT, replay: bool = True
                 ) -> Recommendation:
    """The run recommended when the law cannot carry one: the reference trial's lr scaled by the horizon rule and,
    for `recipe`, Ibrahim et al.'s re-warm (RECIPE_WARMUP_FRACTION of the steps), cosine re-decay to
    RECIPE_MIN_LR_RATIO x the peak and at least RECIPE_MIN_REPLAY replay (when there is a general corpus:
    `replay`); for `winner`, the reference trial's schedule, scaled warmup and mix. `why`: the law's reasons."""
    ref = reference.run
    ref_tokens = ref.total_steps * tokens_per_step
    lr = horizon_lr(ref.peak_lr, ref_tokens, total_steps * tokens_per_step, lr_exponent)
    scaled = (f"its lr {ref.peak_lr:.3g} scaled by the horizon rule (x{lr / ref.peak_lr:.2f} for "
              f"{total_steps * tokens_per_step / ref_tokens:.1f}x its tokens)")
    if kind == "winner":
        return Recommendation("fallback", lr, reference.mix_ratio, ref.schedule, total_steps,
                              why + [f"fell back to trial {reference.trial_id}'s settings with {scaled}"],
                              scaled_warmup(ref, total_steps), ref.min_lr_ratio)
    mix = min(reference.mix_ratio, 1.0 - RECIPE_MIN_REPLAY) if replay else reference.mix_ratio
    warmup = min(total_steps, max(1, round(RECIPE_WARMUP_FRACTION * total_steps)))
    return Recommendation("fallback", lr, mix, "cosine", total_steps, why + [
        f"fell back to Ibrahim et al.'s continual pre-training recipe around trial {reference.trial_id}: {scaled}, "
        f"re-warmed over {warmup} step(s), cosine re-decay to {RECIPE_MIN_LR_RATIO:g}x, mix {mix:.2f}"
        + (f" (at least {RECIPE_MIN_REPLAY:.0%} replay)" if replay and mix < reference.mix_ratio else "")],
        warmup, RECIPE_MIN_LR_RATIO)


def scaled_warmup(reference: RunSchedule, total_steps: int) -> int:
    """The reference run's warmup stretched to a run of `total_steps` (the law's candidates keep its shape)."""
    return min(total_steps, round(reference.warmup_steps * total_steps / max(1, reference.total_steps)))


def _candidates(domain: CptLawFit, general: CptLawFit | None, reference: RunSchedule, total_steps: int,
                lrs: Sequence[float], mixes: Sequence[float], schedules: Sequence[str]) -> list[Candidate]:
    warmup = scaled_warmup(reference, total_steps)
    found = []
    for lr in lrs:
        for schedule in schedules:
            run = replace(reference, peak_lr=float(lr), total_steps=total_steps, warmup_steps=warmup,
                          schedule=schedule)
            s1, s2 = areas(run.lrs())
            for mix in mixes:
                found.append(Candidate(float(lr), float(mix), schedule,
                                       float(domain.predict(s1[-1:], s2[-1:], mix)[0]),
                                       float(general.predict(s1[-1:], s2[-1:], mix)[0]) if general else None))
    return found


def best_candidate(domain: CptLawFit, general: CptLawFit | None, reference: RunSchedule, total_steps: int, *,
                   lrs: Sequence[float], mixes: Sequence[float], schedules: Sequence[str],
                   general_bound: float | None) -> Candidate | None:
    """The candidate with the lowest predicted domain loss whose predicted general loss is within `general_bound`
    (None: no bound); None when none is."""
    allowed = [c for c in _candidates(domain, general, reference, total_steps, lrs, mixes, schedules)
               if general_bound is None or c.general_loss is None or c.general_loss <= general_bound]
    return min(allowed, key=lambda c: c.domain_loss) if allowed else None


def recommend(curves: Sequence[Curve], *, base_domain_loss: float, base_general_loss: float | None,
              reference: Curve, total_steps: int, tokens_per_step: int, max_forgetting: float,
              schedules: Sequence[str] = ("cosine", "wsd"), bootstrap: int = 100, seed: int = 0,
              max_loo_error: float = MAX_LOO_ERROR, max_extrapolation: float = MAX_EXTRAPOLATION,
              lr_exponent: float = LR_HORIZON_EXPONENT, fallback_kind: Fallback = "recipe"
              ) -> tuple[Recommendation, dict[str, CptLawFit]]:
    """The run of `total_steps` the law recommends: peak lr, mix and schedule that minimise predicted domain loss
    with predicted general ppl within (1 + max_forgetting) x the base model's, searched inside the ranges the
    trials covered. When the law cannot say (too few curves, fit error over `max_loo_error`, the run's forward area
    beyond `max_extrapolation` x the data's), `fallback_run` of `fallback_kind`, with the reasons. Returns the
    recommendation and the fits made (to report and plot)."""
    fits: dict[str, CptLawFit] = {}
    reasons: list[str] = []

    def fallback(why: list[str]) -> tuple[Recommendation, dict[str, CptLawFit]]:
        return fallback_run(reference, total_steps, tokens_per_step, why, kind=fallback_kind,
                            lr_exponent=lr_exponent, replay=base_general_loss is not None), fits

    try:
        fits["domain"] = fit_cpt_law(curves, "domain", base_domain_loss)
        if base_general_loss is not None and any(c.general_loss is not None for c in curves):
            fits["general"] = fit_cpt_law(curves, "general", base_general_loss)
    except ValueError as err:
        return fallback([f"the law cannot be fitted: {err}"])
    for name, fit in fits.items():
        if fit.loo_error is None or fit.loo_error > max_loo_error:
            reasons.append(f"the {name} law's leave-one-trial-out error is "
                           + ("unknown" if fit.loo_error is None else f"{fit.loo_error:.1%}")
                           + f" (over {max_loo_error:.0%})")
    if reasons:
        return fallback(reasons)
    domain, general = fits["domain"], fits.get("general")
    observed_lrs = sorted({c.run.peak_lr for c in curves})
    observed_mixes = sorted({c.mix_ratio for c in curves})
    lrs = np.geomspace(observed_lrs[0], observed_lrs[-1], 9) if observed_lrs[-1] > observed_lrs[0] else observed_lrs
    mixes = np.linspace(observed_mixes[0], observed_mixes[-1], 11) if observed_mixes[-1] > observed_mixes[0] \
        else observed_mixes
    bound = (base_general_loss + math.log1p(max_forgetting)) if general is not None else None
    best = best_candidate(domain, general, reference.run, total_steps, lrs=lrs, mixes=mixes, schedules=schedules,
                          general_bound=bound)
    if best is None:
        return fallback([f"no run inside the trials' lr and mix ranges is predicted within the forgetting bound "
                         f"(general ppl <= {1 + max_forgetting:.2f} x base)"])
    run = replace(reference.run, peak_lr=best.peak_lr, total_steps=total_steps, schedule=best.schedule,
                  warmup_steps=scaled_warmup(reference.run, total_steps))
    reach = float(areas(run.lrs())[0][-1]) / domain.max_s1
    if reach > max_extrapolation:
        return fallback([f"the law's pick (lr {best.peak_lr:.3g}, mix {best.mix_ratio:.2f}, {best.schedule}) "
                         f"would move the weights {reach:.1f}x as far as any trial did (forward area), beyond the "
                         f"{max_extrapolation:g}x the law is checked for; no prediction is printed"])
    rec = Recommendation("law", best.peak_lr, best.mix_ratio, best.schedule, total_steps,
                         [f"lowest predicted domain loss within the forgetting bound among {len(lrs)} lrs x "
                          f"{len(mixes)} mixes x {len(schedules)} schedules inside the trials' ranges"],
                         run.warmup_steps, run.min_lr_ratio, best.domain_loss, best.general_loss, extrapolation=reach)
    if bootstrap:
        _bootstrap(rec, curves, fits, reference, bootstrap, seed)
    if general is not None and best.general_loss is not None:
        _check_forgetting(rec, curves, base_general_loss)
    return rec, fits


def _bootstrap(rec: Recommendation, curves: Sequence[Curve], fits: dict[str, CptLawFit], reference: Curve, n: int,
               seed: int) -> None:
    """95% intervals of the recommended run's predicted losses, over fits to trials resampled with replacement
    (each refit starts from the full fit's optimum)."""
    rng = np.random.default_rng(seed)
    starts = {name: (fit.params["log_e"], fit.params["beta"]) for name, fit in fits.items()}
    base_domain = fits["domain"].base_loss
    base_general = fits["general"].base_loss if "general" in fits else None
    run = replace(reference.run, peak_lr=rec.peak_lr, total_steps=rec.total_steps, schedule=rec.schedule,
                  warmup_steps=rec.warmup_steps)
    s1, s2 = areas(run.lrs())
    domain_values, general_values = [], []
    for _ in range(n):
        sample = [curves[i] for i in rng.integers(0, len(curves), len(curves))]
        if len({c.trial_id for c in sample}) < MIN_CURVES:
            continue
        try:
            d = fit_cpt_law(sample, "domain", base_domain, loo=False, start=starts["domain"])
            domain_values.append(float(d.predict(s1[-1:], s2[-1:], rec.mix_ratio)[0]))
            if base_general is not None and rec.predicted_general_loss is not None:
                g = fit_cpt_law(sample, "general", base_general, loo=False, start=starts["general"])
                general_values.append(float(g.predict(s1[-1:], s2[-1:], rec.mix_ratio)[0]))
        except ValueError:
            continue
    if len(domain_values) >= 10:
        rec.domain_loss_ci = tuple(float(q) for q in np.percentile(domain_values, [2.5, 97.5]))
    if len(general_values) >= 10:
        rec.general_loss_ci = tuple(float(q) for q in np.percentile(general_values, [2.5, 97.5]))


def _check_forgetting(rec: Recommendation, curves: Sequence[Curve], base_general: float) -> None:
    """Forgetting from what was observed: a recommendation whose predicted general loss rise is smaller than the
    smallest rise a trial at a similar lr and mix actually showed at its end is flagged."""
    near = [c for c in curves if c.general_loss is not None and len(c.general_loss)
            and abs(math.log(c.run.peak_lr / rec.peak_lr)) <= math.log(3.0) and abs(c.mix_ratio - rec.mix_ratio) <= 0.2]
    if not near or rec.predicted_general_loss is None:
        return
    observed = min(float(c.general_loss[-1]) - base_general for c in near)
    predicted = rec.predicted_general_loss - base_general
    if predicted < observed:
        rec.flags.append(f"predicted forgetting ({math.expm1(predicted):+.1%} general ppl) is lower than any of "
                         f"{len(near)} trial(s) near this lr and mix showed at their end "
                         f"({math.expm1(observed):+.1%}); the law may under-predict forgetting")


def predict_run(fits: dict[str, CptLawFit], run: RunSchedule, mix_ratio: float, *,
                max_loo_error: float = MAX_LOO_ERROR, max_extrapolation: float = MAX_EXTRAPOLATION
                ) -> tuple[dict[str, float] | None, str]:
    """The law's final {domain_loss, general_loss} of `run` at `mix_ratio` (a continuation of a trial included:
    a wsd trial extended is a wsd run of the longer length), or None with the reason it says nothing: no fit, a
    fit over `max_loo_error`, or a run beyond `max_extrapolation` x the data's forward area."""
    if "domain" not in fits:
        return None, "the sweep has no CPT law fit"
    for name, fit in fits.items():
        if fit.loo_error is None or fit.loo_error > max_loo_error:
            error = "unknown" if fit.loo_error is None else f"{fit.loo_error:.1%}"
            return None, f"the {name} law's leave-one-trial-out error is {error} (over {max_loo_error:.0%})"
    s1, s2 = areas(run.lrs())
    reach = float(s1[-1]) / fits["domain"].max_s1
    if reach > max_extrapolation:
        return None, (f"the run moves the weights {reach:.1f}x as far as any trial did, beyond the "
                      f"{max_extrapolation:g}x the law is checked for")
    predicted = {f"{name}_loss": float(fit.predict(s1[-1:], s2[-1:], mix_ratio)[0]) for name, fit in fits.items()}
    return predicted, f"the CPT law predicts it ({reach:.1f}x the trials' forward area)"
