"""What people read: data and base summaries, live sweep progress, the final trials table, `raycpt report`, and
the Tune logger callbacks (TensorBoard by default, MLflow / W&B on request).

The trials table is built once as display rows (`trial_rows`) and rendered to the terminal (rich) or markdown, so
both always show the same thing. `report_json` is the stable machine-readable form; its keys are listed in
`REPORT_SCHEMA` and only ever gain new ones.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from raycpt.errors import InputError

REPORT_SCHEMA_VERSION = 1
REPORT_SCHEMA = {
    "schema_version": "int: bumped only when a key changes meaning or disappears",
    "experiment_dir": "str",
    "complete": "bool: every trial the sweep will run has ended (none running or pending)",
    "counts": "{status: int} over finished | stopped | failed | running | pending | ...; pending includes trials "
              "Tune has not created yet",
    "base": "{domain_ppl, general_ppl, f1}: the base model, measured once per sweep (null when not measured)",
    "selection": "{winner: trial id | null, flagged: bool, reasons: [str], rule: {max_forgetting, f1_tolerance} "
                 "| null}",
    "export": "{path, trial_id} of the exported winner | null",
    "trials": "[trial], best first under the selection rule",
    "trial": "{rank, trial_id, winner: bool, status, excluded: str | null, error: str | null, hyperparameters: "
             "{dotted field: value}, step, tokens, time_s, domain_ppl, general_ppl, forgetting (relative change of "
             "general ppl vs base), domain_ppl_change (relative change vs base), f1, f1_sd, accuracy}",
}
"""The keys of `raycpt report --format json`, documented for people who script against it."""

RAY_OUTPUT_LOG = "ray_output.log"
"""Ray Tune's own progress tables and log records, in the experiment dir (on the terminal only with --verbose)."""


def make_console() -> Console:
    console = Console(highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        # Logs and CI have no width: rich would assume 80 columns and wrap every table row.
        console = Console(highlight=False, width=120)
    return console


def _num(value: Any) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return math.nan
    return value


def _f(value: Any, digits: int = 2) -> str:
    value = _num(value)
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


def _ppl(value: Any) -> str:
    """Perplexities span 5 to 50,000 between a tiny random model and a trained one: keep about 4 significant
    digits so columns stay narrow."""
    value = _num(value)
    if math.isnan(value):
        return "-"
    if value >= 1000:
        return f"{value:,.0f}"
    return f"{value:.1f}" if value >= 100 else f"{value:.2f}"


def _tokens(value: Any) -> str:
    value = _num(value)
    if math.isnan(value):
        return "-"
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= limit:
            return f"{value / limit:.1f}{suffix}"
    return f"{value:.0f}"


def duration(seconds: Any) -> str:
    """49s, 3m12s, 1h05m."""
    seconds = _num(seconds)
    if math.isnan(seconds):
        return "-"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _int(value: Any) -> int | None:
    """Steps and token counts come back from pandas as floats when any trial lacks them: show 24, not 24.0."""
    value = _num(value)
    return None if math.isnan(value) else int(value)


def _change(value: Any, base: Any) -> float | None:
    value, base = _num(value), _num(base)
    return None if math.isnan(value) or math.isnan(base) or base == 0 else (value - base) / base


def _short(value: Any) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.3g}"
    return "-" if value is None else str(value)


def print_data(console: Console, manifest: dict[str, Any]) -> None:
    for name in ("domain", "general"):
        corpus = manifest.get(name)
        if corpus:
            removed = corpus["removed_for_leakage"]
            console.print(f"[bold]{name:>7}[/]: {corpus['documents']:,} documents, {corpus['train_tokens']:,} "
                          f"training tokens, {corpus['heldout_tokens']:,} held-out tokens"
                          + (f", {removed} downstream-test text(s) removed" if removed else ""))


def print_base(console: Console, base: dict[str, Any]) -> None:
    console.print(f"[bold]   base[/]: domain ppl {_f(base.get('base/domain_ppl'))}, general ppl "
                  f"{_f(base.get('base/general_ppl'))}"
                  + (f", F1 {_f(base.get('base/f1'), 4)}" if base.get("base/f1") is not None else ""))


