"""Ray Tune: the search space from config, ASHA whose rungs survive a driver crash, the trial trainable, and the
Tuner. `train_driver_fn(config)` is the Tune function trainable: it applies a trial's sampled hyperparameters and
runs that trial's loop; it also runs alone (outside Tune) without the report callback.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter, Searcher
from ray.tune.trainable.trainable_fn_utils import _in_tune_session

from raycpt.core import metrics
from raycpt.core.config import ExperimentConfig, SearchConfig, TrainConfig, with_sample
from raycpt.core.prepare import Manifest
from raycpt.core.resources import trial_resources
from raycpt.core.schedule import stable_end
from raycpt.edge.disk import DiskPolicy
from raycpt.edge.policy import MAX_FAILURES, checkpoint_config, failure_config
from raycpt.edge.ray_output import RAY_OUTPUT_LOG, ray_progress_reporters
from raycpt.edge.worker import build_trainer, train_in_trial

TUNE_DIR = "tune"
"""Tune's experiment state and trial dirs, inside the experiment dir."""
TRIALS_DIR = "trials"
"""Ray Train runs of multi-worker trials, inside the experiment dir."""
SCHEDULER_STATE = "scheduler_state.pkl"


def search_space(space: dict[str, dict[str, list[Any]]]) -> dict[str, Any]:
    """YAML distributions -> Tune's; integer fields sample integers."""
    result = {}
    for key, spec in space.items():
        (dist, args), = spec.items()
        default = getattr(TrainConfig(), key.split(".", 1)[1], 0.0) if key.startswith("train.") else 0
        is_int = isinstance(default, int) and not isinstance(default, bool)
        if dist == "loguniform":
            result[key] = tune.lograndint(int(args[0]), int(args[1]) + 1) if is_int else tune.loguniform(*args)
        elif dist == "uniform":
            result[key] = tune.randint(int(args[0]), int(args[1]) + 1) if is_int else tune.uniform(*args)
        elif dist == "choice":
            result[key] = tune.choice(args)
        else:
            result[key] = tune.grid_search(args)
    return result


