"""PNG plots of a sweep, written into <experiment dir>/plots/: learning curves (domain and general held-out ppl vs
training tokens, ASHA stops marked), held-out ppl vs downstream F1 with the Pareto front, and each swept
hyperparameter against the final metrics.

Per-trial histories come from the result.json (one JSON object per report) Tune writes in each trial's directory
(raycpt.results.collect.load_history, shared with the CPT law's fit).
Figures are drawn with matplotlib's object API on the Agg canvas: no pyplot state, no display needed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from raycpt.core.config import ExperimentConfig, load_saved_config
from raycpt.core.files import read_json
from raycpt.core.forecast import cpt_law
from raycpt.results import collect
from raycpt.results.format import hp_labels, ppl_text, short_ids
from raycpt.results.recommendation import trial_curves
from raycpt.results.summary import Summary

DPI = 120
PLOT_FILES = ("domain_ppl_vs_tokens.png", "general_ppl_vs_tokens.png", "ppl_vs_f1.png", "hyperparameters.png")
CPT_LAW_PLOT = "cpt_law.png"
"""The schedule-aware CPT law: fitted vs observed curves per trial, and the recommended run's predicted curve."""
RETIRED_PLOTS = ("law.png",)
"""Plots earlier versions drew and this one does not (law.png: the mixing law, replaced by the CPT law): removed from
plots/ when the plots are written, so they are not mistaken for this analysis's."""
STATUS_MARKERS = {"finished": ("o", None), "stopped": ("X", "stopped by ASHA"), "failed": ("x", "failed"),
                  "running": (">", "still running")}


def load_histories(exp_dir: Path, summary: Summary) -> dict[str, pd.DataFrame]:
    """trial id -> its reports (raycpt.results.collect.load_histories)."""
    return collect.load_histories(exp_dir, summary.trials)


def _figure(width: float = 9.5, height: float = 5.5, **subplots):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    return fig, fig.subplots(**subplots)


def _style(trials: list[dict[str, Any]], winner: str | None) -> dict[str, dict[str, Any]]:
    """One colour and a legend label per trial, the same in every plot."""
    from matplotlib import colormaps

    ids = short_ids([t["trial_id"] for t in trials])
    hp_keys = sorted({k for t in trials for k in t if k.startswith("hp/")})
    labels = hp_labels(hp_keys)
    palette = colormaps["tab10"].colors
    styles = {}
    for i, t in enumerate(trials):
        hps = ", ".join(f"{labels[k]}={_value_text(t.get(k))}" for k in hp_keys)
        winner_mark = " (winner)" if t["trial_id"] == winner else ""
        styles[t["trial_id"]] = {"color": palette[i % len(palette)], "label": f"{ids[t['trial_id']]}: {hps}"
                                 + winner_mark, "short": ids[t["trial_id"]]}
    return styles


def _value_text(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _tokens_axis(ax) -> None:
    from matplotlib.ticker import EngFormatter

    ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    ax.set_xlabel("training tokens seen")
    ax.grid(True, alpha=0.3)


def _ppl_axis(axis) -> None:
    """Perplexity ticks as 50,000 / 45 / 47.5 rather than 5e4 or 45.00."""
    from matplotlib.ticker import FuncFormatter

    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}" if value >= 100 or value == int(value)
                                           else f"{value:.3g}"))
    axis.set_minor_formatter(FuncFormatter(lambda value, _: ""))


def _log_if_wide(ax, values: list[float], axis: str = "y") -> None:
    """Log scale when the values span more than 10x (a random init and a trained model, lr sweeps)."""
    positive = [v for v in values if v and v > 0 and not math.isnan(v)]
    if positive and max(positive) / min(positive) > 10:
        (ax.set_yscale if axis == "y" else ax.set_xscale)("log")