# ---------------------------------------------------------------------------------------------------------------
# Short names: trial ids share the experiment's prefix, hyperparameters their config section.


def short_ids(trial_ids: list[str]) -> dict[str, str]:
    """'46b34_00002' -> '00002' when every id shares the '46b34_' prefix (Tune's experiment id): the suffix still
    matches the trial's directories with grep, and the table loses 6 characters per row."""
    prefixes = {tid.rsplit("_", 1)[0] for tid in trial_ids if "_" in tid}
    if len(prefixes) != 1 or not all("_" in tid for tid in trial_ids):
        return {tid: tid for tid in trial_ids}
    return {tid: tid.rsplit("_", 1)[1] for tid in trial_ids}


def hp_labels(keys: list[str]) -> dict[str, str]:
    """'hp/train.lr' -> 'lr'; the section stays when two fields share a name (data.seed vs train.seed)."""
    names = [key[3:] for key in keys]
    last = [name.rsplit(".", 1)[-1] for name in names]
    return {key: (tail if last.count(tail) == 1 else name) for key, name, tail in zip(keys, names, last, strict=True)}


def _hp_keys(trials: list[dict[str, Any]]) -> list[str]:
    return sorted({k for t in trials for k in t if k.startswith("hp/")})


# ---------------------------------------------------------------------------------------------------------------
# The final table: display rows shared by the terminal and markdown renderings.


@dataclass
class DisplayRow:
    cells: list[str]
    kind: str
    """base | winner | trial | excluded (by the rule) | failed"""


def _status_text(trial: dict[str, Any], excluded: str | None, width: int = 60) -> str:
    status = trial.get("status") or "?"
    if status == "stopped":
        return f"stopped by ASHA at step {_int(trial.get('step')) or '?'}"
    if status == "failed":
        reason = " ".join(str(trial.get("error") or "see its error.txt").split())
        return "failed: " + (reason if len(reason) <= width else reason[: width - 1] + "…")
    if status == "running" and _int(trial.get("step")):
        return f"running (step {_int(trial['step'])})"
    if status == "finished" and excluded:
        return f"finished; {excluded.split(':', 1)[0]}"
    return status


def trial_rows(summary: dict[str, Any]) -> tuple[list[str], list[DisplayRow]]:
    """Headers and rows of the trials table: the base model first, then every trial best first under the rule.
    The F1 column is left out when neither the base model nor any trial measured F1."""
    base = summary.get("base") or {}
    trials = {t["trial_id"]: t for t in summary["trials"]}
    order = _ordered_ids(summary)
    ids = short_ids(order)
    hp_keys = _hp_keys(summary["trials"])
    labels = hp_labels(hp_keys)
    has_f1 = base.get("base/f1") is not None or any(t.get("eval/f1") is not None for t in trials.values())
    f1 = ["F1"] if has_f1 else []
    headers = ["", "trial", *(labels[k] for k in hp_keys), "status", "domain ppl", "general ppl", *f1,
               "tokens", "time"]
    base_general = base.get("base/general_ppl")
    rows = [DisplayRow(["", "base", *("-" for _ in hp_keys), "base model", _ppl(base.get("base/domain_ppl")),
                        _ppl(base_general), *([_f(base.get("base/f1"), 4)] if has_f1 else []), "0", "-"], "base")]
    excluded = summary.get("excluded") or {}
    for tid in order:
        t = trials[tid]
        change = _change(t.get("eval/general_ppl"), base_general)
        general = _ppl(t.get("eval/general_ppl")) + (f" ({change:+.1%})" if change is not None else "")
        kind = ("winner" if tid == summary.get("winner") else "failed" if t.get("status") == "failed"
                else "excluded" if tid in excluded else "trial")
        rows.append(DisplayRow(["★" if kind == "winner" else "", ids[tid], *(_short(t.get(k)) for k in hp_keys),
                                _status_text(t, excluded.get(tid)), _ppl(t.get("eval/domain_ppl")), general,
                                *([_f(t.get("eval/f1"), 4)] if has_f1 else []), _tokens(t.get("tokens")),
                                duration(t.get("time_total_s"))], kind))
    return headers, rows


