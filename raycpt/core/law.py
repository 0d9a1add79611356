"""Mixing law for continued pre-training: held-out loss as a function of training tokens D and domain share r.

Every trial of a sweep reports held-out domain loss and general loss (natural-log cross-entropy, ppl = exp(loss)) at a
few token counts D. We fit a law per target and use the two laws to pick the domain share r that minimises predicted
domain loss while keeping general perplexity within a forgetting budget, at a larger token budget than the sweep's.

Forms (s is the share of the target's own corpus: s = r for the domain loss, s = 1 - r for the general loss)::

    power:  L(D, s) = E + A / (s*D + d0)**alpha
    dcpt:   L(D, s) = E + A / (s*D + d0)**alpha + C * ((s + eps)**-gamma - (1 + eps)**-gamma),   eps = MIX_EPS fixed

Why these and not the D-CPT paper's ``E + B*r**eta/D**beta + C/(r + eps)**gamma`` (Que et al. 2024) verbatim:

* The data term counts the tokens of the target's own corpus actually seen, s*D (as in data-constrained scaling laws).
  The paper's ``B*r**eta/D**beta`` grows with r, so at small D it says more domain data raises domain loss, and it
  ties the r-trend to the D-trend through one coefficient. ``A/(s*D + d0)**alpha`` falls in both s and D, and ``d0``
  (tokens' worth of what the base model already knows) keeps it finite at s = 0, where the loss stays at the base
  model's E + A/d0**alpha: a trial with r = 1 (no general data) is common, and its general loss must stay finite.
* The mixing term is the paper's C/(s + eps)**gamma, shifted so that it is zero at s = 1. The shift only relabels E
  (same family of curves), but E then means "asymptotic loss when training on this corpus alone", which the s = 1
  trials pin down; unshifted, E trades off against C and cannot be recovered. The term is the share-dependent floor
  that more tokens do not remove: interference from the other corpus for the domain loss, forgetting (which sets in
  early in CPT and then saturates) for the general loss.
* eps is fixed (MIX_EPS): with the handful of mix ratios of a sweep, eps and gamma trade off almost exactly (fitted,
  eps wandered over its whole range and gamma to its bounds on synthetic data); fixed, gamma is identified whenever the
  mixing term is large enough to matter.
* Both forms are monotone: loss falls with more tokens and with a larger own share, so domain loss falls and general
  loss rises with r, and the constrained optimum sits where general loss meets its bound.

``fit_law`` fits each form by least squares on relative residuals (pred/obs - 1: log-space errors to first order,
which suits multiplicative noise and weighs domain and general losses alike). E, A and C enter linearly, so for given
alpha, d0, gamma they are solved exactly by non-negative least squares (variable projection); scipy's least_squares
then searches only those 2-3 nonlinear parameters, kept inside their bounds by a smooth map, from the warm start (if
any) and the best points of a small deterministic grid. It keeps the form with the lowest leave-one-trial-out error:
the mean over trials of the mean absolute relative error of a trial's losses predicted by a fit on the other trials.
The richer form must beat the simpler one by LOO_REL_TOL, since the forms are nested and tie on simple data.

Caveats: the law ignores learning rate, dropout and schedule; reports from trials with different settings, or from
mid-schedule checkpoints, enter as noise (pass the best configuration per mix ratio where possible). No form lets
general loss keep rising with D at a fixed share; forgetting is modelled as a share-dependent floor, so extrapolating
to a larger budget can be optimistic about general loss if forgetting is still growing at the end of the sweep.
Exponents and E need reports spanning a wide range of s*D (>= ~100x) to be recovered; with a narrow range the
predictions can still be fine near the data while the parameters are not individually meaningful.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from scipy import optimize

Target = Literal["domain", "general"]

MIX_EPS = 0.1
"""Fixed offset of the mixing term (s + eps)**-gamma: keeps it finite at s = 0 (see module docstring for why fixed)."""
EXPONENT_BOUNDS = (1e-3, 4.0)
"""alpha and gamma: positive (monotone law) and below values that no LM loss curve shows."""
LOG_D0_BOUNDS = (math.log(1e-5), math.log(1e3))
"""log of d0 in units of the token scale: from negligible to far beyond any observed s*D."""
BOUND_MARGIN = 1e-6
"""Starts are moved this fraction of the bound interval inside it, where the sigmoid map is invertible."""
LSQ_TOL = 1e-8
"""ftol/xtol/gtol of the least-squares solver (relative residuals, so 1e-8 is far below the noise)."""
BOOTSTRAP_LSQ_TOL = 1e-6
"""Bootstrap refits start at the full fit's optimum; 1e-6 moves r* by far less than the spread between resamples."""
START_KEEP_FULL = 3
"""Best grid starts refined by least squares for a fit from scratch."""
START_KEEP_LOO = 1
"""Grid starts added to the warm start for each leave-one-trial-out refit: with only the warm start, a fold can stay
in the full fit's basin and the richer form's leave-one-out error comes out wrong (seen on synthetic data)."""
LOO_REL_TOL = 0.02
"""A richer form must beat the simpler one's leave-one-trial-out error by more than this fraction to be chosen: the
forms are nested (dcpt with C = 0 is power), so on data from the simpler law they tie up to fitting noise."""
MIN_TRIALS = 3
"""Leave-one-trial-out needs at least two trials left to fit on."""
MIN_RATIOS = 2
"""With a single mix ratio the r-dependence of the law is not identified at all."""
GRID_POINTS = 1001
"""Mix ratios evaluated on [0, 1] by best_mix_ratio before local refinement."""
BISECT_STEPS = 45
"""Bisection steps on the general-loss bound: 2**-45 of a 1e-3 grid cell is below float resolution near 1."""
CI_LEVEL = 0.95
MIN_BOOTSTRAP_OK = 10
"""Fewer successful bootstrap refits than this give no interval rather than a meaningless one."""