def _status_legend(ax, statuses: set[str], extra: list | None = None) -> None:
    from matplotlib.lines import Line2D

    handles, labels = ax.get_legend_handles_labels()
    for status, (marker, label) in STATUS_MARKERS.items():
        if label and status in statuses:
            handles.append(Line2D([], [], color="black", marker=marker, linestyle="", markersize=8))
            labels.append(label)
    for handle, label in extra or []:
        handles.append(handle)
        labels.append(label)
    ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)


def plot_curves(path: Path, summary: Summary, histories: dict[str, pd.DataFrame], metric: str,
                title: str, ylabel: str, bound: float | None = None) -> Path | None:
    """One line per trial of `metric` against tokens; the base model as a dashed line at its value; each trial's
    end marked by how it ended (ASHA stop, failure)."""
    trials = [t for t in summary.trials if t["trial_id"] in histories and metric in histories[t["trial_id"]]]
    if not trials:
        return None
    styles = _style(summary.trials, summary.winner)
    base_value = (summary.base or {}).get("base/" + metric.split("/", 1)[1])
    fig, ax = _figure()
    values: list[float] = []
    for t in trials:
        h = histories[t["trial_id"]].dropna(subset=[metric])
        s, is_winner = styles[t["trial_id"]], t["trial_id"] == summary.winner
        # Every trial starts from the base model, measured on the same held-out blocks: draw the curve from there.
        xs, ys = list(h["tokens"]), list(h[metric])
        if base_value is not None:
            xs, ys = [0, *xs], [base_value, *ys]
        ax.plot(xs, ys, color=s["color"], label=s["label"], marker=".", linewidth=3 if is_winner else 1.5,
                zorder=3 if is_winner else 2)
        marker = STATUS_MARKERS.get(t["status"], ("o", None))[0]
        ax.scatter(h["tokens"].iloc[-1:], h[metric].iloc[-1:], color=s["color"], marker=marker,
                   s=90 if marker in ("X", "x") else 40, edgecolors="black", linewidths=0.8, zorder=4)
        values += list(h[metric])
    extra = []
    if base_value is not None:
        extra.append((ax.axhline(base_value, color="gray", linestyle="--", linewidth=1.2),
                      f"base model ({ppl_text(base_value)})"))
        values.append(base_value)
    if bound is not None:
        extra.append((ax.axhline(bound, color="firebrick", linestyle=":", linewidth=1.2),
                      f"forgetting bound ({ppl_text(bound)}): winners stay below"))
    _log_if_wide(ax, values)
    _ppl_axis(ax.yaxis)
    _tokens_axis(ax)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    _status_legend(ax, {t["status"] for t in trials}, extra)
    fig.savefig(path)
    return path


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points no other point beats on both lower ppl and higher F1, by increasing ppl."""
    front: list[tuple[float, float]] = []
    for ppl, f1 in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or f1 > front[-1][1]:
            front.append((ppl, f1))
    return front


def plot_ppl_vs_f1(path: Path, summary: Summary) -> Path | None:
    """Final domain ppl (x, lower is better) against downstream macro-F1 (y, higher is better): trials that
    measured F1, the base model, the Pareto front, the winner starred; 95% bootstrap intervals as error bars, so a
    spread that lies within the probe's noise looks like it."""
    from matplotlib.lines import Line2D

    trials = [t for t in summary.trials if t.get("eval/f1") is not None and t.get("eval/domain_ppl") is not None]
    if not trials:
        return None
    styles = _style(summary.trials, summary.winner)
    base = summary.base or {}
    points = [(t["eval/domain_ppl"], t["eval/f1"]) for t in trials]
    has_base = base.get("base/f1") is not None and base.get("base/domain_ppl") is not None
    if has_base:
        points.append((base["base/domain_ppl"], base["base/f1"]))
    fig, ax = _figure()
    front = pareto_front(points)
    # Rings mark the front's points, so a front of one point (a winner that beats the base on both) still shows.
    ax.plot([p[0] for p in front], [p[1] for p in front], color="gray", linestyle="--", linewidth=1.2,
            marker="o", markersize=22, markerfacecolor="none", markeredgecolor="gray", zorder=1)
    excluded = summary.excluded or {}
    for point in [*trials, *([{"trial_id": None, **{k.replace("base/", "eval/"): v for k, v in base.items()}}]
                             if has_base else [])]:
        _error_bars(ax, point, color=styles[point["trial_id"]]["color"] if point["trial_id"] else "gray")
    for t in trials:
        s = styles[t["trial_id"]]
        is_winner = t["trial_id"] == summary.winner
        ax.scatter(t["eval/domain_ppl"], t["eval/f1"], color=s["color"], label=s["label"],
                   marker="*" if is_winner else "o", s=320 if is_winner else 70, edgecolors="black",
                   linewidths=0.8, zorder=3, alpha=0.45 if t["trial_id"] in excluded else 1.0)
        ax.annotate(s["short"], (t["eval/domain_ppl"], t["eval/f1"]), textcoords="offset points", xytext=(7, 5),
                    fontsize=8)
    extra = [(Line2D([], [], color="gray", linestyle="--", marker="o", markersize=10, markerfacecolor="none"),
              "Pareto front (lower ppl, higher F1)")]
    if has_base:
        ax.scatter(base["base/domain_ppl"], base["base/f1"], color="gray", marker="D", s=60, zorder=3)
        ax.annotate("base", (base["base/domain_ppl"], base["base/f1"]), textcoords="offset points",
                    xytext=(7, 5), fontsize=8)
        extra.append((Line2D([], [], color="gray", marker="D", linestyle=""), "base model"))
    if excluded and any(t["trial_id"] in excluded for t in trials):
        extra.append((Line2D([], [], color="black", marker="o", linestyle="", alpha=0.45),
                      "faded: excluded by the rule (forgetting)"))
    _log_if_wide(ax, [p[0] for p in points], axis="x")
    _ppl_axis(ax.xaxis)
    ax.margins(0.12)
    missing = len(summary.trials) - len(trials)
    ax.set_xlabel("domain held-out perplexity (lower is better)" + (
        f"\nnot shown: {missing} trial(s) without F1 (stopped or failed before the final probe)" if missing else ""))
    ax.set_ylabel("downstream macro-F1 (higher is better)")
    ax.set_title("Held-out perplexity vs downstream F1 (★ winner)")
    ax.grid(True, alpha=0.3)
    _status_legend(ax, set(), extra)
    fig.savefig(path)
    return path


