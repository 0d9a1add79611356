"""What people read at the end of a sweep: data and base summaries, the final trials table and winner panel (rich
or markdown), `raycpt report` (table | json | markdown). Live progress is raycpt.results.progress; number
formatting is raycpt.results.format.

The trials table is built once as display rows (`trial_rows`) and rendered to the terminal (rich) or markdown, so
both always show the same thing. `report_json` is the stable machine-readable form; its keys are listed in
`REPORT_SCHEMA`; new keys may appear, and a key that disappears or changes meaning bumps REPORT_SCHEMA_VERSION.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich import box
from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, RenderResult
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from raycpt.core import metrics
from raycpt.core.config import load_saved_config, to_dict
from raycpt.core.errors import InputError
from raycpt.core.eval.harness import main_metrics
from raycpt.core.prepare import Manifest
from raycpt.results.accounting import KEY as COMPUTE_KEY
from raycpt.results.accounting import PREFIX as COMPUTE_PREFIX
from raycpt.results.accounting import describe_compute
from raycpt.results.collect import DISK_BYTES, HP_PREFIX
from raycpt.results.compare import STOP_NOISE, VS_BEST_PREFIX
from raycpt.results.format import (
    as_int,
    distinct_texts,
    duration,
    fixed,
    hp_keys,
    hp_labels,
    hp_order,
    hp_short_labels,
    interval_text,
    num,
    ppl_text,
    relative_change,
    short_ids,
    splitless_label,
    splitless_names,
    tokens_text,
)
from raycpt.results.recommendation import describe_recommendation
from raycpt.results.summary import Summary, analyze

REPORT_SCHEMA_VERSION = 2
"""1 -> 2: the `law` key (the mixing law, fitted on each trial's reports against mix and tokens, ignoring the lr) is
gone; the schedule-aware CPT law behind `recommendation` replaces it."""
INTERVAL_METRICS = (metrics.DOMAIN_PPL, metrics.GENERAL_PPL, metrics.F1)
"""Metrics reported with a 95% bootstrap interval."""
REPORT_SCHEMA = {
    "schema_version": "int: bumped only when a key changes meaning or disappears (2: `law`, the mixing law, "
                      "removed; read `recommendation`)",
    "experiment_dir": "str",
    "complete": "bool: every trial the sweep will run has ended (none running or pending)",
    "counts": "{status: int} over finished | stopped | failed | running | pending | ...; pending includes trials "
              "Tune has not created yet",
    "base": "{domain_ppl, general_ppl, f1, each with _ci_low/_ci_high}: the base model on the validation split, "
            "measured once per sweep (null when not measured)",
    "base_test": "the same for the base model on the test split",
    "selection": "{winner: trial id | null, flagged: bool, reasons: [str], rule: {max_forgetting} | null, "
                 "beats_base: bool | null, verdict: str | null}",
    "test": "the winner on the test split once exported: {test/domain_ppl, test/general_ppl, test/f1, each with "
            "_ci_low/_ci_high, test/lift/<metric> (paired vs the base model) with its interval, ...} | null",
    "test_verdict": "str | null: whether the winner's test F1 lift over the base model is significant, not "
                    "significant, or negative",
    "export": "{path, trial_id} of the exported winner | null",
    "recommendation": "the final run the sweep recommends (raycpt.results.recommendation.sweep_recommendation): "
                      "{source: law | fallback, peak_lr, mix_ratio, schedule, total_steps, target_tokens, reasons, "
                      "predicted_domain_loss, predicted_general_loss (nats, null for a fallback), domain_loss_ci, "
                      "general_loss_ci, extrapolation, flags, fits: {domain, general}} | {error: str} | null",
    "compute": "sweep totals (raycpt.results.accounting): {trials, complete, tokens_trained, tokens_full_budget, "
               "tokens_saved_by_scheduler, tokens_not_run, saved_by_scheduler_fraction, largest_trial_budget, "
               "trial_seconds, resources_per_trial, resource_seconds, resource_seconds_full_budget, "
               "resource_seconds_saved_by_scheduler (estimated): {CPU, GPU}, resource_saved_by_scheduler_fraction, "
               "scheduler} | null; tokens_trained + tokens_saved_by_scheduler + tokens_not_run == tokens_full_budget",
    "disk": "{experiment_bytes, trials_bytes}: the experiment dir on disk, and the part its trials hold "
            "(checkpoints, logs; bounded by the config's checkpoint: policy)",
    "trials": "[trial], best first under the selection rule",
    "downstream": "{metrics: [name], base: {name: value}, base_test: {name: value}} | null: the split-less downstream "
                  "scores the sweep measured, each name with _ci_low/_ci_high (95%): lm-evaluation-harness tasks "
                  "(eval.lm_eval_tasks) as lm_eval/<task>/<metric> (interval: ± 1.96 x lm-eval's standard error) "
                  "and generation (eval.generate_path) as gen/bleu, gen/chrf (sacrebleu, 0-100) and gen/rougeL "
                  "(ROUGE-L F, 0-1) (bootstrap intervals over examples); `base` the base model's, `base_test` the "
                  "same under test/...; every trial and extension has its own `downstream` {name: value}, and the "
                  "winner's on test are in `test` (test/lm_eval/..., test/gen/...)",
    "extensions": "[extension]: the continuations `raycpt extend` wrote into the experiment dir "
                  "(<exp>/extend-<trial>-<tokens>/), by trial and tokens: {trial_id (the trial it continued), "
                  "trial_winner: bool, status (\"extended from <trial_id> (<tokens_before> → <tokens_after> "
                  "tokens)\"), dir, export (its export dir | null: not exported yet), tokens_before, tokens_after, "
                  "steps_before, steps_after, schedule: {schedule, lr, warmup_steps, decay_fraction, decay_shape, "
                  "min_lr_ratio, stable_end_step}, stopped (the forgetting guard's word | null), step, tokens, "
                  "domain_ppl, general_ppl, forgetting, domain_ppl_change, f1, f1_sd, accuracy, domain_ppl_ci_low, "
                  "domain_ppl_ci_high, general_ppl_ci_low, general_ppl_ci_high, f1_ci_low, f1_ci_high (95% bootstrap "
                  "on the validation split, from its export's card), downstream: {lm-eval and generation scores, as "
                  "a trial's}, lift: {paired vs the base model}, vs_trial: "
                  "{paired vs the trial it continued}, test: {test/... on the test split} | null, test_verdict: str "
                  "| null, verified: bool | null (the export reproduced its numbers on reload)}",
    "trial": "{rank, trial_id, winner: bool, status, excluded: str | null, error: str | null, hyperparameters: "
             "{dotted field: value}, step, tokens, time_s, domain_ppl, general_ppl, forgetting (relative change of "
             "general ppl vs base), domain_ppl_change (relative change vs base), f1, f1_sd (only with eval.seeds > 1), "
             "accuracy, domain_ppl_ci_low, domain_ppl_ci_high, general_ppl_ci_low, general_ppl_ci_high, f1_ci_low, "
             "f1_ci_high (95% bootstrap on the validation split), downstream: {lm_eval/<task>/<metric>, gen/bleu, "
             "gen/chrf, gen/rougeL, each with _ci_low/_ci_high: see the top-level `downstream`}, lift: {f1 (absolute), "
             "domain_ppl, general_ppl "
             "(relative), each with _ci_low/_ci_high: paired vs the base model}, vs_best: {the same, paired vs the "
             "winner}, compute: {tokens, tokens_full_budget, tokens_saved_by_scheduler, wall_s, cpu_s, "
             "cpu_s_saved_by_scheduler, and gpu_s, gpu_s_saved_by_scheduler with GPUs}, disk_bytes (its checkpoints "
             "and logs on disk)}",
}
"""The keys of `raycpt report --format json`, documented for people who script against it."""



def print_data(console: Console, manifest: Manifest) -> None:
    for name, corpus in (("domain", manifest.domain), ("general", manifest.general), ("synthetic", manifest.synthetic)):
        if corpus:
            removed = corpus.removed_for_leakage
            console.print(f"[bold]{name:>7}[/]: {corpus.documents:,} documents, {corpus.train_tokens:,} "
                          f"training tokens in {corpus.shards} shard(s), {corpus.heldout_tokens:,} held-out tokens"
                          + (f", {removed} downstream-test text(s) removed" if removed else "")
                          + (f", {corpus.duplicates_removed:,} duplicate(s) removed" if corpus.duplicates_removed
                             else "")
                          + (f" ({corpus.tokens_per_s:,.0f} tokens/s)" if corpus.tokens_per_s else ""))


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
    """base | winner | trial | excluded (by the rule) | failed | extension (`raycpt extend`, below its trial)"""


@dataclass(frozen=True)
class Layout:
    """How much the trials table spells out. The terminal uses the fullest layout that fits its width (LAYOUTS);
    markdown always uses the first."""

    names: str = "field"
    """Hyperparameter names: field (lr=3.1e-4 mix_ratio=0.82) | short (lr=3.1e-4 mix=0.82, a legend below)."""
    status: str = "long"
    """long (stopped by ASHA at step 4) | short (stopped@4 (ASHA))."""
    ci: str = "interval"
    """Confidence intervals, where trials report them: interval (0.7210 [0.690, 0.750]) | half (0.7210 ±0.030) |
    stacked (the ±0.030 on the cell's second line)."""
    extras: bool = True
    """The tokens and time columns."""
    downstream: bool = True
    """The lm-eval and generation columns (`splitless_columns`); dropped, with a note, only when nothing else fits."""


LAYOUTS = (Layout(), Layout("short", "short", "half"), Layout("short", "short", "stacked"),
           Layout("short", "short", "stacked", extras=False))
CI_LOW, CI_HIGH = metrics.CI_LOW, metrics.CI_HIGH
"""Suffixes of a metric's confidence interval in a trial row (eval/f1_ci_low) or the base metrics (base/f1_ci_low)."""
TABLE_INTERVALS = tuple(name + CI_LOW for metric in (metrics.DOMAIN_PPL, metrics.F1)
                        for name in (metric, metrics.base_name(metric)))
"""The intervals the trials table shows (domain ppl and F1, of trials and the base model)."""
HP_HEADERS = {"field": "hyperparameters", "short": "hparams"}


def _status_text(trial: dict[str, Any], excluded: str | None, layout: Layout = LAYOUTS[0]) -> str:
    status = trial.get("status") or "?"
    short = layout.status == "short"
    step = as_int(trial.get(metrics.STEP))
    if status == "stopped":
        noisy = "*" if trial.get(STOP_NOISE) else ""  # not worse beyond noise than a trial that went on
        return f"stopped@{step or '?'} (ASHA){noisy}" if short else f"stopped by ASHA at step {step or '?'}{noisy}"
    if status == "failed":
        width = 30 if short else 60
        reason = " ".join(str(trial.get("error") or "see its error.txt").split())
        return "failed: " + (reason if len(reason) <= width else reason[: width - 1] + "…")
    if status == "running" and step:
        return f"running@{step}" if short else f"running (step {step})"
    if status == "finished" and excluded:
        return f"finished; {excluded.split(':', 1)[0]}"
    return status


def _with_ci(text: str, row: dict[str, Any], name: str, fmt: Any, layout: Layout) -> str:
    """`text` and, when `row` has one, the confidence interval of metric `name`: ' [low, high]' or ' ±half-width'."""
    low, high = num(row.get(name + CI_LOW)), num(row.get(name + CI_HIGH))
    if math.isnan(low) or math.isnan(high) or text == "-":
        return text
    if layout.ci == "interval":
        return f"{text} [{fmt(low)}, {fmt(high)}]"
    return f"{text}{' ' if layout.ci == 'half' else chr(10)}±{fmt((high - low) / 2)}"


def _ppl_ci(value: float) -> str:
    return ppl_text(value).replace(",", "")  # no thousands comma inside '[low, high]'


def _count(value: Any) -> str:
    value = as_int(value)
    return f"{value:,}" if value is not None else "?"


def extension_status(ext: dict[str, Any], trial: str, layout: Layout = LAYOUTS[0]) -> str:
    """'extended from <trial> (<tokens before> → <tokens after> tokens)', and what else its row must say: the
    forgetting guard stopped it, or it has no export yet (its numbers come from the export's card)."""
    short = layout.status == "short"
    tokens = (f"{tokens_text(ext.get('tokens_before'))} → {tokens_text(ext.get('tokens_after'))}" if short
              else f"{_count(ext.get('tokens_before'))} → {_count(ext.get('tokens_after'))}")
    text = f"extended from {trial} ({tokens} tokens)"
    if ext.get("stopped"):
        text += "; stopped (forgetting)" if short else "; stopped by the forgetting guard"
    if not ext.get("export"):
        text += "; not exported" if short else "; not exported yet"
    return text


def _extensions_by_trial(summary: Summary, order: list[str]) -> dict[str | None, list[dict[str, Any]]]:
    """summary.extensions under the trial each continued (None: a trial the summary does not list)."""
    found: dict[str | None, list[dict[str, Any]]] = {}
    for ext in summary.extensions or []:
        found.setdefault(ext.get("trial_id") if ext.get("trial_id") in order else None, []).append(ext)
    return found


def trial_rows(summary: Summary, layout: Layout = LAYOUTS[0]) -> tuple[list[str], list[DisplayRow]]:
    """Headers and rows of the trials table: the base model first, then every trial best first under the rule, each
    followed by its extensions (`raycpt extend`, summary.extensions). Swept hyperparameters share one column
    (`lr=3.08e-4 steps=12`), each value with enough significant digits to tell the trials apart. The F1 column is
    left out when neither the base model nor any trial or extension measured F1."""
    base = summary.base or {}
    trials = {t["trial_id"]: t for t in summary.trials}
    order = _ordered_ids(summary)
    ids = short_ids(order)
    hp_cols = hp_order(hp_keys(summary.trials))
    names = (hp_short_labels if layout.names == "short" else hp_labels)(hp_cols)
    values = {k: dict(zip(order, distinct_texts([trials[tid].get(k) for tid in order]), strict=True))
              for k in hp_cols}
    has_f1 = (base.get(metrics.base_name(metrics.F1)) is not None
              or any(t.get(metrics.F1) is not None for t in trials.values())
              or any((ext.get("metrics") or {}).get(metrics.F1) is not None for ext in summary.extensions or []))
    f1 = ["F1"] if has_f1 else []
    hp_header = [HP_HEADERS[layout.names]] if hp_cols else []
    extras = ["tokens", "time"] if layout.extras else []
    columns = splitless_columns(summary) if layout.downstream else []
    headers = ["", "trial", *hp_header, "status", "domain ppl", "general ppl", *f1,
               *(splitless_label(name)[0] for name in columns), *extras]
    base_general = base.get(metrics.base_name(metrics.GENERAL_PPL))

    def f1_text(row: dict[str, Any], name: str) -> list[str]:
        return [_with_ci(fixed(row.get(name), 4), row, name, lambda v: fixed(v, 3), layout)] if has_f1 else []

    def splitless_text(row: dict[str, Any], prefix: str = "") -> list[str]:
        """The lm-eval and generation columns: each value with its interval, one digit fewer inside it."""
        cells = []
        for name in columns:
            digits = splitless_label(name)[1]
            key = metrics.prefixed(prefix, name) if prefix else name
            cells.append(_with_ci(fixed(row.get(key), digits), row, key, lambda v, d=digits: fixed(v, d - 1),
                                  layout))
        return cells

    def general_text(row: dict[str, Any]) -> str:
        change = relative_change(row.get(metrics.GENERAL_PPL), base_general)
        return ppl_text(row.get(metrics.GENERAL_PPL)) + (f" ({change:+.1%})" if change is not None else "")

    def extension_row(ext: dict[str, Any]) -> DisplayRow:
        """A continuation of trial `ext["trial_id"]`, its numbers from its export's card."""
        tid = ext.get("trial_id")
        got = ext.get("metrics") or {}
        steps = as_int(ext.get("steps_after"))
        return DisplayRow(["", f"↳ {ids.get(tid, tid)}", *([f"steps={steps}" if steps else "-"] if hp_header else []),
                           extension_status(ext, ids.get(tid, tid), layout),
                           _with_ci(ppl_text(got.get(metrics.DOMAIN_PPL)), got, metrics.DOMAIN_PPL, _ppl_ci, layout),
                           general_text(got), *f1_text(got, metrics.F1), *splitless_text(got),
                           *([tokens_text(got.get(metrics.TOKENS) or ext.get("tokens_after")), "-"] if extras
                             else [])], "extension")

    domain = metrics.base_name(metrics.DOMAIN_PPL)
    rows = [DisplayRow(["", "base", *("-" for _ in hp_header), "base model",
                        _with_ci(ppl_text(base.get(domain)), base, domain, _ppl_ci, layout), ppl_text(base_general),
                        *f1_text(base, metrics.base_name(metrics.F1)), *splitless_text(base, metrics.BASE_PREFIX),
                        *(["0", "-"] if extras else [])], "base")]
    excluded = summary.excluded or {}
    extensions = _extensions_by_trial(summary, order)
    for tid in order:
        t = trials[tid]
        general = general_text(t)
        kind = ("winner" if tid == summary.winner else "failed" if t.get("status") == "failed"
                else "excluded" if tid in excluded else "trial")
        hps = " ".join(f"{names[k]}={values[k][tid]}" for k in hp_cols if values[k][tid] != "-") or "-"
        rows.append(DisplayRow(["★" if kind == "winner" else "", ids[tid], *([hps] if hp_header else []),
                                _status_text(t, excluded.get(tid), layout),
                                _with_ci(ppl_text(t.get(metrics.DOMAIN_PPL)), t, metrics.DOMAIN_PPL, _ppl_ci, layout),
                                general, *f1_text(t, metrics.F1), *splitless_text(t),
                                *([tokens_text(t.get(metrics.TOKENS)), duration(t.get("time_total_s"))]
                                  if extras else [])], kind))
        rows += [extension_row(ext) for ext in extensions.get(tid, [])]
    rows += [extension_row(ext) for ext in extensions.get(None, [])]
    return headers, rows


MAX_TASK_COLUMNS = 4
"""lm-eval tasks the trials table gives a column at most (the rest: `raycpt report --format json`)."""


def _lm_eval_tasks(summary: Summary) -> dict[str, str]:
    """{task: its main metric (raycpt.core.eval.harness.main_metrics)} of every lm-eval task the base model, a trial or
    an extension has."""
    rows = [*summary.trials, *((ext.get("metrics") or {}) for ext in summary.extensions or [])]
    return main_metrics(splitless_names(rows) + splitless_names([summary.base or {}], metrics.BASE_PREFIX))


def splitless_columns(summary: Summary) -> list[str]:
    """The lm-eval and generation scores the table shows, one column each: the main metric of each lm-eval task
    that is not a subtask of another (a group's `mmlu_anatomy` under `mmlu`), MAX_TASK_COLUMNS at most, and BLEU
    (json, the summary and the card keep every metric)."""
    tasks = _lm_eval_tasks(summary)
    top = [name for task, name in tasks.items() if not any(task.startswith(other + "_") for other in tasks)]
    rows = [summary.base or {}, *summary.trials, *((ext.get("metrics") or {}) for ext in summary.extensions or [])]
    has_bleu = any(row.get(metrics.GEN_BLEU) is not None or row.get(metrics.base_name(metrics.GEN_BLEU)) is not None
                   for row in rows)
    return [*top[:MAX_TASK_COLUMNS], *([metrics.GEN_BLEU] if has_bleu else [])]


def _ordered_ids(summary: Summary) -> list[str]:
    """summary.order (best first under the rule), then any trial it does not list."""
    ids = [t["trial_id"] for t in summary.trials]
    order = [tid for tid in summary.order or [] if tid in ids]
    return order + sorted(set(ids) - set(order))


def _table_notes(summary: Summary, layout: Layout = LAYOUTS[0]) -> list[str]:
    """The lines under the table: what the ids and (±%) mean, the intervals, the short names, what was left out."""
    ids = [t["trial_id"] for t in summary.trials]
    note = "(±%): general ppl vs the base model; a rise is forgetting"
    if ids and short_ids(ids)[ids[0]] != ids[0]:
        note = f"trial ids are {ids[0].rsplit('_', 1)[0]}_<trial>; " + note
    notes = [note]
    if summary.extensions:
        notes.append("↳: the trial above continued by `raycpt extend` (numbers from its export's card)")
    noisy = {t["trial_id"]: t[STOP_NOISE] for t in summary.trials if t.get(STOP_NOISE)}
    if noisy:
        short = short_ids(ids)
        pairs = "; ".join(f"{short.get(tid, tid)} vs {', '.join(short.get(o, o) for o in others)}"
                          for tid, others in noisy.items())
        notes.append(f"*: stopped inside the noise: on the same validation blocks not worse, beyond the 95% "
                     f"interval, than a trial that went on ({pairs}); more data.heldout_blocks narrow it")
    rows = [summary.base or {}, *summary.trials, *((ext.get("metrics") or {}) for ext in summary.extensions or [])]
    columns = splitless_columns(summary) if layout.downstream else []
    shown = [*TABLE_INTERVALS, *(prefix + name + CI_LOW for name in columns for prefix in ("", metrics.BASE_PREFIX))]
    if any(not math.isnan(num(row.get(name))) for row in rows for name in shown):
        notes.append("[low, high]: confidence interval" if layout.ci == "interval"
                     else "±: half the width of the confidence interval")
    if columns:
        tasks = [splitless_label(name)[0] for name in columns if name.startswith(metrics.LM_EVAL_PREFIX)]
        more = len(_lm_eval_tasks(summary)) - len(tasks)
        notes.append(" and ".join(part for part in (
            f"{', '.join(tasks)}: lm-evaluation-harness (eval.lm_eval_tasks)" if tasks else "",
            "BLEU: greedy generation vs eval.generate_path" if metrics.GEN_BLEU in columns else "")
            if part) + (f"; {more} more lm-eval task(s) and " if more else "; ") + "every score in `raycpt report "
            "--format json`")
    if layout.names == "short":
        keys = hp_order(hp_keys(summary.trials))
        short, long = hp_short_labels(keys), hp_labels(keys)
        legend = [f"{short[k]} = {k[3:]}" for k in keys if short[k] != long[k]]
        if legend:
            notes.append("hyperparameters: " + ", ".join(legend))
    if not layout.extras:
        left_out = "tokens, time and the lm-eval and generation scores" if not layout.downstream and \
            splitless_columns(summary) else "tokens and time"
        notes.append(f"{left_out} are left out at this width: widen the terminal or use `raycpt report "
                     "--format json`")
    return notes


def _wrapped_lines(text: str, width: int) -> int:
    """Lines `text` takes in a column `width` wide, wrapped at spaces (a longer word is folded)."""
    if "\n" in text:
        return sum(_wrapped_lines(part, width) for part in text.split("\n"))
    lines, used = 1, -1
    for word in text.split(" "):
        size = cell_len(word)
        if used >= 0 and used + 1 + size <= width:
            used += 1 + size
            continue
        if used >= 0:
            lines += 1
        lines += max(0, -(-size // width) - 1)
        used = size - (-(-size // width) - 1) * width
    return lines


def _fit(headers: list[str], rows: list[DisplayRow], width: int, *, full_headers: bool, wrap: bool,
         max_lines: int | None) -> list[int] | None:
    """Column widths that fit `width` columns with no cell cut, or None. Every number and id keeps its full width;
    only the hyperparameters and status columns wrap, at spaces, and only when `wrap` (status also wraps a failure
    reason longer than the column). Headers wrap at spaces unless `full_headers`."""
    flexible = {*HP_HEADERS.values(), "status"}
    need, least = [], []
    for i, header in enumerate(headers):
        cells = [row.cells[i] for row in rows]
        if header == "status":  # a failure reason wraps inside the column rather than widening it
            cells = [c if row.kind != "failed" else c[:24] for c, row in zip(cells, rows, strict=True)]
        head = cell_len(header) if full_headers else max(cell_len(w) for w in header.split(" "))
        need.append(max([head, 1, *(cell_len(line) for c in cells for line in c.split("\n"))]))
        words = [cell_len(w) for c in cells for w in c.split()]
        least.append(max([head, 1, *words]) if header in flexible and wrap else need[-1])
    room = width - (2 * len(headers) - 1)  # one column of padding and one of divider per column
    if sum(least) > room:
        return None
    if sum(need) <= room:
        return need
    if not wrap:
        return None
    flex = [i for i, h in enumerate(headers) if h in flexible]
    spare = room - sum(need[i] for i in range(len(headers)) if i not in flex)
    best: tuple[int, list[int]] | None = None
    for status_width in range(need[flex[-1]], least[flex[-1]] - 1, -1):
        widths = list(need)
        widths[flex[-1]] = status_width
        if len(flex) == 2:
            widths[flex[0]] = min(need[flex[0]], spare - status_width)
            if widths[flex[0]] < least[flex[0]]:
                continue
        elif status_width > spare:
            continue
        lines = max(_wrapped_lines(row.cells[i], widths[i]) for row in rows for i in range(len(headers))
                    if row.kind != "failed" or headers[i] != "status")
        if best is None or lines < best[0]:
            best = (lines, widths)
    if best is None or (max_lines is not None and best[0] > max_lines):
        return None
    return best[1]


def _rich_table(headers: list[str], rows: list[DisplayRow], widths: list[int] | None) -> Table:
    table = Table(title="Trials, best first under the selection rule", header_style="bold", box=box.SIMPLE_HEAD,
                  show_edge=False, padding=(0, 1, 0, 0))
    for i, header in enumerate(headers):
        left = i < 2 or header in (*HP_HEADERS.values(), "status")
        table.add_column(header, justify="left" if left else "right", overflow="fold",
                         width=widths[i] if widths else None)
    styles = {"base": "dim", "winner": "bold green", "excluded": "dim", "failed": "red", "trial": None,
              "extension": "cyan"}
    for row in rows:
        table.add_row(*(escape(c) for c in row.cells), style=styles[row.kind])
    return table


class TrialsTable:
    """The trials table as a rich renderable that lays itself out for the width it is printed at: the fullest
    layout that fits (LAYOUTS), hyperparameters and status wrapped at spaces only when needed; no number, id or
    status word is ever cut. The notes (ids, intervals, short names) follow on lines of their own."""

    def __init__(self, summary: Summary) -> None:
        self.summary = summary

    def layout(self, width: int) -> tuple[Layout, list[str], list[DisplayRow], list[int] | None]:
        """(layout, headers, rows, column widths) at `width` columns; widths None: nothing fits, rich decides."""
        full, short, stacked, narrow = LAYOUTS
        fewer = dataclasses.replace(narrow, downstream=False)
        attempts = [(full, True, False, 0), (full, False, False, 0), (short, True, False, 0),
                    (short, False, False, 0), (short, False, True, 2), (stacked, False, True, 2),
                    (narrow, False, False, 0), (narrow, False, True, 2), (fewer, False, False, 0),
                    (fewer, False, True, 2), (narrow, False, True, None)]
        for layout, full_headers, wrap, max_lines in attempts:
            headers, rows = trial_rows(self.summary, layout)
            widths = _fit(headers, rows, width, full_headers=full_headers, wrap=wrap, max_lines=max_lines)
            if widths is not None:
                return layout, headers, rows, widths
        headers, rows = trial_rows(self.summary, narrow)
        return narrow, headers, rows, None

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        layout, headers, rows, widths = self.layout(options.max_width)
        yield _rich_table(headers, rows, widths)
        for note in _table_notes(self.summary, layout):
            yield Text(note, style="dim")


def summary_table(summary: Summary) -> TrialsTable:
    return TrialsTable(summary)


def _load_lines(path: str) -> list[str]:
    """Python that loads the export; the path on a line of its own, so a narrow terminal cannot break the calls."""
    return ["from transformers import AutoModelForCausalLM, AutoTokenizer", f"path = {json.dumps(path)}",
            "model = AutoModelForCausalLM.from_pretrained(path)", "tokenizer = AutoTokenizer.from_pretrained(path)"]


def _signed(digits: int):
    return lambda v: f"{v:+.{digits}f}"


def _digits(digits: int):
    return lambda v: fixed(v, digits)


def _percent(v: float) -> str:
    return f"{v:+.1%}"


def _winner_lines(summary: Summary) -> list[str]:
    """Plain-text lines about the winner (no markup): why it won, how it compares with the base model on the
    validation split (paired 95% intervals), on the test split once exported, and the verdict in plain words."""
    base = summary.base or {}
    w = summary.trial(summary.winner)
    keys = hp_order(hp_keys([w]))  # the values as the table shows them: digits enough to tell trials apart
    shown = {k: distinct_texts([w.get(k), *(t.get(k) for t in summary.trials)])[0] for k in keys}
    hps = ", ".join(f"{label}={shown[key]}" for key, label in hp_labels(keys).items())
    lines = [f"trial {summary.winner}" + (f" ({hps})" if hps else ""), "; ".join(summary.reasons)]
    moves = []
    for name, label, fmt, lift_fmt in ((metrics.DOMAIN_PPL, "domain ppl", ppl_text, _percent),
                                       (metrics.GENERAL_PPL, "general ppl", ppl_text, _percent),
                                       (metrics.F1, "F1", lambda v: fixed(v, 4), _signed(3)),
                                       (metrics.PROMPT_F1, "prompt F1", lambda v: fixed(v, 4), _signed(3))):
        b, v = base.get(metrics.base_name(name)), w.get(name)
        if b is None or v is None:
            continue
        lift = metrics.lift_name(name)
        paired = (f" ({interval_text(w, lift, lift_fmt)})" if w.get(lift) is not None
                  else f" ({relative_change(v, b):+.1%})")
        moves.append(f"{label} {fmt(b)} → {fmt(v)}{paired}")
    for name in splitless_columns(summary):
        b, v = base.get(metrics.base_name(name)), w.get(name)
        if b is not None and v is not None:
            label, digits = splitless_label(name)
            moves.append(f"{label} {fixed(b, digits)} → {fixed(v, digits)}")
    if moves:
        lines.append("validation vs base: " + ", ".join(moves))
    if summary.verdict:
        lines.append("verdict: " + summary.verdict)
    test = summary.test or {}
    if test:
        parts = [f"{label} {interval_text(base, metrics.base_name(metrics.test_name(name)), fmt)} → "
                 f"{interval_text(test, metrics.test_name(name), fmt)}"
                 for name, label, fmt in ((metrics.DOMAIN_PPL, "domain ppl", ppl_text),
                                          (metrics.GENERAL_PPL, "general ppl", ppl_text),
                                          (metrics.F1, "F1", lambda v: fixed(v, 3)),
                                          (metrics.PROMPT_F1, "prompt F1", lambda v: fixed(v, 3)))
                 if test.get(metrics.test_name(name)) is not None]
        for name in splitless_columns(summary):  # the table's; json and the card have every one
            if test.get(metrics.test_name(name)) is None:
                continue
            label, digits = splitless_label(name)
            parts.append(f"{label} {interval_text(base, metrics.base_name(metrics.test_name(name)), _digits(digits))}"
                         f" → {interval_text(test, metrics.test_name(name), _digits(digits))}")
        lines.append("test (base → winner): " + ", ".join(parts))
    if summary.test_verdict:
        lines.append("on test: " + summary.test_verdict)
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
    it. Reads at 80 columns and uses more where it has them (TrialsTable)."""
    console.print(summary_table(summary))
    console.print(winner_panel(summary))
    for line in sweep_lines(summary):
        console.print(escape(line))


def sweep_lines(summary: Summary) -> list[str]:
    """The lines under the winner panel: the recommended final run and the compute accounting (when the summary has
    them)."""
    lines = []
    if summary.recommendation:
        lines.append(f"Final run: {describe_recommendation(summary.recommendation)}")
    if summary.compute:
        lines.append(f"Compute: {describe_compute(summary.compute)}")
    return lines


def summary_markdown(summary: Summary) -> str:
    """The same table and winner block as the terminal, as GitHub markdown for pasting into a PR."""
    headers, rows = trial_rows(summary)

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cells) + " |"

    out = [f"### raycpt sweep `{Path(summary.experiment_dir).name}`", "", line(headers),
           line(["---" if i < 2 or h in (*HP_HEADERS.values(), "status") else "---:" for i, h in enumerate(headers)])]
    for row in rows:
        cells = [cell(c) for c in row.cells]
        if row.kind == "winner":
            cells = [f"**{c}**" if c and c != "-" else c for c in cells]
        elif row.kind == "base":
            cells = [f"_{c}_" if c and c != "-" else c for c in cells]
        out.append(line(cells))
    out += ["", "; ".join(_table_notes(summary)), ""]
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

    def scores(row: dict[str, Any]) -> dict[str, Any]:
        """The held-out numbers a trial row and an extension row share."""
        return {
            "domain_ppl": clean(row.get(metrics.DOMAIN_PPL)), "general_ppl": clean(row.get(metrics.GENERAL_PPL)),
            "forgetting": relative_change(row.get(metrics.GENERAL_PPL), base_general),
            "domain_ppl_change": relative_change(row.get(metrics.DOMAIN_PPL),
                                                 base.get(metrics.base_name(metrics.DOMAIN_PPL))),
            "f1": clean(row.get(metrics.F1)), "f1_sd": clean(row.get(metrics.F1_SD)),
            "accuracy": clean(row.get(metrics.ACCURACY)),
            **{metrics.short_name(name) + suffix: clean(row.get(name + suffix)) for name in INTERVAL_METRICS
               for suffix in (metrics.CI_LOW, metrics.CI_HIGH)},
            "downstream": splitless(row),
        }

    def splitless(row: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        """The lm-eval and generation scores of a row under `prefix`, named without it, with their intervals."""
        return {name + suffix: clean(row.get(prefix + name + suffix)) for name in splitless_names([row], prefix)
                for suffix in ("", metrics.CI_LOW, metrics.CI_HIGH) if row.get(prefix + name + suffix) is not None}

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
            **scores(t),
            "lift": {k.removeprefix(metrics.LIFT_PREFIX): clean(v) for k, v in t.items()
                     if k.startswith(metrics.LIFT_PREFIX)},
            "vs_best": {k.removeprefix(VS_BEST_PREFIX): clean(v) for k, v in t.items()
                        if k.startswith(VS_BEST_PREFIX)},
        })
    extensions = []
    for ext in summary.extensions or []:  # in the table's order: under their trial's rank
        got = ext.get("metrics") or {}
        extensions.append({
            "trial_id": ext.get("trial_id"), "trial_winner": ext.get("trial_id") == summary.winner,
            "status": extension_status(ext, ext.get("trial_id")), "dir": ext.get("dir"), "export": ext.get("export"),
            **{k: ext.get(k) for k in ("tokens_before", "tokens_after", "steps_before", "steps_after", "schedule",
                                       "stopped")},
            "step": as_int(got.get(metrics.STEP)), "tokens": as_int(got.get(metrics.TOKENS)),
            **scores(got),
            "lift": {k.removeprefix(metrics.LIFT_PREFIX): clean(v) for k, v in (ext.get("lift") or {}).items()},
            "vs_trial": {k: clean(v) for k, v in (ext.get("vs_trial") or {}).items()},
            "test": {k: clean(v) for k, v in (ext.get("test") or {}).items()
                     if not isinstance(v, (list, dict))} or None,
            "test_verdict": ext.get("test_verdict") or None, "verified": ext.get("verified"),
        })
    rank = {tid: i for i, tid in enumerate(order)}
    extensions.sort(key=lambda ext: (rank.get(ext["trial_id"], len(order)), ext["tokens_after"] or 0))
    for row in rows:  # the trial's compute accounting (raycpt.results.accounting)
        row["compute"] = {k.removeprefix(COMPUTE_PREFIX): clean(v) for k, v in trials[row["trial_id"]].items()
                          if k.startswith(COMPUTE_PREFIX)}
        row["disk_bytes"] = as_int(trials[row["trial_id"]].get(DISK_BYTES))
    counts: dict[str, int] = {}
    for t in trials.values():
        counts[t.get("status") or "unknown"] = counts.get(t.get("status") or "unknown", 0) + 1
    if expected is not None and expected > len(trials):
        counts["pending"] = counts.get("pending", 0) + expected - len(trials)
    export = summary.export
    measured = splitless_names([*trials.values(), *((ext.get("metrics") or {}) for ext in summary.extensions or [])])
    measured += [n for n in splitless_names([base], metrics.BASE_PREFIX) if n not in measured]
    downstream = {"metrics": measured, "base": splitless(base, metrics.BASE_PREFIX),
                  "base_test": splitless(base, metrics.base_name(metrics.TEST_PREFIX))} if measured else {}
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "experiment_dir": summary.experiment_dir,
        "complete": bool(trials) and not any(s in counts for s in ("running", "pending", "paused")),
        "counts": counts,
        "base": {metrics.short_name(name) + suffix: clean(base.get(metrics.base_name(name) + suffix))
                 for name in INTERVAL_METRICS for suffix in ("", metrics.CI_LOW, metrics.CI_HIGH)},
        "base_test": {metrics.short_name(name) + suffix: clean(base.get(metrics.base_name(metrics.test_name(name))
                                                                          + suffix))
                      for name in INTERVAL_METRICS for suffix in ("", metrics.CI_LOW, metrics.CI_HIGH)},
        "selection": {"winner": summary.winner, "flagged": bool(summary.flagged),
                      "reasons": list(summary.reasons or []), "rule": rule, "beats_base": summary.beats_base,
                      "verdict": summary.verdict or None},
        "test": {k: clean(v) for k, v in (summary.test or {}).items() if not isinstance(v, (list, dict))} or None,
        "test_verdict": summary.test_verdict or None,
        "export": {"path": export, "trial_id": summary.winner} if export else None,
        "disk": {"experiment_bytes": summary.experiment_dir_bytes,
                 "trials_bytes": sum(row["disk_bytes"] or 0 for row in rows)},
        "trials": rows,
        "downstream": downstream or None,
        "extensions": extensions,
        "recommendation": summary.recommendation or None,
        "compute": {k.removeprefix(COMPUTE_KEY): v for k, v in summary.compute.items()} or None,
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
        print("".join(f"\n{line}\n" for line in sweep_lines(summary)), end="")
    else:
        if progress:
            console.print(f"[yellow]{escape(progress)}[/]")
        print_summary(console, summary)
    return 0