def optuna_startup_trials(num_samples: int) -> int:
    """Trials TPE samples at random before it models the metric: Optuna's default 10 would leave a typical sweep of
    4-16 trials all random, so a quarter of the trials, at least 3 and at most 10."""
    return min(10, max(3, num_samples // 4))


def search_algorithm(s: SearchConfig, concurrency: int) -> BasicVariantGenerator | Searcher:
    """Who proposes the trials' hyperparameters (`search.algorithm`), at most `concurrency` running at once.
    random: Tune's seeded BasicVariantGenerator (grid points x num_samples random draws). optuna: Tune's
    OptunaSearch with a seeded TPE sampler, behind a ConcurrencyLimiter; Tune passes it the metric, the mode and
    the param space (nested under train_loop_config: OptunaSearch flattens and unflattens it) and saves its state
    in the experiment dir, so `Tuner.restore` (restore_tuner) continues the same study."""
    if s.algorithm == "optuna":
        import optuna  # only optuna sweeps need it (and its import costs a second)
        from ray.tune.search.optuna import OptunaSearch

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # its per-trial lines would break the live view
        sampler = optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=optuna_startup_trials(s.num_samples))
        return ConcurrencyLimiter(OptunaSearch(sampler=sampler), max_concurrent=concurrency)
    # an explicit generator ignores TuneConfig's limit: give it its own
    return BasicVariantGenerator(random_state=s.seed, max_concurrent=concurrency)


def _extreme(cfg: ExperimentConfig, key: str, default: int, pick=max) -> int:
    spec = cfg.search.space.get(key)
    return int(pick(next(iter(spec.values())))) if spec else int(default)


RUN_LENGTH_FIELDS = ("steps", "tokens", "batch_size", "grad_accum", "global_batch_size")
"""The train fields a trial's number of optimizer steps depends on (`TrainConfig.total_steps`)."""


def max_steps(cfg: ExperimentConfig, pick=max) -> int:
    """The most optimizer steps any trial can run (ASHA's max_t): `TrainConfig.total_steps` at every combination of
    the swept run-length fields' extremes (a token budget with the smallest global batch is the longest run).
    `pick=min`: the fewest."""
    options = []
    for name in RUN_LENGTH_FIELDS:
        spec = cfg.search.space.get(f"train.{name}")
        values = next(iter(spec.values())) if spec else [getattr(cfg.train, name)]
        options.append([(name, int(v)) for v in values])  # a range's two ends, or every choice/grid value
    return pick(dataclasses.replace(cfg.train, **dict(combo)).total_steps(cfg.data.block_size)
                for combo in itertools.product(*options))


def asha_rungs(cfg: ExperimentConfig) -> list[int]:
    """The steps at which ASHA compares trials (one bracket: grace_period x eval_every x reduction_factor^k up to
    max_t, as Tune's _Bracket lays them out)."""
    min_t = cfg.search.grace_period * _extreme(cfg, "train.eval_every", cfg.train.eval_every, min)
    max_t, rf = max_steps(cfg), cfg.search.reduction_factor
    count = int(math.log(max_t / min_t) / math.log(rf) + 1) if max_t >= min_t else 0
    return [min_t * rf ** k for k in range(count)]


def rung_phases(cfg: ExperimentConfig) -> str:
    """Whether ASHA's rungs compare trials at the same point of their lr schedules, in one line (empty without
    ASHA). Mid-run held-out loss depends on where a trial is in its schedule: under wsd every rung before the
    shortest trial's cool-down finds all trials at the peak lr (comparable); under cosine, trials of different
    lengths are at different points of their decay at a rung; constant holds the peak after the warmup."""
    if cfg.search.scheduler != "asha":
        return ""
    spec = cfg.search.space.get("train.schedule")
    schedules = set(next(iter(spec.values()))) if spec else {cfg.train.schedule}
    shortest = max_steps(cfg, min)
    rungs = [r for r in asha_rungs(cfg) if r < shortest]  # later rungs compare trials that have ended
    if not rungs:
        return ""
    at = f"ASHA rungs at step(s) {', '.join(map(str, rungs))}"
    if len(schedules) > 1:
        return (f"{at} compare trials under different lr schedules (train.schedule is swept): a decision there "
                "weighs the schedule as much as the hyperparameters")
    schedule, = schedules
    if schedule == "wsd":
        fraction = _extreme_float(cfg, "train.decay_fraction", cfg.train.decay_fraction)
        stable = stable_end(shortest, fraction)
        late = [r for r in rungs if r > stable]
        if late:
            return (f"{at}: step(s) {', '.join(map(str, late))} fall in the cool-down of the shortest trials (stable "
                    f"to step {stable}), so those decisions compare different phases; lower search.grace_period or "
                    "train.decay_fraction")
        return f"{at} fall in every trial's stable phase (wsd): trials are compared at the same lr"
    if schedule == "cosine" and shortest != max_steps(cfg):
        return (f"{at}: trials of different lengths ({shortest}-{max_steps(cfg)} steps) are at different points of "
                "their cosine decay there, so decisions compare different phases; train.schedule=wsd keeps rungs in "
                "every trial's stable phase")
    return f"{at} find every trial at the same point of its {schedule} schedule"


def _extreme_float(cfg: ExperimentConfig, key: str, default: float) -> float:
    spec = cfg.search.space.get(key)
    return float(max(next(iter(spec.values())))) if spec else float(default)


def max_reports(cfg: ExperimentConfig) -> int:
    """The most reports any trial can make (for progress estimates)."""
    return max(1, math.ceil(max_steps(cfg) / _extreme(cfg, "train.eval_every", cfg.train.eval_every, min)))


def train_driver_fn(config: dict[str, Any], base_cfg: ExperimentConfig | None = None, data: Manifest | None = None,
                    trials_dir: str = "") -> dict[str, Any]:
    """One trial: apply the sampled hyperparameters to the sweep's typed config (sent to Ray once, through
    tune.with_parameters), run the core loop: in this trial when it has one worker, else on a TorchTrainer's
    workers."""
    cfg = with_sample(base_cfg or ExperimentConfig(), config.get("train_loop_config", {}))
    in_tune = _in_tune_session()
    if in_tune and cfg.resources.num_workers == 1:
        return train_in_trial(cfg, data)
    # Names come from the trial id, never a timestamp, so a restored sweep finds its trials again.
    name = f"trial_{tune.get_context().get_trial_id()}" if in_tune else "trial_standalone"
    trainer = build_trainer(cfg, data, storage_path=trials_dir, name=name,
                            callbacks=[TuneReportCallback()] if in_tune else [])
    result = trainer.fit()
    # Nothing important after fit(): when Tune stops a trial, this line is never reached.
    return result.metrics or {}


class ResumableASHA(ASHAScheduler):
    """ASHA whose rung records survive a driver crash. Tune's restore brings back trials but not scheduler state,
    so a resumed sweep would compare its remaining trials against empty rungs and stop none of them. This one
    saves its state after every decision and reloads it on first use."""

    def __init__(self, state_path: str | Path, **asha_kwargs: Any) -> None:
        super().__init__(**asha_kwargs)
        self._state_path, self._state_loaded = str(state_path), False

    def _load_state_once(self) -> None:
        if not self._state_loaded:
            self._state_loaded = True
            if os.path.exists(self._state_path):
                self.restore(self._state_path)

    def _save_state(self) -> None:
        tmp = f"{self._state_path}.tmp"
        self.save(tmp)
        os.replace(tmp, self._state_path)

    def on_trial_add(self, tune_controller, trial) -> None:
        self._load_state_once()
        if trial.trial_id not in self._trial_info:
            super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result):
        self._load_state_once()
        decision = super().on_trial_result(tune_controller, trial, result)
        self._save_state()
        return decision

    def on_trial_complete(self, tune_controller, trial, result) -> None:
        self._load_state_once()
        if trial.trial_id in self._trial_info:
            super().on_trial_complete(tune_controller, trial, result)
        self._save_state()


