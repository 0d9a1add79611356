"""raycpt's Tune callback: the live sweep view. It only moves Tune's events into raycpt.results.progress, which
renders them."""

from __future__ import annotations

import math
import time
from typing import Any

from ray.tune import Callback
from rich.console import Console, RenderableType
from rich.live import Live
from rich.markup import escape

from raycpt.core import metrics
from raycpt.results.collect import flatten_result, last_error_line
from raycpt.results.format import fixed, make_console, num, ppl_text, short_ids, short_value
from raycpt.results.progress import (
    TrialProgress,
    progress_headline,
    progress_view,
    seconds_left,
)


class SweepProgress(Callback):
    """Shows the sweep as it runs: a rich live table (trials by status, latest step and ppl, the best so far,
    elapsed time, an upper bound on what is left) on a terminal; one plain line per report and per trial end when
    stdout is not a terminal (CI, logs) or `live` is False. Call `.close()` after fit().

    The Tuner pickles its callbacks: the console and the Live display are left out and rebuilt on first use."""

    def __init__(self, console: Console, *, metric: str, mode: str, max_reports: int, concurrency: int,
                 live: bool = True) -> None:
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
            # No auto-refresh thread: it would read the trial table while Tune's loop changes it.
            self._live = Live(self._view(), console=self.console, auto_refresh=False, transient=False)
            self._live.start()

    def on_trial_start(self, iteration, trials, trial, **info):
        self._state(trial).status = "running"
        self._refresh(force=True)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        state, flat = self._state(trial), flatten_result(result)
        # A trial that ends before ASHA's max_t returns its last metrics, which Tune reports again (a new
        # training_iteration, the same step and training time): shown and counted once. A step trained again
        # after a restart has another training time, so it is a new report.
        report = (flat.get(metrics.STEP), flat.get(metrics.TRAIN_TIME_S))
        if report == state.last_report and report[0] is not None:
            return
        state.last_report = report
        state.status, state.reports = "running", state.reports + 1
        state.step = flat.get(metrics.STEP, state.step)
        state.metric = num(flat.get(self.metric))
        state.domain_ppl, state.general_ppl = num(flat.get(metrics.DOMAIN_PPL)), num(flat.get(metrics.GENERAL_PPL))
        state.f1, state.tokens_per_s = num(flat.get(metrics.F1)), num(flat.get(metrics.TOKENS_PER_S))
        state.mfu = num(flat.get(metrics.MFU))
        state.report_seconds += num(flat.get("time_this_iter_s")) if flat.get("time_this_iter_s") else 0.0
        if flat.get(metrics.FINISHED):
            state.status = "finished"
        if self._live is None:
            hps = ", ".join(f"{k.rsplit('.', 1)[-1]}={short_value(v)}" for k, v in state.hps.items())
            self.console.print(f"  {self._id(state)} step {state.step or '?':>5}  domain ppl "
                               f"{ppl_text(state.domain_ppl):>8}  general ppl {ppl_text(state.general_ppl):>8}"
                               + (f"  F1 {fixed(state.f1, 4)}" if not math.isnan(state.f1) else "")
                               + f"  {fixed(state.tokens_per_s, 0)} tok/s"
                               + (f"  MFU {100 * state.mfu:.1f}%" if not math.isnan(state.mfu) else "")
                               + f"  [dim]{escape(hps)}[/]",
                               soft_wrap=True)  # one line per report, also in an 80-column CI log
        self._refresh(force=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        state = self._state(trial)
        # Tune completes a trial the scheduler stopped just like one that ran out: only our own "finished"
        # flag (set on the last step) tells them apart.
        state.status = "finished" if (trial.last_result or {}).get(metrics.FINISHED) else "stopped"
        self._trial_ended(state)

    def on_trial_error(self, iteration, trials, trial, **info):
        state = self._state(trial)
        state.status, state.error = "failed", last_error_line(trial.error_file)
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