# --- forms --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Form:
    """A law form: a sum of `linear` coefficients times basis terms that depend on the nonlinear parameters.

    The split is what makes fitting robust (variable projection): for given nonlinear parameters (alpha, d0, gamma)
    the best non-negative E, A, C are an exact NNLS solve, so the optimiser only searches 2-3 bounded dimensions and
    the flat E/A/alpha valley of nearly straight loss curves cannot strand it.
    """

    name: str
    linear: tuple[str, ...]
    nonlinear: tuple[str, ...]
    log_params: frozenset[str]
    starts: dict[str, tuple[float, ...]]
    bounds: dict[str, tuple[float, float]]
    basis: Callable[[dict[str, float], np.ndarray, np.ndarray], np.ndarray]
    """(p, s, tokens) -> one column per linear parameter, for 1-d s and tokens of equal length."""

    @property
    def names(self) -> tuple[str, ...]:
        return self.linear + self.nonlinear

    def value(self, p: dict[str, float], s: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        s_b, tokens_b = np.broadcast_arrays(np.asarray(s, float), np.asarray(tokens, float))
        cols = self.basis(p, s_b.ravel(), tokens_b.ravel())
        return (cols @ np.array([p[n] for n in self.linear])).reshape(s_b.shape)


def _power_basis(p: dict[str, float], s: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    cols = np.empty((s.size, 2))
    cols[:, 0] = 1.0
    cols[:, 1] = (s * tokens + p["d0"]) ** -p["alpha"]
    return cols


def _dcpt_basis(p: dict[str, float], s: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    cols = np.empty((s.size, 3))
    cols[:, 0] = 1.0
    cols[:, 1] = (s * tokens + p["d0"]) ** -p["alpha"]
    cols[:, 2] = (s + MIX_EPS) ** -p["gamma"] - (1.0 + MIX_EPS) ** -p["gamma"]
    return cols


_DATA_STARTS = {"alpha": (0.1, 0.3, 0.6, 1.0), "d0": (1e-3, 0.03, 0.3, 3.0)}
_DATA_BOUNDS = {"alpha": EXPONENT_BOUNDS, "d0": LOG_D0_BOUNDS}

_FORMS: dict[str, _Form] = {
    "power": _Form(
        name="power",
        linear=("E", "A"),
        nonlinear=("alpha", "d0"),
        log_params=frozenset({"d0"}),
        starts=_DATA_STARTS,
        bounds=_DATA_BOUNDS,
        basis=_power_basis,
    ),
    "dcpt": _Form(
        name="dcpt",
        linear=("E", "A", "C"),
        nonlinear=("alpha", "d0", "gamma"),
        log_params=frozenset({"d0"}),
        starts={**_DATA_STARTS, "gamma": (0.5, 1.0, 2.0)},
        bounds={**_DATA_BOUNDS, "gamma": EXPONENT_BOUNDS},
        basis=_dcpt_basis,
    ),
}
FORMS: tuple[str, ...] = tuple(_FORMS)
"""Forms tried by fit_law, simplest first (a richer form must beat a simpler one by LOO_REL_TOL to be chosen)."""


def _to_raw(p: dict[str, float], scale: float) -> dict[str, float]:
    # Internal units use x = D / scale: A/(s*x + d0)**alpha == A*scale**alpha / (s*D + d0*scale)**alpha.
    return {**p, "A": p["A"] * scale ** p["alpha"], "d0": p["d0"] * scale}


def _from_raw(p: dict[str, float], scale: float) -> dict[str, float]:
    return {**p, "A": p["A"] / scale ** p["alpha"], "d0": p["d0"] / scale}


# --- fitting ------------------------------------------------------------------------------------------------------


@dataclass
class Observation:
    """One report of one trial: held-out losses after `tokens` training tokens at domain share `mix_ratio`."""

    trial_id: str
    mix_ratio: float
    tokens: float
    domain_loss: float
    general_loss: float | None = None


@dataclass
class LawFit:
    """A fitted law for one target (see the module docstring for the forms).

    `params` are in raw token units: E, A, C, alpha, d0, gamma (C and gamma for dcpt only; its eps is MIX_EPS; gamma
    means nothing when C == 0). `loo_error` is the chosen form's leave-one-trial-out error, `loo_errors` every fitted
    form's. `predict` takes the domain share r whatever the target; a general law applies it to 1 - r itself.
    """

    form: str
    params: dict[str, float]
    loo_error: float
    target: Target = "domain"
    loo_errors: dict[str, float] = field(default_factory=dict)
    n_points: int = 0
    n_trials: int = 0

    def predict(self, tokens: float | np.ndarray, mix_ratio: float | np.ndarray) -> np.ndarray:
        """Predicted loss at `tokens` training tokens and domain share `mix_ratio` (broadcast against each other)."""
        tokens_arr, ratio_arr = np.broadcast_arrays(np.asarray(tokens, float), np.asarray(mix_ratio, float))
        if np.any((ratio_arr < 0.0) | (ratio_arr > 1.0)) or np.any(tokens_arr < 0.0):
            raise ValueError("mix_ratio must lie in [0, 1] and tokens must be >= 0")
        return _predict(self, tokens_arr, ratio_arr)


def _predict(fit: LawFit, tokens: float | np.ndarray, mix_ratio: float | np.ndarray) -> np.ndarray:
    # Unchecked LawFit.predict for the optimiser's inner loops (inputs already validated there).
    return _value(fit.form, fit.params, _share(fit.target, np.asarray(mix_ratio, float)), np.asarray(tokens, float))


def _share(target: Target, mix_ratio: np.ndarray) -> np.ndarray:
    return mix_ratio if target == "domain" else 1.0 - mix_ratio


def _value(form: str, params: dict[str, float], s: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        return np.asarray(_FORMS[form].value(params, s, tokens), dtype=float)


@dataclass
class _Data:
    trial: np.ndarray
    s: np.ndarray
    tokens: np.ndarray
    loss: np.ndarray


def _collect(observations: Sequence[Observation], target: Target) -> _Data:
    rows = []
    for ob in observations:
        loss = ob.domain_loss if target == "domain" else ob.general_loss
        # Diverged trials report NaN/inf and general-less reports None: they carry no information about the law.
        if loss is None or not math.isfinite(loss):
            continue
        if not 0.0 <= ob.mix_ratio <= 1.0:
            raise ValueError(f"trial {ob.trial_id}: mix_ratio {ob.mix_ratio} is outside [0, 1]")
        if not ob.tokens > 0:
            raise ValueError(f"trial {ob.trial_id}: tokens must be positive, got {ob.tokens}")
        if loss <= 0:
            raise ValueError(f"trial {ob.trial_id}: {target} loss must be positive, got {loss}")
        rows.append((str(ob.trial_id), float(ob.mix_ratio), float(ob.tokens), float(loss)))
    trial = np.array([r[0] for r in rows], dtype=object)
    ratio, tokens, loss = (np.array([r[i] for r in rows], dtype=float) for i in (1, 2, 3))
    return _Data(trial=trial, s=_share(target, ratio), tokens=tokens, loss=loss)


def _check_enough(data: _Data, target: Target) -> None:
    n_trials = len(set(data.trial.tolist()))
    n_ratios = len(np.unique(data.s))
    if n_trials < MIN_TRIALS or n_ratios < MIN_RATIOS:
        raise ValueError(
            f"{target} law needs reports from at least {MIN_TRIALS} trials covering at least {MIN_RATIOS} different"
            f" mix ratios; got {n_trials} trial(s) with {n_ratios} mix ratio(s)"
        )


def _nnls(form: _Form, p: dict[str, float], s: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, ...]:
    """Best non-negative linear coefficients for given nonlinear parameters, and the relative residuals."""
    cols = form.basis(p, s, x) / y[:, None]
    coef, _ = optimize.nnls(cols, np.ones_like(y))
    return coef, cols @ coef - 1.0


def _grid_starts(form: _Form, s: np.ndarray, x: np.ndarray, y: np.ndarray, keep: int) -> list[dict[str, float]]:
    """The `keep` best points of a grid over the nonlinear parameters (linear ones solved exactly)."""
    scored = []
    for combo in itertools.product(*(form.starts[n] for n in form.nonlinear)):
        p = dict(zip(form.nonlinear, combo, strict=True))
        _, resid = _nnls(form, p, s, x, y)
        scored.append((float(resid @ resid), p))
    scored.sort(key=lambda item: item[0])
    return [p for _, p in scored[:keep]]


def _fit_form(
    form: _Form,
    s: np.ndarray,
    tokens: np.ndarray,
    y: np.ndarray,
    warm: dict[str, float] | None,
    keep: int,
    tol: float = LSQ_TOL,
) -> dict[str, float] | None:
    """Least-squares fit of one form on relative residuals; raw-unit parameters, or None if nothing converged.

    Starts: `warm` (raw-unit parameters of a previous fit) and the `keep` best grid points. Nonlinear parameters are
    searched through a smooth map onto their bounds (so Levenberg-Marquardt, fast for these tiny problems, can be
    used); linear ones come from NNLS at every step, which keeps E, A, C >= 0.
    """
    # Tokens in units of their geometric mean: every fitted quantity is O(1), whatever the sweep's scale.
    scale = float(np.exp(np.mean(np.log(tokens))))
    x = tokens / scale
    lo = np.array([form.bounds[n][0] for n in form.nonlinear])
    hi = np.array([form.bounds[n][1] for n in form.nonlinear])
    starts = [] if warm is None else [_from_raw(warm, scale)]
    starts += _grid_starts(form, s, x, y, keep) if keep else []

    def params(z: np.ndarray) -> dict[str, float]:
        theta = lo + (hi - lo) * 0.5 * (1.0 + np.tanh(0.5 * z))  # logistic map R -> (lo, hi), overflow-free
        values = zip(form.nonlinear, theta, strict=True)
        return {n: math.exp(v) if n in form.log_params else float(v) for n, v in values}

    def residuals(z: np.ndarray) -> np.ndarray:
        return _nnls(form, params(z), s, x, y)[1]

    best = None
    for p0 in starts:
        theta0 = np.array([math.log(p0[n]) if n in form.log_params else p0[n] for n in form.nonlinear])
        u = np.clip((theta0 - lo) / (hi - lo), BOUND_MARGIN, 1.0 - BOUND_MARGIN)
        try:
            with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
                res = optimize.least_squares(residuals, 2.0 * np.arctanh(2.0 * u - 1.0), method="lm",
                                             ftol=tol, xtol=tol, gtol=tol)
        except (ValueError, np.linalg.LinAlgError, RuntimeError):
            continue
        if np.isfinite(res.cost) and np.all(np.isfinite(res.x)) and (best is None or res.cost < best.cost):
            best = res
    if best is None:
        return None
    p = params(best.x)
    coef, _ = _nnls(form, p, s, x, y)
    p.update(zip(form.linear, (float(c) for c in coef), strict=True))
    return _to_raw({n: p[n] for n in form.names}, scale)


def _loo_error(form: _Form, data: _Data, full: dict[str, float]) -> float | None:
    """Mean over trials of the mean absolute relative error of that trial's losses, fitted without it."""
    errors = []
    for trial in dict.fromkeys(data.trial.tolist()):
        held = data.trial == trial
        if np.count_nonzero(~held) < len(form.names):
            return None
        p = _fit_form(form, data.s[~held], data.tokens[~held], data.loss[~held], warm=full, keep=START_KEEP_LOO)
        if p is None:
            return None
        pred = _value(form.name, p, data.s[held], data.tokens[held])
        errors.append(float(np.mean(np.abs(pred / data.loss[held] - 1.0))))
    err = float(np.mean(errors))
    return err if math.isfinite(err) else None


def fit_law(observations: Sequence[Observation], target: Target = "domain", forms: Sequence[str] = FORMS) -> LawFit:
    """Fit each form to one target's losses and return the one with the lowest leave-one-trial-out error (the
    simplest one within LOO_REL_TOL of the lowest).

    Raises ValueError when there are fewer than MIN_TRIALS trials or MIN_RATIOS distinct mix ratios with a finite loss
    for `target`, or when no form could be fitted (e.g. fewer reports than a form has parameters).
    """
    if target not in ("domain", "general"):
        raise ValueError(f"target must be 'domain' or 'general', got {target!r}")
    unknown = [f for f in forms if f not in _FORMS]
    if unknown or not forms:
        raise ValueError(f"unknown law form(s) {unknown}; choose from {list(FORMS)}")
    data = _collect(observations, target)
    _check_enough(data, target)
    fits: dict[str, tuple[dict[str, float], float]] = {}
    for name in forms:
        form = _FORMS[name]
        if data.loss.size <= len(form.names):
            continue  # no residual degrees of freedom: any curve through the points "fits"
        full = _fit_form(form, data.s, data.tokens, data.loss, warm=None, keep=START_KEEP_FULL)
        if full is None:
            continue
        loo = _loo_error(form, data, full)
        if loo is not None:
            fits[name] = (full, loo)
    if not fits:
        raise ValueError(
            f"could not fit any {target} law form to {data.loss.size} reports of {len(set(data.trial.tolist()))}"
            " trials; more reports per trial are needed"
        )
    # Parsimony: the simplest form whose error is within LOO_REL_TOL of the lowest (see LOO_REL_TOL).
    lowest = min(loo for _, loo in fits.values())
    by_size = sorted(fits, key=lambda name: len(_FORMS[name].names))
    best = next(name for name in by_size if fits[name][1] <= lowest * (1.0 + LOO_REL_TOL))
    return LawFit(
        form=best,
        params=fits[best][0],
        loo_error=fits[best][1],
        target=target,
        loo_errors={name: loo for name, (_, loo) in fits.items()},
        n_points=int(data.loss.size),
        n_trials=len(set(data.trial.tolist())),
    )


def _refit(fit: LawFit, observations: Sequence[Observation]) -> LawFit | None:
    """Same form refitted from a warm start (bootstrap): no grid, no leave-one-out, None if it cannot be fitted."""
    data = _collect(observations, fit.target)
    try:
        _check_enough(data, fit.target)
    except ValueError:
        return None
    form = _FORMS[fit.form]
    if data.loss.size <= len(form.names):
        return None
    params = _fit_form(form, data.s, data.tokens, data.loss, warm=fit.params, keep=0, tol=BOOTSTRAP_LSQ_TOL)
    if params is None:
        return None
    return LawFit(form=fit.form, params=params, loo_error=math.nan, target=fit.target, n_points=int(data.loss.size))


# --- choosing the mix ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MixChoice:
    """best_mix_ratio's answer. `feasible` is False when no r met the general-loss bound: then `mix_ratio` is the r
    with the smallest predicted general loss (the least violation). `general_loss` is None without a general law."""

    mix_ratio: float
    domain_loss: float
    general_loss: float | None
    feasible: bool


def best_mix_ratio(
    domain_fit: LawFit,
    general_fit: LawFit | None,
    tokens: float,
    general_loss_bound: float | None,
    grid: int = GRID_POINTS,
) -> MixChoice:
    """The domain share r in [0, 1] minimising predicted domain loss at `tokens` subject to predicted general loss
    <= `general_loss_bound`.

    A dense grid finds the best cell, then the answer is refined inside it: by bisection on the bound when the
    optimum presses against it (keeping the feasible side, so the bound holds to rounding), or by a bounded scalar
    minimisation when it is interior. Without a general law or a bound, domain loss alone is minimised. On equal
    predicted domain loss the smallest r (most general data, least forgetting) wins.
    """
    if grid < 3:
        raise ValueError("grid needs at least 3 points")
    if not (math.isfinite(tokens) and tokens >= 0):
        raise ValueError(f"tokens must be a finite number >= 0, got {tokens}")
    rs = np.linspace(0.0, 1.0, grid)

    def dom(r: float | np.ndarray) -> np.ndarray:
        return _predict(domain_fit, tokens, r)

    def gen(r: float | np.ndarray) -> np.ndarray:
        assert general_fit is not None
        return _predict(general_fit, tokens, r)

    def answer(r: float, feasible: bool) -> MixChoice:
        return MixChoice(
            mix_ratio=float(r),
            domain_loss=float(dom(r)),
            general_loss=None if general_fit is None else float(gen(r)),
            feasible=feasible,
        )

    def local_min(values: np.ndarray, i: int, fun: Callable[[float], np.ndarray]) -> float | None:
        """Minimiser of `fun` in the two cells around grid point i, if i is an interior local minimum on the grid."""
        if not (0 < i < grid - 1 and values[i - 1] >= values[i] <= values[i + 1]):
            return None
        res = optimize.minimize_scalar(lambda r: float(fun(r)), bounds=(rs[i - 1], rs[i + 1]), method="bounded")
        return float(res.x) if res.success else None

    constrained = general_fit is not None and general_loss_bound is not None
    ld = dom(rs)
    lg = gen(rs) if constrained else None
    ok = lg <= general_loss_bound if lg is not None else np.ones_like(rs, dtype=bool)

    if lg is not None and not ok.any():
        i = int(np.argmin(lg))
        refined = local_min(lg, i, gen)
        r_best = refined if refined is not None and gen(refined) < lg[i] else float(rs[i])
        return answer(r_best, feasible=False)

    i = int(np.argmin(np.where(ok, ld, np.inf)))
    candidates = [float(rs[i])]
    for j in (i - 1, i + 1):
        if 0 <= j < grid and not ok[j] and ld[j] < ld[i]:
            # The optimum presses against the bound between rs[i] (feasible) and rs[j]: bisect, stay feasible.
            good, bad = float(rs[i]), float(rs[j])
            for _ in range(BISECT_STEPS):
                mid = 0.5 * (good + bad)
                good, bad = (mid, bad) if gen(mid) <= general_loss_bound else (good, mid)
            candidates.append(good)
    refined = local_min(ld, i, dom)
    if refined is not None and (lg is None or gen(refined) <= general_loss_bound):
        candidates.append(refined)
    r_best = min(candidates, key=lambda r: (float(dom(r)), r))
    return answer(r_best, feasible=True)


# --- summary ------------------------------------------------------------------------------------------------------


@dataclass
class LawSummary:
    """What summarize_law found; `to_dict()` is the `law.*` block of summary.json, `describe()` one sentence.

    Perplexities are exp(predicted loss) at `target_tokens` and `best_mix_ratio`. General fields are None without
    general losses; the change vs base and the bound are None without `base_general_loss`. `feasible` is False when
    no mix keeps general ppl within the forgetting budget (then the mix is the one that forgets least).
    `best_mix_ratio_ci` is a percentile bootstrap over trials (None if too few resamples could be fitted).
    """

    form_domain: str
    form_general: str | None
    n_reports: int
    n_trials: int
    loo_error_domain: float
    loo_error_general: float | None
    target_tokens: float
    sweep_tokens: float
    best_mix_ratio: float
    best_mix_ratio_ci: tuple[float, float] | None
    predicted_domain_ppl: float
    predicted_general_ppl: float | None
    predicted_general_change: float | None
    best_mix_ratio_at_sweep_budget: float
    feasible: bool
    feasible_at_sweep_budget: bool
    max_forgetting: float
    general_loss_bound: float | None
    bootstrap_ok: int
    params_domain: dict[str, float]
    params_general: dict[str, float] | None
    loo_errors_domain: dict[str, float]
    loo_errors_general: dict[str, float] | None

    def to_dict(self) -> dict[str, object]:
        """Flat, JSON-ready dict; `law.form` and `law.loo_error` are the domain law's."""
        out: dict[str, object] = {
            "law.form": self.form_domain,
            "law.loo_error": self.loo_error_domain,
            "law.best_mix_ratio": self.best_mix_ratio,
            "law.best_mix_ratio_ci": None if self.best_mix_ratio_ci is None else list(self.best_mix_ratio_ci),
        }
        for name, value in vars(self).items():
            if name in ("form_domain", "loo_error_domain", "best_mix_ratio", "best_mix_ratio_ci"):
                continue
            out[f"law.{name}"] = dict(value) if isinstance(value, dict) else value
        return out

    def describe(self) -> str:
        """One plain sentence for logs and reports."""
        ci = "" if self.best_mix_ratio_ci is None else " [{:.2f}, {:.2f}]".format(*self.best_mix_ratio_ci)
        text = (
            f"fit from {self.n_reports} reports of {self.n_trials} trials (domain law: {self.form_domain},"
            f" leave-one-trial-out error {100 * self.loo_error_domain:.1f}%); at {_fmt_tokens(self.target_tokens)}"
            f" tokens the best mix is {self.best_mix_ratio:.2f}{ci},"
            f" predicted domain ppl {self.predicted_domain_ppl:.1f}"
        )
        if self.predicted_general_change is not None:
            text += f", general ppl {100 * self.predicted_general_change:+.0f}% vs base"
        elif self.predicted_general_ppl is not None:
            text += f", general ppl {self.predicted_general_ppl:.1f}"
        if not self.feasible:
            text += (
                f"; no mix keeps general ppl within +{100 * self.max_forgetting:.0f}% of base, so this is the mix that"
                " forgets least"
            )
        return text


def _fmt_tokens(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.3g}"


def summarize_law(
    observations: Sequence[Observation],
    *,
    sweep_tokens: float,
    target_tokens: float,
    base_general_loss: float | None,
    max_forgetting: float,
    seed: int = 0,
    bootstrap: int = 200,
) -> LawSummary:
    """Fit domain and general laws on all reports and pick the best domain share at the sweep's and a target budget.

    The general-loss bound is log((1 + max_forgetting) * exp(base_general_loss)): general ppl within
    (1 + max_forgetting) x the base model's. Without general losses (no general corpus) or without a base loss, the
    domain loss alone is minimised. The interval for r* comes from `bootstrap` resamples of trials (with replacement,
    seeded), each refitted from the full fit's parameters with the full fit's forms. Raises ValueError when there
    are not enough trials to fit the law.
    """
    if not (sweep_tokens > 0 and target_tokens > 0):
        raise ValueError("sweep_tokens and target_tokens must be positive")
    if max_forgetting < 0:
        raise ValueError("max_forgetting must be >= 0")
    domain_fit = fit_law(observations, "domain")
    has_general = any(ob.general_loss is not None and math.isfinite(ob.general_loss) for ob in observations)
    general_fit = fit_law(observations, "general") if has_general else None
    # log((1 + f) * exp(b)) == b + log1p(f), without overflowing exp for large losses.
    bound = None if base_general_loss is None or general_fit is None else base_general_loss + math.log1p(max_forgetting)

    at_target = best_mix_ratio(domain_fit, general_fit, target_tokens, bound)
    at_sweep = best_mix_ratio(domain_fit, general_fit, sweep_tokens, bound)

    by_trial: dict[str, list[Observation]] = {}
    for ob in observations:
        by_trial.setdefault(str(ob.trial_id), []).append(ob)
    trial_ids = list(by_trial)
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(bootstrap):
        picks = rng.integers(0, len(trial_ids), size=len(trial_ids))
        sample = [ob for k in picks for ob in by_trial[trial_ids[k]]]
        dom = _refit(domain_fit, sample)
        gen = _refit(general_fit, sample) if general_fit is not None else None
        if dom is None or (general_fit is not None and gen is None):
            continue  # e.g. a resample with a single mix ratio: the law is not identified there
        boot.append(best_mix_ratio(dom, gen, target_tokens, bound).mix_ratio)
    alpha = (1.0 - CI_LEVEL) / 2.0
    ci = (
        (float(np.quantile(boot, alpha)), float(np.quantile(boot, 1.0 - alpha)))
        if len(boot) >= MIN_BOOTSTRAP_OK
        else None
    )

    general_ppl = None if at_target.general_loss is None else math.exp(at_target.general_loss)
    change = (
        None
        if at_target.general_loss is None or base_general_loss is None
        else math.expm1(at_target.general_loss - base_general_loss)
    )
    return LawSummary(
        form_domain=domain_fit.form,
        form_general=None if general_fit is None else general_fit.form,
        n_reports=domain_fit.n_points,
        n_trials=domain_fit.n_trials,
        loo_error_domain=domain_fit.loo_error,
        loo_error_general=None if general_fit is None else general_fit.loo_error,
        target_tokens=float(target_tokens),
        sweep_tokens=float(sweep_tokens),
        best_mix_ratio=at_target.mix_ratio,
        best_mix_ratio_ci=ci,
        predicted_domain_ppl=math.exp(at_target.domain_loss),
        predicted_general_ppl=general_ppl,
        predicted_general_change=change,
        best_mix_ratio_at_sweep_budget=at_sweep.mix_ratio,
        feasible=at_target.feasible,
        feasible_at_sweep_budget=at_sweep.feasible,
        max_forgetting=float(max_forgetting),
        general_loss_bound=bound,
        bootstrap_ok=len(boot),
        params_domain=dict(domain_fit.params),
        params_general=None if general_fit is None else dict(general_fit.params),
        loo_errors_domain=dict(domain_fit.loo_errors),
        loo_errors_general=None if general_fit is None else dict(general_fit.loo_errors),
    )
