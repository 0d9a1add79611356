"""Read a sweep's trials from disk (Tune's experiment state), one row per trial: status, sampled hyperparameters,
last metrics, checkpoint, error line. Works on finished, interrupted and running sweeps."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from raycpt.core import metrics
from raycpt.core.errors import InputError
from raycpt.core.train.checkpoint import has_weights

ERROR_LINE_CHARS = 200
"""A failed trial's last error line is cut here: enough for the exception and its message."""
HP_PREFIX = "hp/"
"""Trial-row columns of sampled hyperparameters: 'hp/train.lr'."""
TUNE_DIR = "tune"
TRIALS_DIR = "trials"
"""Ray Train runs of multi-worker trials inside the experiment dir (raycpt.edge.tune.TRIALS_DIR)."""
DISK_BYTES = "disk_bytes"
"""Trial-row column: bytes the trial holds on disk (its Tune dir and, multi-worker, its Ray Train run)."""
WEIGHTS_KEPT = "weights_kept"
"""Trial-row column: its checkpoint still holds weights (the disk policy deletes stopped trials' weights), so it
can be exported."""


def dir_bytes(path: str | Path) -> int:
    """Bytes of the files under `path` (0 when it does not exist)."""
    path = Path(path)
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


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
        row[WEIGHTS_KEPT] = bool(row[metrics.CHECKPOINT_PATH]) and has_weights(row[metrics.CHECKPOINT_PATH])
        row.update({k: v for k, v in flatten_result(last).items()
                    if k.startswith((metrics.F1_CLASS_PREFIX, *metrics.SPLITLESS_PREFIXES))})
        own = trial_dir(exp_dir, row)
        row[DISK_BYTES] = (dir_bytes(own) if own else 0) + dir_bytes(
            Path(exp_dir) / TRIALS_DIR / f"trial_{trial.trial_id}")
        rows.append(row)
    return pd.DataFrame(rows)


def trial_dir(exp_dir: Path, trial: dict[str, Any]) -> Path | None:
    """A trial's Tune directory (holding result.json / progress.csv); the recorded path may come from another
    machine or a moved experiment dir."""
    exp_dir = Path(exp_dir)
    recorded = Path(str(trial.get("path") or ""))
    for candidate in (exp_dir / TUNE_DIR / recorded.name, recorded):
        if recorded.name and any((candidate / name).exists() for name in ("result.json", "progress.csv")):
            return candidate
    for name in ("result.json", "progress.csv"):
        matches = sorted((exp_dir / TUNE_DIR).glob(f"*_{trial['trial_id']}_*/{name}"))
        if matches:
            return matches[0].parent
    return None


def load_history(trial_dir: Path) -> pd.DataFrame:
    """One row per report of a trial, from its result.json (JSON lines; a half-written last line is skipped), else
    its progress.csv; by step, the last report of a step kept."""
    trial_dir = Path(trial_dir)
    rows = []
    if (trial_dir / "result.json").exists():
        for line in (trial_dir / "result.json").read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        frame = pd.DataFrame(rows)
    elif (trial_dir / "progress.csv").exists():
        try:
            frame = pd.read_csv(trial_dir / "progress.csv")
        except (pd.errors.EmptyDataError, pd.errors.ParserError):
            frame = pd.DataFrame()
    else:
        frame = pd.DataFrame()
    # by step: a trial resumed after a driver crash restarts Tune's iteration counter, not its step
    order = "step" if "step" in frame else "training_iteration"
    return frame.sort_values(order).drop_duplicates(subset=[order], keep="last") if order in frame else frame


def load_histories(exp_dir: Path, trials: list[dict[str, Any]]) -> dict[str, pd.DataFrame]:
    """trial id -> its history (load_history), for the trials that reported tokens."""
    histories = {}
    for trial in trials:
        found = trial_dir(exp_dir, trial)
        if found is not None:
            history = load_history(found)
            if not history.empty and metrics.TOKENS in history:
                histories[trial["trial_id"]] = history
    return histories
