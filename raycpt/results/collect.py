"""Read a sweep's trials from disk (Tune's experiment state), one row per trial: status, sampled hyperparameters,
last metrics, checkpoint, error line. Works on finished, interrupted and running sweeps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from raycpt.core import metrics
from raycpt.core.errors import InputError

ERROR_LINE_CHARS = 200
"""A failed trial's last error line is cut here: enough for the exception and its message."""
HP_PREFIX = "hp/"
"""Trial-row columns of sampled hyperparameters: 'hp/train.lr'."""
TUNE_DIR = "tune"


def last_error_line(path: str | Path | None) -> str:
    """The last non-empty line of an error file (Tune's error.txt), cut to ERROR_LINE_CHARS."""
    if not path or not Path(path).exists():
        return "see its error.txt"
    lines = [ln.strip() for ln in Path(path).read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1][:ERROR_LINE_CHARS] if lines else "failed"


def flatten_result(result: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Tune may nest metrics whose names hold '/'; flatten them back to 'a/b/c'."""
    flat: dict[str, Any] = {}
    for key, value in result.items():
        if isinstance(value, dict) and key != "config":
            flat.update(flatten_result(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def trial_status(tune_status: str, last: dict[str, Any]) -> str:
    """finished | stopped (by the scheduler) | failed | running | pending | ... from Tune's status and the last
    report (Tune completes a trial ASHA stopped just like one that ran out: only our `finished` flag tells)."""
    if tune_status == "ERROR":
        return "failed"
    if last.get(metrics.FINISHED):
        return "finished"
    if tune_status == "TERMINATED" and last.get(metrics.STEP):
        return "stopped"
    if tune_status in ("RUNNING", "PENDING") and last.get(metrics.STEP):
        return "running"  # a live (or interrupted) sweep: Tune reloads running trials as PENDING
    return tune_status.lower()


def collect_trials(exp_dir: Path) -> pd.DataFrame:
    """One row per trial: id, status, sampled hyperparameters (`hp/...`), last metrics, checkpoint path, error."""
    from ray.tune import ExperimentAnalysis  # Ray deferred on purpose: results import no Ray at module level

    tune_dir = Path(exp_dir).resolve() / TUNE_DIR  # Tune needs an absolute path (a URI)
    if not tune_dir.exists():
        raise InputError(f"{exp_dir}: no sweep found (expected {tune_dir}); run `raycpt sweep CONFIG` first")
    analysis = ExperimentAnalysis(str(tune_dir))
    rows = []
    for trial in analysis.trials:
        last = trial.last_result or {}
        status = trial_status(trial.status, last)
        row = {"trial_id": trial.trial_id, "status": status, "path": trial.path,
               "error": last_error_line(Path(trial.path) / "error.txt") if status == "failed" else "",
               "reports": last.get("training_iteration", 0)}
        row.update({f"{HP_PREFIX}{k}": v for k, v in (trial.config.get("train_loop_config") or {}).items()})
        row.update({key: last.get(key) for key in (*metrics.FINAL, "time_total_s")})
        if not row[metrics.CHECKPOINT_PATH] and trial.checkpoint:  # a one-worker trial: its latest, via Tune
            row[metrics.CHECKPOINT_PATH] = trial.checkpoint.path
        row.update({k: v for k, v in flatten_result(last).items() if k.startswith(metrics.F1_CLASS_PREFIX)})
        rows.append(row)
    return pd.DataFrame(rows)
