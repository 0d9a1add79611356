"""The live sweep view fed as Tune feeds it: a trial that finishes before ASHA's max_t returns its last metrics from
the trainable, and Tune reports a function trainable's return value as one more result (the last report again,
with a new training_iteration). The view shows each report once."""

from __future__ import annotations

import io
from types import SimpleNamespace

from rich.console import Console

from raycpt.core import metrics
from raycpt.edge import callbacks


def trial(trial_id: str) -> SimpleNamespace:
    return SimpleNamespace(trial_id=trial_id, config={"train_loop_config": {"train.lr": 1e-3}}, last_result={},
                           error_file=None)


def report(step: int, ppl: float, train_s: float, *, finished: bool = False, iteration: int = 1) -> dict:
    """What Tune hands on_trial_result: the loop's metrics plus Tune's own per-result fields."""
    return {metrics.STEP: step, metrics.DOMAIN_PPL: ppl, metrics.GENERAL_PPL: ppl + 5, metrics.TOKENS_PER_S: 300.0,
            metrics.TRAIN_TIME_S: train_s, metrics.FINISHED: finished, **({metrics.F1: 0.71} if finished else {}),
            "time_this_iter_s": 10.0, "training_iteration": iteration}


def plain_view() -> tuple[callbacks.SweepProgress, io.StringIO]:
    out = io.StringIO()
    view = callbacks.SweepProgress(Console(file=out, width=200, highlight=False), metric=metrics.DOMAIN_PPL,
                                   mode="min", max_reports=3, concurrency=1)
    view.setup(total_num_samples=1)
    return view, out


def test_a_finished_trials_last_report_is_shown_once():
    view, out = plain_view()
    a = trial("ab12_00000")
    view.on_trial_start(iteration=0, trials=[], trial=a)
    view.on_trial_result(iteration=1, trials=[], trial=a, result=report(4, 60.0, 4.0))
    last = report(8, 50.0, 8.0, finished=True, iteration=2)
    view.on_trial_result(iteration=2, trials=[], trial=a, result=last)
    # the trainable returned its last metrics: Tune reports them again, one iteration later, a moment after
    view.on_trial_result(iteration=3, trials=[], trial=a, result={**last, "training_iteration": 3,
                                                                   "time_this_iter_s": 0.01})
    a.last_result = {**last, "training_iteration": 3}
    view.on_trial_complete(iteration=4, trials=[], trial=a)
    lines = out.getvalue().splitlines()
    step_lines = [line for line in lines if " step " in line and "domain ppl" in line]
    assert len(step_lines) == 2, lines  # step 4, step 8: once each
    assert "F1 0.7100" in step_lines[-1]
    assert sum("finished at step 8" in line for line in lines) == 1
    state = view.trials["ab12_00000"]
    # the repeat is not a report: the time-left estimate counts two reports of 10 s each
    assert (state.reports, state.report_seconds, state.status) == (2, 20.0, "finished")


def test_a_step_reported_again_after_a_restart_is_shown():
    """A trial restarted from an older checkpoint trains the same step again: a new report (other numbers, other
    training time), not Tune's repeat."""
    view, out = plain_view()
    a = trial("ab12_00000")
    view.on_trial_start(iteration=0, trials=[], trial=a)
    view.on_trial_result(iteration=1, trials=[], trial=a, result=report(4, 60.0, 4.0))
    view.on_trial_result(iteration=2, trials=[], trial=a, result=report(4, 60.5, 6.5, iteration=1))
    assert sum(" step " in line for line in out.getvalue().splitlines()) == 2
    assert view.trials["ab12_00000"].domain_ppl == 60.5