def _ordered_ids(summary: dict[str, Any]) -> list[str]:
    """summary["order"] (best first under the rule), then any trial it does not list."""
    ids = [t["trial_id"] for t in summary["trials"]]
    order = [tid for tid in summary.get("order") or [] if tid in ids]
    return order + sorted(set(ids) - set(order))


def _table_note(summary: dict[str, Any]) -> str:
    ids = [t["trial_id"] for t in summary["trials"]]
    note = "(±%): general ppl vs the base model; a rise is forgetting"
    if ids and short_ids(ids)[ids[0]] != ids[0]:
        note = f"trial ids are {ids[0].rsplit('_', 1)[0]}_<trial>; " + note
    return note


def summary_table(summary: dict[str, Any]) -> Table:
    headers, rows = trial_rows(summary)
    note = _table_note(summary)
    table = Table(title="Trials, best first under the selection rule", caption=note, header_style="bold",
                  caption_justify="left", box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 1, 0, 0))
    for i, header in enumerate(headers):
        is_status = header == "status"
        table.add_column(header, justify="left" if i < 2 or is_status else "right",
                         overflow="fold", max_width=34 if is_status else None, no_wrap=not is_status)
    styles = {"base": "dim", "winner": "bold green", "excluded": "dim", "failed": "red", "trial": None}
    for row in rows:
        table.add_row(*(escape(c) for c in row.cells), style=styles[row.kind])
    return table


def _load_lines(path: str) -> list[str]:
    """Python that loads the export; the path on a line of its own, so a narrow terminal cannot break the calls."""
    return ["from transformers import AutoModelForCausalLM, AutoTokenizer", f"path = {json.dumps(path)}",
            "model = AutoModelForCausalLM.from_pretrained(path)", "tokenizer = AutoTokenizer.from_pretrained(path)"]


def _winner_lines(summary: dict[str, Any]) -> list[str]:
    """Plain-text lines about the winner (no markup): why it won, how it moved against the base model."""
    base = summary.get("base") or {}
    trials = {t["trial_id"]: t for t in summary["trials"]}
    w = trials[summary["winner"]]
    hps = ", ".join(f"{label}={_short(w.get(key))}" for key, label in hp_labels(_hp_keys([w])).items())
    lines = [f"trial {summary['winner']}" + (f" ({hps})" if hps else ""), "; ".join(summary["reasons"])]
    moves = []
    for key, label, fmt in (("domain_ppl", "domain ppl", _ppl), ("general_ppl", "general ppl", _ppl),
                            ("f1", "F1", lambda v: _f(v, 4))):
        b, v = base.get(f"base/{key}"), w.get(f"eval/{key}")
        change = _change(v, b)
        if change is not None:
            moves.append(f"{label} {fmt(b)} → {fmt(v)} ({change:+.1%})")
    if moves:
        lines.append("vs base: " + ", ".join(moves))
    return lines


def winner_panel(summary: dict[str, Any]) -> Panel:
    if summary.get("winner") is None:
        return Panel(escape("; ".join(summary.get("reasons") or ["no trial reported yet"])), title="No winner",
                     border_style="red", expand=False)
    lines = [escape(line) for line in _winner_lines(summary)]
    if summary.get("flagged"):
        lines[1] = "[yellow]FLAGGED:[/] " + lines[1]
    export = summary.get("export")
    if export:
        ver = summary.get("verification") or {}
        reloaded = ver.get("reloaded_domain_ppl")
        lines += ["", f"[bold]Exported to[/] {escape(export)}"
                  + (f" (reloaded domain ppl {_f(reloaded, 3)})" if reloaded is not None else ""),
                  "Load it:", *(f"  [cyan]{escape(line)}[/]" for line in _load_lines(export))]
    else:
        lines += ["", f"Not exported yet: [bold]raycpt analyze {escape(summary['experiment_dir'])} --export[/]"]
    return Panel("\n".join(lines), title=f"Winner: {summary['winner']}", border_style="green", expand=False)


def print_summary(console: Console, summary: dict[str, Any]) -> None:
    """The final table (base model first, winner starred) and a panel with the winner, its export and how to load
    it. Fits 100 columns: ids are shortened and long failure reasons wrap inside the status column."""
    console.print(summary_table(summary))
    console.print(winner_panel(summary))


