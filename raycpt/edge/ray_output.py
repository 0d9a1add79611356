"""Ray's own output and the experiment trackers: Tune's progress tables and log records go to
<exp>/ray_output.log (on the terminal only with --verbose); TensorBoard / MLflow / W&B logger callbacks come from
`report.loggers`."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from collections.abc import Iterator
from pathlib import Path

from ray.tune import CLIReporter
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.tune.progress_reporter import TrialProgressCallback

from raycpt.core.errors import InputError

RAY_OUTPUT_LOG = "ray_output.log"
"""Ray Tune's own progress tables and log records, in the experiment dir (on the terminal only with --verbose)."""


def ray_progress_reporters(log_path: Path, echo: bool):
    """Tune's legacy progress table (every 30 s) and per-result lines, written to `log_path` and, when `echo`,
    printed as Ray normally does. Returns (progress_reporter for RunConfig, callback for RunConfig.callbacks):
    passing our own TrialProgressCallback keeps Tune from adding its default, which prints to stdout."""

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

    if importlib.util.find_spec(module) is None:
        raise InputError(f"report.loggers includes {logger}, but the {pip_name} package is not installed: "
                         f"pip install {pip_name} (or remove {logger} from report.loggers)")


def logger_callbacks(cfg) -> list:
    """Tune logger callbacks for cfg.report.loggers. JSON and CSV are always written (raycpt's analysis and plots
    read result.json / progress.csv); tensorboard, mlflow and wandb as listed. Raises InputError naming the pip
    package when one is missing. Tune's automatic loggers are turned off by the caller, so the list is the truth."""

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

