"""What people read at the end of a sweep: data and base summaries, the final trials table and winner panel (rich
or markdown), `raycpt report` (table | json | markdown). Live progress is raycpt.results.progress; number
formatting is raycpt.results.format.

The trials table is built once as display rows (`trial_rows`) and rendered to the terminal (rich) or markdown, so
both always show the same thing. `report_json` is the stable machine-readable form; its keys are listed in
`REPORT_SCHEMA` and only ever gain new ones.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from raycpt.core import metrics
from raycpt.core.config import load_saved_config, to_dict
from raycpt.core.errors import InputError
from raycpt.core.prepare import Manifest
from raycpt.results.collect import HP_PREFIX
from raycpt.results.format import (
    as_int,
    duration,
    fixed,
    hp_keys,
    hp_labels,
    ppl_text,
    relative_change,
    short_ids,
    short_value,
    tokens_text,
)
from raycpt.results.summary import Summary, analyze

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



def print_data(console: Console, manifest: Manifest) -> None:
    for name, corpus in (("domain", manifest.domain), ("general", manifest.general)):
        if corpus:
            removed = corpus.removed_for_leakage
            console.print(f"[bold]{name:>7}[/]: {corpus.documents:,} documents, {corpus.train_tokens:,} "
                          f"training tokens, {corpus.heldout_tokens:,} held-out tokens"
                          + (f", {removed} downstream-test text(s) removed" if removed else ""))


def print_base(console: Console, base: dict[str, Any]) -> None:
    f1 = base.get(metrics.base_name(metrics.F1))
    console.print(f"[bold]   base[/]: domain ppl {fixed(base.get(metrics.base_name(metrics.DOMAIN_PPL)))}, general "
                  f"ppl {fixed(base.get(metrics.base_name(metrics.GENERAL_PPL)))}"
                  + (f", F1 {fixed(f1, 4)}" if f1 is not None else ""))



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
        return f"stopped by ASHA at step {as_int(trial.get(metrics.STEP)) or '?'}"
    if status == "failed":
        reason = " ".join(str(trial.get("error") or "see its error.txt").split())
        return "failed: " + (reason if len(reason) <= width else reason[: width - 1] + "…")
    if status == "running" and as_int(trial.get(metrics.STEP)):
        return f"running (step {as_int(trial['step'])})"
    if status == "finished" and excluded:
        return f"finished; {excluded.split(':', 1)[0]}"
    return status


def trial_rows(summary: Summary) -> tuple[list[str], list[DisplayRow]]:
    """Headers and rows of the trials table: the base model first, then every trial best first under the rule.
    The F1 column is left out when neither the base model nor any trial measured F1."""
    base = summary.base or {}
    trials = {t["trial_id"]: t for t in summary.trials}
    order = _ordered_ids(summary)
    ids = short_ids(order)
    hp_cols = hp_keys(summary.trials)
    labels = hp_labels(hp_cols)
    has_f1 = (base.get(metrics.base_name(metrics.F1)) is not None
              or any(t.get(metrics.F1) is not None for t in trials.values()))
    f1 = ["F1"] if has_f1 else []
    headers = ["", "trial", *(labels[k] for k in hp_cols), "status", "domain ppl", "general ppl", *f1,
               "tokens", "time"]
    base_general = base.get(metrics.base_name(metrics.GENERAL_PPL))
    base_f1 = [fixed(base.get(metrics.base_name(metrics.F1)), 4)] if has_f1 else []
    rows = [DisplayRow(["", "base", *("-" for _ in hp_cols), "base model",
                        ppl_text(base.get(metrics.base_name(metrics.DOMAIN_PPL))), ppl_text(base_general), *base_f1,
                        "0", "-"], "base")]
    excluded = summary.excluded or {}
    for tid in order:
        t = trials[tid]
        change = relative_change(t.get(metrics.GENERAL_PPL), base_general)
        general = ppl_text(t.get(metrics.GENERAL_PPL)) + (f" ({change:+.1%})" if change is not None else "")
        kind = ("winner" if tid == summary.winner else "failed" if t.get("status") == "failed"
                else "excluded" if tid in excluded else "trial")
        rows.append(DisplayRow(["★" if kind == "winner" else "", ids[tid], *(short_value(t.get(k)) for k in hp_cols),
                                _status_text(t, excluded.get(tid)), ppl_text(t.get(metrics.DOMAIN_PPL)), general,
                                *([fixed(t.get(metrics.F1), 4)] if has_f1 else []), tokens_text(t.get(metrics.TOKENS)),
                                duration(t.get("time_total_s"))], kind))
    return headers, rows


def _ordered_ids(summary: Summary) -> list[str]:
    """summary.order (best first under the rule), then any trial it does not list."""
    ids = [t["trial_id"] for t in summary.trials]
    order = [tid for tid in summary.order or [] if tid in ids]
    return order + sorted(set(ids) - set(order))


def _table_note(summary: Summary) -> str:
    ids = [t["trial_id"] for t in summary.trials]
    note = "(±%): general ppl vs the base model; a rise is forgetting"
    if ids and short_ids(ids)[ids[0]] != ids[0]:
        note = f"trial ids are {ids[0].rsplit('_', 1)[0]}_<trial>; " + note
    return note


def summary_table(summary: Summary) -> Table:
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


def _winner_lines(summary: Summary) -> list[str]:
    """Plain-text lines about the winner (no markup): why it won, how it moved against the base model."""
    base = summary.base or {}
    trials = {t["trial_id"]: t for t in summary.trials}
    w = trials[summary.winner]
    hps = ", ".join(f"{label}={short_value(w.get(key))}" for key, label in hp_labels(hp_keys([w])).items())
    lines = [f"trial {summary.winner}" + (f" ({hps})" if hps else ""), "; ".join(summary.reasons)]
    moves = []
    for key, label, fmt in (("domain_ppl", "domain ppl", ppl_text), ("general_ppl", "general ppl", ppl_text),
                            ("f1", "F1", lambda v: fixed(v, 4))):
        b, v = base.get(f"base/{key}"), w.get(f"eval/{key}")
        change = relative_change(v, b)
        if change is not None:
            moves.append(f"{label} {fmt(b)} → {fmt(v)} ({change:+.1%})")
    if moves:
        lines.append("vs base: " + ", ".join(moves))
    return lines


def winner_panel(summary: Summary) -> Panel:
    if summary.winner is None:
        return Panel(escape("; ".join(summary.reasons or ["no trial reported yet"])), title="No winner",
                     border_style="red", expand=False)
    lines = [escape(line) for line in _winner_lines(summary)]
    if summary.flagged:
        lines[1] = "[yellow]FLAGGED:[/] " + lines[1]
    export = summary.export
    if export:
        ver = summary.verification or {}
        reloaded = ver.get("reloaded_domain_ppl")
        lines += ["", f"[bold]Exported to[/] {escape(export)}"
                  + (f" (reloaded domain ppl {fixed(reloaded, 3)})" if reloaded is not None else ""),
                  "Load it:", *(f"  [cyan]{escape(line)}[/]" for line in _load_lines(export))]
    else:
        lines += ["", f"Not exported yet: [bold]raycpt analyze {escape(summary.experiment_dir)} --export[/]"]
    return Panel("\n".join(lines), title=f"Winner: {summary.winner}", border_style="green", expand=False)


def print_summary(console: Console, summary: Summary) -> None:
    """The final table (base model first, winner starred) and a panel with the winner, its export and how to load
    it. Fits 100 columns: ids are shortened and long failure reasons wrap inside the status column."""
    console.print(summary_table(summary))
    console.print(winner_panel(summary))


def summary_markdown(summary: Summary) -> str:
    """The same table and winner block as the terminal, as GitHub markdown for pasting into a PR."""
    headers, rows = trial_rows(summary)

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cells) + " |"

    out = [f"### raycpt sweep `{Path(summary.experiment_dir).name}`", "", line(headers),
           line(["---" if i < 2 or h == "status" else "---:" for i, h in enumerate(headers)])]
    for row in rows:
        cells = [cell(c) for c in row.cells]
        if row.kind == "winner":
            cells = [f"**{c}**" if c and c != "-" else c for c in cells]
        elif row.kind == "base":
            cells = [f"_{c}_" if c and c != "-" else c for c in cells]
        out.append(line(cells))
    out += ["", _table_note(summary), ""]
    if summary.winner is None:
        out.append("**No winner:** " + "; ".join(summary.reasons or ["no trial reported yet"]))
        return "\n".join(out) + "\n"
    first, why, *moves = _winner_lines(summary)
    out.append(f"**Winner:** {first}{' (FLAGGED)' if summary.flagged else ''}. {why}.")
    out += [f"{m}." for m in moves]
    if summary.export:
        out += ["", f"Exported to `{summary.export}`:", "", "```python", *_load_lines(summary.export), "```"]
    return "\n".join(out) + "\n"


def expected_trials(search: dict[str, Any]) -> int:
    """Trials a sweep will run: num_samples x the size of every grid (Tune creates them lazily, so a running
    sweep's state on disk does not list them all yet)."""
    total = int(search.get("num_samples") or 1)
    for spec in (search.get("space") or {}).values():
        if "grid" in spec:
            total *= len(spec["grid"])
    return total


def report_json(summary: Summary, rule: dict[str, Any] | None = None,
                expected: int | None = None) -> dict[str, Any]:
    """The summary in the stable shape documented by REPORT_SCHEMA (metric names without their 'eval/' prefixes).
    `expected`: trials the sweep will run in all; those not created yet count as pending."""
    base = summary.base or {}
    trials = {t["trial_id"]: t for t in summary.trials}
    order = _ordered_ids(summary)
    excluded = summary.excluded or {}
    base_general = base.get(metrics.base_name(metrics.GENERAL_PPL))

    def clean(value: Any) -> Any:
        return None if isinstance(value, float) and math.isnan(value) else value

    rows = []
    for rank, tid in enumerate(order, 1):
        t = trials[tid]
        rows.append({
            "rank": rank, "trial_id": tid, "winner": tid == summary.winner, "status": t.get("status"),
            "excluded": excluded.get(tid), "error": t.get("error") or None,
            "hyperparameters": {k.removeprefix(HP_PREFIX): clean(v) for k, v in t.items()
                                if k.startswith(HP_PREFIX)},
            "step": as_int(t.get(metrics.STEP)), "tokens": as_int(t.get(metrics.TOKENS)),
            "time_s": clean(t.get("time_total_s")),
            "domain_ppl": clean(t.get(metrics.DOMAIN_PPL)), "general_ppl": clean(t.get(metrics.GENERAL_PPL)),
            "forgetting": relative_change(t.get(metrics.GENERAL_PPL), base_general),
            "domain_ppl_change": relative_change(t.get(metrics.DOMAIN_PPL),
                                                 base.get(metrics.base_name(metrics.DOMAIN_PPL))),
            "f1": clean(t.get(metrics.F1)), "f1_sd": clean(t.get(metrics.F1_SD)),
            "accuracy": clean(t.get(metrics.ACCURACY)),
        })
    counts: dict[str, int] = {}
    for t in trials.values():
        counts[t.get("status") or "unknown"] = counts.get(t.get("status") or "unknown", 0) + 1
    if expected is not None and expected > len(trials):
        counts["pending"] = counts.get("pending", 0) + expected - len(trials)
    export = summary.export
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "experiment_dir": summary.experiment_dir,
        "complete": bool(trials) and not any(s in counts for s in ("running", "pending", "paused")),
        "counts": counts,
        "base": {k: clean(base.get(f"base/{k}")) for k in ("domain_ppl", "general_ppl", "f1")},
        "selection": {"winner": summary.winner, "flagged": bool(summary.flagged),
                      "reasons": list(summary.reasons or []), "rule": rule},
        "export": {"path": export, "trial_id": summary.winner} if export else None,
        "trials": rows,
    }


def report_command(exp_dir: Path, fmt: str, console: Console, overrides: list[str] | None = None) -> int:
    """`raycpt report EXPERIMENT_DIR --format table|json|markdown`: the summary of a finished or running sweep,
    read from disk. Never exports and needs no running Ray. Returns the exit code."""
    exp_dir = Path(exp_dir)
    if fmt not in ("table", "json", "markdown"):
        raise InputError(f"--format {fmt!r}: use table, json or markdown")
    cfg = load_saved_config(exp_dir, overrides)
    try:
        summary = analyze(exp_dir, cfg, export=False)
    except ValueError as err:  # Tune has not written its first experiment state yet
        raise InputError(f"{exp_dir}: no trial state on disk yet ({str(err).splitlines()[0]}); try again in a "
                         "few seconds") from err
    for trial in summary.trials:
        # Tune snapshots running trials as PENDING (so a restored sweep restarts them): one that has reported is
        # running.
        if trial["status"] == "pending" and trial.get("reports"):
            trial["status"] = "running"
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