def summary_markdown(summary: dict[str, Any]) -> str:
    """The same table and winner block as the terminal, as GitHub markdown for pasting into a PR."""
    headers, rows = trial_rows(summary)

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cells) + " |"

    out = [f"### raycpt sweep `{Path(summary['experiment_dir']).name}`", "", line(headers),
           line(["---" if i < 2 or h == "status" else "---:" for i, h in enumerate(headers)])]
    for row in rows:
        cells = [cell(c) for c in row.cells]
        if row.kind == "winner":
            cells = [f"**{c}**" if c and c != "-" else c for c in cells]
        elif row.kind == "base":
            cells = [f"_{c}_" if c and c != "-" else c for c in cells]
        out.append(line(cells))
    out += ["", _table_note(summary), ""]
    if summary.get("winner") is None:
        out.append("**No winner:** " + "; ".join(summary.get("reasons") or ["no trial reported yet"]))
        return "\n".join(out) + "\n"
    first, why, *moves = _winner_lines(summary)
    out.append(f"**Winner:** {first}{' (FLAGGED)' if summary.get('flagged') else ''}. {why}.")
    out += [f"{m}." for m in moves]
    if summary.get("export"):
        out += ["", f"Exported to `{summary['export']}`:", "", "```python", *_load_lines(summary["export"]), "```"]
    return "\n".join(out) + "\n"


def expected_trials(search: dict[str, Any]) -> int:
    """Trials a sweep will run: num_samples x the size of every grid (Tune creates them lazily, so a running
    sweep's state on disk does not list them all yet)."""
    total = int(search.get("num_samples") or 1)
    for spec in (search.get("space") or {}).values():
        if "grid" in spec:
            total *= len(spec["grid"])
    return total


def report_json(summary: dict[str, Any], rule: dict[str, Any] | None = None,
                expected: int | None = None) -> dict[str, Any]:
    """The summary in the stable shape documented by REPORT_SCHEMA (metric names without their 'eval/' prefixes).
    `expected`: trials the sweep will run in all; those not created yet count as pending."""
    base = summary.get("base") or {}
    trials = {t["trial_id"]: t for t in summary["trials"]}
    order = _ordered_ids(summary)
    excluded = summary.get("excluded") or {}

    def clean(value: Any) -> Any:
        return None if isinstance(value, float) and math.isnan(value) else value

    rows = []
    for rank, tid in enumerate(order, 1):
        t = trials[tid]
        rows.append({
            "rank": rank, "trial_id": tid, "winner": tid == summary.get("winner"), "status": t.get("status"),
            "excluded": excluded.get(tid), "error": t.get("error") or None,
            "hyperparameters": {k[3:]: clean(v) for k, v in t.items() if k.startswith("hp/")},
            "step": _int(t.get("step")), "tokens": _int(t.get("tokens")), "time_s": clean(t.get("time_total_s")),
            "domain_ppl": clean(t.get("eval/domain_ppl")), "general_ppl": clean(t.get("eval/general_ppl")),
            "forgetting": _change(t.get("eval/general_ppl"), base.get("base/general_ppl")),
            "domain_ppl_change": _change(t.get("eval/domain_ppl"), base.get("base/domain_ppl")),
            "f1": clean(t.get("eval/f1")), "f1_sd": clean(t.get("eval/f1_sd")),
            "accuracy": clean(t.get("eval/accuracy")),
        })
    counts: dict[str, int] = {}
    for t in trials.values():
        counts[t.get("status") or "unknown"] = counts.get(t.get("status") or "unknown", 0) + 1
    if expected is not None and expected > len(trials):
        counts["pending"] = counts.get("pending", 0) + expected - len(trials)
    export = summary.get("export")
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "experiment_dir": summary["experiment_dir"],
        "complete": bool(trials) and not any(s in counts for s in ("running", "pending", "paused")),
        "counts": counts,
        "base": {k: clean(base.get(f"base/{k}")) for k in ("domain_ppl", "general_ppl", "f1")},
        "selection": {"winner": summary.get("winner"), "flagged": bool(summary.get("flagged")),
                      "reasons": list(summary.get("reasons") or []), "rule": rule},
        "export": {"path": export, "trial_id": summary.get("winner")} if export else None,
        "trials": rows,
    }