def _error_bars(ax, point: dict[str, Any], color: str) -> None:
    """The point's 95% intervals on domain ppl (x) and F1 (y), where it has them."""
    x, y = point["eval/domain_ppl"], point["eval/f1"]

    def span(name: str, value: float) -> list[list[float]] | None:
        low, high = point.get(name + "_ci_low"), point.get(name + "_ci_high")
        return None if low is None or high is None else [[max(0.0, value - low)], [max(0.0, high - value)]]

    xerr, yerr = span("eval/domain_ppl", x), span("eval/f1", y)
    if xerr or yerr:
        ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="none", ecolor=color, elinewidth=1.0, capsize=3, alpha=0.7,
                    zorder=2)


def _key(statuses: list[str], winner: bool) -> tuple[list, list[str]]:
    """Legend entries for the marker shapes used (colour is per trial, shape is how it ended)."""
    from matplotlib.lines import Line2D

    handles, labels = [], []
    if winner:
        handles.append(Line2D([], [], color="black", marker="*", linestyle="", markersize=12))
        labels.append("winner")
    for status, (marker, label) in STATUS_MARKERS.items():
        if status in statuses:
            handles.append(Line2D([], [], color="black", marker=marker, linestyle="", markersize=8))
            labels.append(label or status)
    handles.append(Line2D([], [], color="gray", linestyle="--"))
    labels.append("base model")
    return handles, labels