def build_trainable(cfg: ExperimentConfig, data: Manifest, exp_dir: Path):
    """The Tune trainable: `train_driver_fn` with the base config, the manifest and the trial's resources
    (raycpt.core.resources). Built the same way for a new sweep and for `Tuner.restore`."""
    trainable = tune.with_parameters(train_driver_fn, base_cfg=cfg, data=data,
                                     trials_dir=str(exp_dir / TRIALS_DIR))
    driver = dict(trial_resources(cfg.resources).driver)
    request = {"cpu": driver.pop("CPU", 0.0), "gpu": driver.pop("GPU", 0.0)}
    if "memory" in driver:
        request["memory"] = driver.pop("memory")
    return tune.with_resources(trainable, {**request, "custom_resources": driver})


def build_tuner(cfg: ExperimentConfig, data: Manifest, exp_dir: Path, concurrency: int, callbacks: list, *,
                verbose: bool = False) -> tune.Tuner:
    """The Tuner for the sweep. `callbacks` are raycpt's progress display and the logger callbacks
    (raycpt.edge.ray_output.logger_callbacks). Tune's own progress tables go to <exp>/ray_output.log, and also to
    the terminal when `verbose`."""
    s = cfg.search
    # The legacy output engine takes a progress reporter we can point at a file; the new one prints to stdout.
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    # The logger callbacks are passed explicitly (report.loggers is the truth): stop Tune adding its defaults.
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    ray_reporter, ray_trial_lines = ray_progress_reporters(exp_dir / RAY_OUTPUT_LOG, echo=verbose)
    # Rungs are counted in optimizer steps, not reports: a trial resumed after a crash restarts Tune's iteration
    # counter but not its step, and a swept eval_every would make reports incomparable.
    eval_every = _extreme(cfg, "train.eval_every", cfg.train.eval_every, min)
    scheduler = (ResumableASHA(exp_dir / SCHEDULER_STATE, time_attr=metrics.STEP, max_t=max_steps(cfg),
                               grace_period=s.grace_period * eval_every, reduction_factor=s.reduction_factor)
                 if s.scheduler == "asha" else FIFOScheduler())
    return tune.Tuner(
        build_trainable(cfg, data, exp_dir),
        param_space={"train_loop_config": search_space(s.space)},
        tune_config=tune.TuneConfig(metric=s.metric, mode=s.mode, scheduler=scheduler, num_samples=s.num_samples,
                                    search_alg=search_algorithm(s, concurrency)),
        # verbose=2: Tune's per-result lines and tables, which ray_progress_reporters routes to the log file.
        run_config=tune.RunConfig(name=TUNE_DIR, storage_path=str(exp_dir), verbose=2,
                                  callbacks=[*callbacks, ray_trial_lines, DiskPolicy(exp_dir, cfg.checkpoint)],
                                  progress_reporter=ray_reporter,
                                  # one-worker trials checkpoint and restart through Tune, multi-worker ones
                                  # through Ray Train (raycpt.edge.worker.build_trainer): one policy for both
                                  checkpoint_config=checkpoint_config(tune.CheckpointConfig),
                                  failure_config=failure_config(
                                      tune.FailureConfig, MAX_FAILURES if cfg.resources.num_workers == 1 else 0)),
    )


def restore_tuner(cfg: ExperimentConfig, data: Manifest, exp_dir: Path) -> tune.Tuner:
    """The interrupted sweep's Tuner: finished trials kept, unfinished and errored ones resumed from their latest
    checkpoint. Tune restores its own callbacks (the live view, loggers) and the search algorithm from the run's
    tuner.pkl, then the searcher's state (optuna's study: every trial proposed and scored so far) from its
    searcher-state file, so the search goes on where it stopped instead of starting over."""
    return tune.Tuner.restore(str(exp_dir / TUNE_DIR), trainable=build_trainable(cfg, data, exp_dir),
                              resume_unfinished=True, resume_errored=True)