def report_command(exp_dir: Path, fmt: str, console: Console) -> int:
    """`raycpt report EXPERIMENT_DIR --format table|json|markdown`: the summary of a finished or running sweep,
    read from disk. Never exports and needs no running Ray. Returns the exit code."""
    from raycpt.analysis import analyze
    from raycpt.config import config_from_dict, to_dict
    from raycpt.files import read_json

    exp_dir = Path(exp_dir)
    if fmt not in ("table", "json", "markdown"):
        raise InputError(f"--format {fmt!r}: use table, json or markdown")
    if not (exp_dir / "raycpt_config.json").exists():
        raise InputError(f"{exp_dir}: not a raycpt experiment dir (no raycpt_config.json)")
    cfg = config_from_dict(read_json(exp_dir / "raycpt_config.json"))
    try:
        summary = analyze(exp_dir, cfg, console=None, export=False)
    except ValueError as err:  # Tune has not written its first experiment state yet
        raise InputError(f"{exp_dir}: no trial state on disk yet ({str(err).splitlines()[0]}); try again in a "
                         "few seconds") from err
    for trial in summary["trials"]:
        # Tune snapshots running trials as PENDING (so a restored sweep restarts them): one that has reported is
        # running.
        if trial["status"] == "pending" and trial.get("reports"):
            trial["status"] = "running"
    card_path = exp_dir / "export" / "raycpt_card.json"
    card = read_json(card_path) if card_path.exists() else {}
    if card.get("trial_id") is not None and card["trial_id"] == summary["winner"]:
        summary["export"], summary["verification"] = str(exp_dir / "export"), card.get("verification")
    raw = to_dict(cfg)
    data = report_json(summary, raw["select"], expected_trials(raw["search"]))
    progress = "" if data["complete"] else (
        "Sweep in progress (" + ", ".join(f"{n} {status}" for status, n in sorted(data["counts"].items()))
        + "): the ranking and winner below are provisional.")
    if fmt == "json":
        # print() rather than the console: rich would wrap long lines and break the JSON.
        print(json.dumps(data, indent=2))
    elif fmt == "markdown":
        print((f"_{progress}_\n\n" if progress else "") + summary_markdown(summary), end="")
    else:
        if progress:
            console.print(f"[yellow]{escape(progress)}[/]")
        print_summary(console, summary)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# Live progress during `raycpt sweep`.


@dataclass
class TrialProgress:
    trial_id: str
    hps: dict[str, Any] = field(default_factory=dict)
    status: str = "pending"
    """pending | running | finished | stopped | failed"""
    step: int | None = None
    reports: int = 0
    metric: float = math.nan
    domain_ppl: float = math.nan
    general_ppl: float = math.nan
    f1: float = math.nan
    tokens_per_s: float = math.nan
    mfu: float = math.nan
    report_seconds: float = 0.0
    """Wall time of all its reports, trial start-up included (Tune's time_this_iter_s)."""
    error: str = ""


def seconds_left(trials: list[TrialProgress], total_trials: int, max_reports: int, concurrency: int) -> float | None:
    """Upper bound on the time left: every unfinished trial runs all its reports at the mean time per report seen
    so far (start-up included), `concurrency` at a time. ASHA usually stops some, so the sweep ends sooner."""
    reports = sum(t.reports for t in trials)
    if reports == 0:
        return None
    per_report = sum(t.report_seconds for t in trials) / reports
    unstarted = max(0, total_trials - len(trials))
    remaining = sum(max(0, max_reports - t.reports) for t in trials if t.status in ("pending", "running"))
    return (remaining + unstarted * max_reports) * per_report / max(1, concurrency)


def best_trial(trials: list[TrialProgress], mode: str) -> TrialProgress | None:
    scored = [t for t in trials if not math.isnan(t.metric)]
    if not scored:
        return None
    return (min if mode == "min" else max)(scored, key=lambda t: t.metric)