def plot_hyperparameters(path: Path, summary: Summary, metric: str) -> Path | None:
    """One column per swept hyperparameter: the final `metric` (top) and F1 (bottom, when measured) of every trial
    against the value it sampled; the marker says how the trial ended."""
    trials = [t for t in summary.trials if t.get(metric) is not None]
    hp_keys = sorted({k for t in summary.trials for k in t if k.startswith("hp/")})
    if not trials or not hp_keys:
        return None
    labels = hp_labels(hp_keys)
    styles = _style(summary.trials, summary.winner)
    base = summary.base or {}
    rows = [(metric, metric.split("/")[-1].replace("_", " ") + " (last report)")]
    if any(t.get("eval/f1") is not None for t in trials):
        rows.append(("eval/f1", "downstream macro-F1"))
    fig, axes = _figure(width=max(5.0, 4.2 * len(hp_keys)), height=3.2 * len(rows) + 0.6, nrows=len(rows),
                        ncols=len(hp_keys), squeeze=False, sharex="col")
    for col, key in enumerate(hp_keys):
        values = [t.get(key) for t in trials]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        categories = sorted({str(v) for v in values})
        for row, (name, ylabel) in enumerate(rows):
            ax = axes[row][col]
            ys = []
            for t in trials:
                if t.get(name) is None:
                    continue
                x = t[key] if numeric else categories.index(str(t[key]))
                marker = STATUS_MARKERS.get(t["status"], ("o", None))[0]
                is_winner = t["trial_id"] == summary.winner
                ax.scatter(x, t[name], color=styles[t["trial_id"]]["color"], marker="*" if is_winner else marker,
                           s=250 if is_winner else 70, edgecolors="black", linewidths=0.8, zorder=3)
                ax.annotate(styles[t["trial_id"]]["short"], (x, t[name]), textcoords="offset points",
                            xytext=(6, 4), fontsize=7)
                ys.append(t[name])
            base_value = base.get("base/" + name.split("/", 1)[1])
            if base_value is not None:
                ax.axhline(base_value, color="gray", linestyle="--", linewidth=1.0, label="base model")
                ys.append(base_value)
            ax.margins(x=0.2, y=0.12)
            if numeric:
                _log_if_wide(ax, [float(v) for v in values], axis="x")
                if all(isinstance(v, int) for v in values) and len(set(values)) <= 10:
                    ax.set_xticks(sorted(set(values)))  # integer knobs: ticks at the values sampled, not 1.2, 1.4
            else:
                ax.set_xticks(range(len(categories)), categories)
            if name != "eval/f1":
                _log_if_wide(ax, ys)
                _ppl_axis(ax.yaxis)
            ax.set_xlabel(labels[key] + (" (log scale)" if ax.get_xscale() == "log" else ""))
            if col == 0:
                ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
    fig.suptitle("Swept hyperparameters vs metrics (points labelled by trial)")
    fig.legend(*_key([t["status"] for t in trials], winner=summary.winner is not None),
               loc="outside lower center", ncols=5, fontsize=8, frameon=False)
    fig.savefig(path)
    return path


def write_plots(exp_dir: Path, summary: Summary, select: dict[str, Any] | None = None) -> list[Path]:
    """Write every plot the sweep has data for into <exp_dir>/plots/; returns the files written. `select`: the
    selection rule the summary was made under (default: the experiment's saved config's)."""
    exp_dir = Path(exp_dir)
    out = exp_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    config_file = exp_dir / "raycpt_config.json"
    cfg = read_json(config_file) if config_file.exists() else {}
    metric = cfg.get("search", {}).get("metric", "eval/domain_ppl")
    max_forgetting = (select or cfg.get("select", {})).get("max_forgetting")
    base_general = (summary.base or {}).get("base/general_ppl")
    bound = (1 + max_forgetting) * base_general if max_forgetting is not None and base_general else None
    histories = load_histories(exp_dir, summary)
    # a plot this sweep has no data for (or this version no longer draws) must not survive from an earlier one
    for name in (*PLOT_FILES, CPT_LAW_PLOT, *RETIRED_PLOTS):
        (out / name).unlink(missing_ok=True)
    written = [
        plot_curves(out / "domain_ppl_vs_tokens.png", summary, histories, "eval/domain_ppl",
                    "Domain held-out perplexity while training", "domain held-out perplexity"),
        plot_curves(out / "general_ppl_vs_tokens.png", summary, histories, "eval/general_ppl",
                    "General held-out perplexity while training (forgetting)", "general held-out perplexity",
                    bound=bound),
        plot_ppl_vs_f1(out / "ppl_vs_f1.png", summary),
        plot_hyperparameters(out / "hyperparameters.png", summary, metric),
        plot_cpt_law(out / CPT_LAW_PLOT, summary, histories, load_saved_config(exp_dir)) if cfg else None,
    ]
    return [p for p in written if p is not None]



