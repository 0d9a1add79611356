"""The live view of a running sweep, as plain data and rich renderables (no Ray): what each trial is doing, the
best so far, and an upper bound on the time left. raycpt.edge.callbacks feeds it from Tune's hooks."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Group, RenderableType
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from raycpt.results.format import duration, fixed, hp_labels, ppl_text, short_ids, short_value


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
    last_report: tuple[Any, Any] | None = None
    """(step, training seconds) of its last report: Tune hands a trainable's return value over as one more result,
    which repeats the last report; that one is not shown or counted again."""
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
    best_text = f"best {metric} {ppl_text(best.metric)} ({ids[best.trial_id]})" if best else "best: none yet"
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
        table.add_row(ids[t.trial_id], *(short_value(t.hps.get(k)) for k in hp_names), escape(status),
                      str(t.step or "-"), ppl_text(t.domain_ppl), ppl_text(t.general_ppl), fixed(t.f1, 4),
                      fixed(t.tokens_per_s, 0), style=styles.get(t.status))
    return Group(Text("\n".join(headline)), table)


class PrepareProgress:
    """A rich progress bar over the data step: per corpus, input MB done of all, documents, tokens and MB/s, fed by
    `prepare_experiment(on_unit=...)` as each read unit finishes (in-process or on Ray Data)."""

    def __init__(self, console) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[stats]}"),
                                 TimeElapsedColumn(), console=console, transient=False)
        self.tasks: dict[str, Any] = {}
        self.totals: dict[str, list[float]] = {}

    def __enter__(self) -> PrepareProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def __call__(self, field: str, result: Any, input_bytes: int) -> None:
        if result is None:  # the corpus starts
            self.tasks[field] = self.progress.add_task(field, total=max(1, input_bytes), stats="")
            self.totals[field] = [0, 0, 0, time.perf_counter()]
            return
        done = self.totals[field]
        done[0] += result.bytes
        done[1] += result.documents
        done[2] += result.tokens
        rate = done[0] / 2**20 / max(1e-9, time.perf_counter() - done[3])
        self.progress.update(self.tasks[field], completed=done[0],
                             stats=f"{done[1]:,} docs, {done[2]:,} tokens, {rate:.1f} MB/s")


class AugmentProgress:
    """A rich progress bar over `raycpt augment`: units done of all, texts written, tokens generated and tokens/s,
    fed by `augment_corpus(on_unit=...)` as each unit finishes (units finished by an earlier run count at once)."""

    def __init__(self, console) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), console=console,
                                 transient=False)
        self.task: Any = None
        self.done = [0, 0, 0]  # units, texts, tokens
        self.generated, self.started = 0, time.perf_counter()

    def __enter__(self) -> AugmentProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def __call__(self, result: Any, units: int, resumed: bool = False) -> None:
        if result is None:  # the job starts
            self.task = self.progress.add_task("augment units", total=max(1, units), stats="")
            self.started = time.perf_counter()
            return
        self.done[0] += 1
        self.done[1] += result.texts
        self.done[2] += result.tokens
        self.generated += 0 if resumed else result.tokens
        rate = self.generated / max(1e-9, time.perf_counter() - self.started)
        self.progress.update(self.task, completed=self.done[0],
                             stats=f"{self.done[1]:,} texts, {self.done[2]:,} tokens, {rate:,.0f} tokens/s")