def progress_headline(trials: list[TrialProgress], total_trials: int, elapsed_s: float, left_s: float | None,
                      metric: str, mode: str) -> tuple[str, str]:
    """(trial counts by status, best so far with elapsed and remaining time)."""
    counts = {s: sum(t.status == s for t in trials) for s in ("running", "finished", "stopped", "failed")}
    pending = max(0, total_trials - len(trials)) + sum(t.status == "pending" for t in trials)
    parts = [f"{counts['running']} running", f"{pending} pending", f"{counts['finished']} finished",
             f"{counts['stopped']} stopped by ASHA", f"{counts['failed']} failed"]
    best = best_trial(trials, mode)
    ids = short_ids([t.trial_id for t in trials])
    best_text = f"best {metric} {_ppl(best.metric)} ({ids[best.trial_id]})" if best else "best: none yet"
    left = "estimating time left" if left_s is None else ("done" if left_s == 0 else f"up to ~{duration(left_s)} left")
    return ", ".join(parts), f"{best_text} | elapsed {duration(elapsed_s)}, {left}"


def progress_view(trials: list[TrialProgress], headline: tuple[str, str]) -> RenderableType:
    ids = short_ids([t.trial_id for t in trials])
    hp_names = sorted({k for t in trials for k in t.hps})
    labels = hp_labels([f"hp/{k}" for k in hp_names])
    table = Table(header_style="bold", pad_edge=False, padding=(0, 1), box=None)
    for header in ("trial", *labels.values(), "status", "step", "domain ppl", "general ppl", "F1", "tok/s"):
        table.add_column(header, justify="left" if header in ("trial", "status") else "right", no_wrap=True)
    styles = {"running": "bold", "finished": "green", "stopped": "dim", "failed": "red", "pending": "dim"}
    for t in trials:
        status = {"stopped": f"stopped by ASHA at step {t.step}", "failed": f"failed: {t.error[:40]}"}.get(
            t.status, t.status)
        table.add_row(ids[t.trial_id], *(_short(t.hps.get(k)) for k in hp_names), escape(status),
                      str(t.step or "-"), _ppl(t.domain_ppl), _ppl(t.general_ppl), _f(t.f1, 4),
                      _f(t.tokens_per_s, 0), style=styles.get(t.status))
    return Group(Text("\n".join(headline)), table)


def _last_line(path: str | None) -> str:
    if not path or not Path(path).exists():
        return "see its error.txt"
    lines = [ln.strip() for ln in Path(path).read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1][:200] if lines else "failed"