def plot_cpt_law(path: Path, summary: Summary, histories: dict[str, pd.DataFrame], cfg: ExperimentConfig
                 ) -> Path | None:
    """Per target (domain, general): every trial's observed evals (points) and the CPT law's fitted curve for it
    (line), from the base model at step 0; the recommended run's predicted curve (black) with its 95% interval at
    its end when the law made the pick, or a note that the recommendation is the fallback."""
    import numpy as np

    rec = summary.recommendation or {}
    fits = {name: cpt_law.CptLawFit.from_dict(raw) for name, raw in (rec.get("fits") or {}).items()}
    curves = trial_curves(summary.trials, histories, cfg)
    if not fits or not curves:
        return None
    styles = _style(summary.trials, summary.winner)
    fig, axes = _figure(width=12.0, height=5.0, ncols=len(fits))
    axes = np.atleast_1d(axes)
    law_pick = rec.get("source") == "law"
    for ax, (name, fit) in zip(axes, fits.items(), strict=True):
        for curve in curves:
            observed = curve.loss(name)
            if observed is None:
                continue
            s = styles.get(curve.trial_id, {"color": "gray", "label": curve.trial_id})
            steps = np.arange(curve.run.total_steps + 1)
            seen = int(max(curve.steps)) + 1
            ax.plot(steps[:seen], np.exp(fit.curve(curve.run, curve.mix_ratio))[:seen], color=s["color"],
                    linewidth=1.2, label=s["label"])
            ax.scatter(curve.steps, np.exp(observed), color=s["color"], s=22, zorder=3)
        if law_pick:
            ref = next((c for c in curves if c.trial_id == rec.get("reference_trial")), curves[0])
            run = cpt_law.RunSchedule(rec["peak_lr"], rec["total_steps"], round(
                ref.run.warmup_steps * rec["total_steps"] / max(1, ref.run.total_steps)), rec["schedule"],
                ref.run.decay_fraction, ref.run.decay_shape, ref.run.min_lr_ratio)
            ax.plot(np.arange(run.total_steps + 1), np.exp(fit.curve(run, rec["mix_ratio"])), color="black",
                    linestyle="--", linewidth=2, label=f"recommended: lr {rec['peak_lr']:.2g}, mix "
                                                       f"{rec['mix_ratio']:.2f}, {rec['schedule']}")
            ci = rec.get(f"{name}_loss_ci")
            if ci:
                ax.errorbar([run.total_steps], [math.exp(rec[f"predicted_{name}_loss"])],
                            yerr=[[math.exp(rec[f"predicted_{name}_loss"]) - math.exp(ci[0])],
                                  [math.exp(ci[1]) - math.exp(rec[f"predicted_{name}_loss"])]],
                            color="black", capsize=4, zorder=4)
        ax.axhline(math.exp(fit.base_loss), color="gray", linestyle=":", linewidth=1)
        loo = f"{fit.loo_error:.1%}" if fit.loo_error is not None else "n/a"
        ax.set_title(f"{name} held-out ppl: CPT law (leave-one-trial-out error {loo})")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(f"{name} ppl")
        _ppl_axis(ax.yaxis)
        ax.legend(fontsize=7)
    if not law_pick:
        fig.suptitle("recommendation: fallback (" + "; ".join(rec.get("reasons") or [])[:150] + ")", fontsize=8)
    fig.savefig(path)
    return path