def sweep_progress_callback(console: Console, *, metric: str, mode: str, max_reports: int, concurrency: int,
                            live: bool = True):
    """A Tune callback that shows the sweep as it runs: a rich live table (trials by status, latest step and ppl,
    the best so far, elapsed time, an upper bound on what is left) on a terminal; one plain line per report and
    per trial end when stdout is not a terminal (CI, logs) or `live` is False. Call `.close()` after fit().

    The Tuner pickles its callbacks: the console and the Live display are left out and rebuilt on first use."""
    from ray.tune import Callback

    class SweepProgress(Callback):
        # Everything comes in through __init__: a closure over `console` would be pickled with the class.
        def __init__(self, console: Console, metric: str, mode: str, max_reports: int, concurrency: int,
                     live: bool) -> None:
            self.metric, self.mode, self.max_reports, self.concurrency = metric, mode, max_reports, concurrency
            self.use_live = live
            self.trials: dict[str, TrialProgress] = {}
            self.total = 0
            self.started = time.time()
            self._last_refresh = 0.0
            self._console: Console | None = console
            self._live = None

        def __getstate__(self) -> dict[str, Any]:
            return {k: v for k, v in self.__dict__.items() if k not in ("_console", "_live")}

        def __setstate__(self, state: dict[str, Any]) -> None:
            self.__dict__.update(state, _console=None, _live=None)

        @property
        def console(self) -> Console:
            if self._console is None:
                self._console = make_console()
            return self._console

        # -- Tune hooks (all run in the driver process, between Tune's scheduling steps)

        def setup(self, stop=None, num_samples=None, total_num_samples=None, **info):
            self.total = int(total_num_samples or num_samples or 0)
            self.started = time.time()
            if self.use_live and self.console.is_terminal and not self.console.is_dumb_terminal:
                from rich.live import Live

                # No auto-refresh thread: it would read the trial table while Tune's loop changes it.
                self._live = Live(self._view(), console=self.console, auto_refresh=False, transient=False)
                self._live.start()

        def on_trial_start(self, iteration, trials, trial, **info):
            self._state(trial).status = "running"
            self._refresh(force=True)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            from raycpt.analysis import flatten_result

            state, flat = self._state(trial), flatten_result(result)
            state.status, state.reports = "running", state.reports + 1
            state.step = flat.get("step", state.step)
            state.metric = _num(flat.get(self.metric))
            state.domain_ppl, state.general_ppl = _num(flat.get("eval/domain_ppl")), _num(flat.get("eval/general_ppl"))
            state.f1, state.tokens_per_s = _num(flat.get("eval/f1")), _num(flat.get("perf/tokens_per_s"))
            state.mfu = _num(flat.get("perf/mfu"))
            state.report_seconds += _num(flat.get("time_this_iter_s")) if flat.get("time_this_iter_s") else 0.0
            if flat.get("finished"):
                state.status = "finished"
            if self._live is None:
                hps = ", ".join(f"{k.rsplit('.', 1)[-1]}={_short(v)}" for k, v in state.hps.items())
                self.console.print(f"  {self._id(state)} step {state.step or '?':>5}  domain ppl "
                                   f"{_ppl(state.domain_ppl):>8}  general ppl {_ppl(state.general_ppl):>8}"
                                   + (f"  F1 {_f(state.f1, 4)}" if not math.isnan(state.f1) else "")
                                   + f"  {_f(state.tokens_per_s, 0)} tok/s"
                                   + (f"  MFU {100 * state.mfu:.1f}%" if not math.isnan(state.mfu) else "")
                                   + f"  [dim]{escape(hps)}[/]",
                                   soft_wrap=True)  # one line per report, also in an 80-column CI log
            self._refresh(force=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            state = self._state(trial)
            # Tune completes a trial the scheduler stopped just like one that ran out: only our own "finished"
            # flag (set on the last step) tells them apart.
            state.status = "finished" if (trial.last_result or {}).get("finished") else "stopped"
            self._trial_ended(state)

        def on_trial_error(self, iteration, trials, trial, **info):
            state = self._state(trial)
            state.status, state.error = "failed", _last_line(trial.error_file)
            self._trial_ended(state, f" (see {trial.error_file})" if trial.error_file else "")

        def on_step_end(self, iteration, trials, **info):
            self._refresh()

        def on_experiment_end(self, trials, **info):
            self.close()

        def close(self) -> None:
            """Stop the live display, leaving its last frame on screen (safe to call twice)."""
            if self._live is not None:
                self._live.update(self._view(), refresh=True)
                self._live.stop()
                self._live = None

        # -- helpers

        def _state(self, trial) -> TrialProgress:
            if trial.trial_id not in self.trials:
                self.trials[trial.trial_id] = TrialProgress(
                    trial.trial_id, dict((trial.config or {}).get("train_loop_config") or {}))
            return self.trials[trial.trial_id]

        def _id(self, state: TrialProgress) -> str:
            return short_ids(list(self.trials))[state.trial_id]

        def _headline(self) -> tuple[str, str]:
            trials = list(self.trials.values())
            left = seconds_left(trials, self.total, self.max_reports, self.concurrency)
            return progress_headline(trials, self.total, time.time() - self.started, left, self.metric, self.mode)

        def _view(self) -> RenderableType:
            return progress_view(list(self.trials.values()), self._headline())

        def _refresh(self, force: bool = False) -> None:
            # Tune steps many times a second; twice a second is enough to keep the clock moving.
            if self._live is not None and (force or time.time() - self._last_refresh >= 0.5):
                self._live.update(self._view(), refresh=True)
                self._last_refresh = time.time()

        def _trial_ended(self, state: TrialProgress, note: str = "") -> None:
            if self._live is None:
                text = {"finished": f"finished at step {state.step}", "failed": f"failed: {state.error}{note}",
                        "stopped": f"stopped by ASHA at step {state.step}"}[state.status]
                style = {"finished": "green", "failed": "red", "stopped": "dim"}[state.status]
                self.console.print(f"  [{style}]{self._id(state)} {escape(text)}[/]", soft_wrap=True)
                self.console.print(f"  [dim]{escape(' | '.join(self._headline()))}[/]", soft_wrap=True)
            self._refresh(force=True)

    return SweepProgress(console, metric, mode, max_reports, concurrency, live)


# ---------------------------------------------------------------------------------------------------------------
# Ray's own output: into <exp>/ray_output.log, and onto the terminal only with --verbose.


def ray_progress_reporters(log_path: Path, echo: bool):
    """Tune's legacy progress table (every 30 s) and per-result lines, written to `log_path` and, when `echo`,
    printed as Ray normally does. Returns (progress_reporter for RunConfig, callback for RunConfig.callbacks):
    passing our own TrialProgressCallback keeps Tune from adding its default, which prints to stdout."""
    from ray.tune import CLIReporter
    from ray.tune.progress_reporter import TrialProgressCallback

    log_path = str(log_path)
    Path(log_path).write_text("")  # one sweep per file: --force replaces the sweep, so its log too

    def write(msg: str) -> None:
        with open(log_path, "a") as fh:
            fh.write(msg + "\n")
        if echo:
            print(msg, flush=True)

    class FileReporter(CLIReporter):
        def _print(self, msg: str) -> None:
            write(msg)

    class FileTrialLines(TrialProgressCallback):
        def _print(self, msg: str) -> None:
            write(msg)

    return FileReporter(max_report_frequency=30, print_intermediate_tables=True), FileTrialLines()


@contextlib.contextmanager
def ray_logs_to(log_path: Path, echo: bool) -> Iterator[None]:
    """Send Ray Tune's and Train's log records (INFO and up) to `log_path` while the sweep runs; keep them off the
    terminal unless `echo`. Worker output stays in Ray's session logs (/tmp/ray/session_latest/logs)."""
    handler = logging.FileHandler(log_path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    loggers = [logging.getLogger(name) for name in ("ray.tune", "ray.train")]
    saved = [(lg.level, lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
        lg.propagate = echo
    try:
        yield
    finally:
        for lg, (level, propagate) in zip(loggers, saved, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(level)
            lg.propagate = propagate
        handler.close()


# ---------------------------------------------------------------------------------------------------------------
# Experiment tracking: Tune logger callbacks chosen by cfg.report.loggers.


def _require(module: str, pip_name: str, logger: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise InputError(f"report.loggers includes {logger}, but the {pip_name} package is not installed: "
                         f"pip install {pip_name} (or remove {logger} from report.loggers)")


def logger_callbacks(cfg) -> list:
    """Tune logger callbacks for cfg.report.loggers. JSON and CSV are always written (raycpt's analysis and plots
    read result.json / progress.csv); tensorboard, mlflow and wandb as listed. Raises InputError naming the pip
    package when one is missing. Tune's automatic loggers are turned off by the caller, so the list is the truth."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    wanted = list(dict.fromkeys(cfg.report.loggers))
    callbacks: list = [JsonLoggerCallback(), CSVLoggerCallback()]
    if "tensorboard" in wanted:
        _require("tensorboardX", "tensorboardX", "tensorboard")
        from ray.tune.logger import TBXLoggerCallback

        callbacks.append(TBXLoggerCallback())
    if "mlflow" in wanted:
        _require("mlflow", "mlflow", "mlflow")
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        callbacks.append(MLflowLoggerCallback(tracking_uri=cfg.report.mlflow_tracking_uri or None,
                                              experiment_name=cfg.name, save_artifact=False))
    if "wandb" in wanted:
        _require("wandb", "wandb", "wandb")
        from ray.air.integrations.wandb import WandbLoggerCallback

        # The API key comes from WANDB_API_KEY (or `wandb login`), never from the config file.
        callbacks.append(WandbLoggerCallback(project=cfg.report.wandb_project or cfg.name, group=cfg.name))
    return callbacks

