"""Ray Tune: the search space from config, ASHA, one TorchTrainer per trial, and the sweep from start to export.

`train_driver_fn(config)` is the Tune function trainable: it applies a trial's sampled hyperparameters and runs
that trial's TorchTrainer. It also runs alone (outside Tune) without the report callback.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

from raycpt.config import ExperimentConfig, TrainConfig, config_from_dict, to_dict, with_overrides
from raycpt.errors import InputError
from raycpt.files import write_json

TRIAL_DRIVER_MEMORY = 256 * 1024**2
"""Logical memory a trial driver reserves when it holds no CPU (Ray rejects an empty resource request)."""


def search_space(space: dict[str, dict[str, list[Any]]]) -> dict[str, Any]:
    """YAML distributions -> Tune's; integer fields sample integers."""
    from ray import tune

    result = {}
    for key, spec in space.items():
        (dist, args), = spec.items()
        is_int = isinstance(getattr(TrainConfig(), key.split(".", 1)[1], 0.0), int) and not isinstance(
            getattr(TrainConfig(), key.split(".", 1)[1], 0.0), bool) if key.startswith("train.") else True
        if dist == "loguniform":
            result[key] = tune.lograndint(int(args[0]), int(args[1]) + 1) if is_int else tune.loguniform(*args)
        elif dist == "uniform":
            result[key] = tune.randint(int(args[0]), int(args[1]) + 1) if is_int else tune.uniform(*args)
        elif dist == "choice":
            result[key] = tune.choice(args)
        else:
            result[key] = tune.grid_search(args)
    return result


def _max_value(cfg: ExperimentConfig, key: str, default: int) -> int:
    spec = cfg.search.space.get(key)
    return int(max(next(iter(spec.values())))) if spec else int(default)


def _min_value(cfg: ExperimentConfig, key: str, default: int) -> int:
    spec = cfg.search.space.get(key)
    return int(min(next(iter(spec.values())))) if spec else int(default)


def max_steps(cfg: ExperimentConfig) -> int:
    """The most optimizer steps any trial can run (ASHA's max_t)."""
    return _max_value(cfg, "train.steps", cfg.train.steps)


def max_reports(cfg: ExperimentConfig) -> int:
    """The most reports any trial can make (for progress estimates)."""
    return max(1, math.ceil(max_steps(cfg) / _min_value(cfg, "train.eval_every", cfg.train.eval_every)))


def train_driver_fn(config: dict[str, Any], base_cfg: dict[str, Any] | None = None,
                    data: dict[str, Any] | None = None, trials_dir: str = "") -> dict[str, Any]:
    """One trial: apply the sampled hyperparameters, run the core loop: in this trial when it has one worker,
    else on a TorchTrainer's workers."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback
    from ray.tune.trainable.trainable_fn_utils import _in_tune_session

    from raycpt.distributed import build_trainer

    cfg = with_overrides(config_from_dict(base_cfg or {}), config.get("train_loop_config", {}))
    in_tune = _in_tune_session()
    if in_tune and cfg.resources.num_workers == 1:
        from raycpt.distributed import train_in_trial

        return train_in_trial(cfg, data or {})
    # Names come from the trial id, never a timestamp, so a restored sweep finds its trials again.
    name = f"trial_{tune.get_context().get_trial_id()}" if in_tune else "trial_standalone"
    trainer = build_trainer(cfg, data or {}, storage_path=trials_dir, name=name,
                            callbacks=[TuneReportCallback()] if in_tune else [])
    result = trainer.fit()
    # Nothing important after fit(): when Tune stops a trial, this line is never reached.
    return result.metrics or {}


def connect_ray(num_cpus: int | None = None) -> bool:
    """Join RAY_ADDRESS when set, else start local Ray with the dashboard on (ASHA-stopped trials leak their
    workers without it). Returns True when this process started Ray (and so must shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
        return False
    ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=True, log_to_driver=False,
             configure_logging=True, logging_level="ERROR")
    return True


def trial_concurrency(cfg: ExperimentConfig, cluster: dict[str, float]) -> int:
    """Trials that fit at once, set by the scarcest resource; raises InputError when one trial cannot fit."""
    r = cfg.resources
    cpus_needed = r.num_workers * r.cpus_per_worker + r.trial_cpus
    cpus = cluster.get("CPU", 0.0)
    if cpus_needed > cpus + 1e-9:
        raise InputError(f"resources: one trial needs {cpus_needed:g} CPUs (num_workers x cpus_per_worker + "
                         f"trial_cpus) but the cluster has {cpus:g}; lower resources.num_workers or cpus_per_worker")
    fits = int((cpus + 1e-9) // cpus_needed)
    if r.use_gpu:
        gpus = cluster.get("GPU", 0.0)
        if gpus < r.num_workers:
            raise InputError(f"resources.num_workers={r.num_workers} with use_gpu needs {r.num_workers} GPUs but the "
                             f"cluster has {gpus:g}; lower num_workers or set resources.use_gpu=false")
        fits = min(fits, int(gpus // r.num_workers))
    if cfg.search.max_concurrent_trials:
        fits = min(fits, cfg.search.max_concurrent_trials)
    return max(1, fits)


def resumable_asha(state_path: Path, **kwargs):
    """ASHA whose rung records survive a driver crash. Tune's restore brings back trials but not scheduler state,
    so a resumed sweep would compare its remaining trials against empty rungs and stop none of them. This one
    saves its state after every decision and reloads it on first use."""
    from ray.tune.schedulers import ASHAScheduler

    class ResumableASHA(ASHAScheduler):
        def __init__(self) -> None:
            super().__init__(**kwargs)
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

    return ResumableASHA()


def build_trainable(cfg: ExperimentConfig, data: dict[str, Any], exp_dir: Path):
    """The Tune trainable: `train_driver_fn` with the base config, data manifest and the trial's resources.
    Built the same way for a new sweep and for `Tuner.restore`."""
    from ray import tune

    r = cfg.resources
    trainable = tune.with_parameters(train_driver_fn, base_cfg=to_dict(cfg), data=data,
                                     trials_dir=str(exp_dir / "trials"))
    if r.num_workers == 1:  # the trial is the worker (distributed.train_in_trial): it holds the worker's resources
        resources = {"cpu": r.cpus_per_worker + r.trial_cpus, "gpu": 1 if r.use_gpu else 0,
                     "custom_resources": dict(r.worker_resources)}
    else:
        resources = {"cpu": r.trial_cpus} if r.trial_cpus > 0 else {"cpu": 0, "memory": TRIAL_DRIVER_MEMORY}
    return tune.with_resources(trainable, resources)


def build_tuner(cfg: ExperimentConfig, data: dict[str, Any], exp_dir: Path, concurrency: int, callbacks: list,
                *, verbose: bool = False):
    """The Tuner for the sweep. `callbacks` are raycpt's progress display and the logger callbacks
    (report.logger_callbacks). Tune's own progress tables go to <exp>/ray_output.log, and also to the terminal
    when `verbose`."""
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    from raycpt.report import RAY_OUTPUT_LOG, ray_progress_reporters

    s = cfg.search
    # The legacy output engine takes a progress reporter we can point at a file; the new one prints to stdout.
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    # The logger callbacks are passed explicitly (report.loggers is the truth): stop Tune adding its defaults.
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    ray_reporter, ray_trial_lines = ray_progress_reporters(exp_dir / RAY_OUTPUT_LOG, echo=verbose)
    # Rungs are counted in optimizer steps, not reports: a trial resumed after a crash restarts Tune's iteration
    # counter but not its step, and a swept eval_every would make reports incomparable.
    eval_every = _min_value(cfg, "train.eval_every", cfg.train.eval_every)
    scheduler = (resumable_asha(exp_dir / "scheduler_state.pkl", time_attr="step", max_t=max_steps(cfg),
                                grace_period=s.grace_period * eval_every, reduction_factor=s.reduction_factor)
                 if s.scheduler == "asha" else FIFOScheduler())
    return tune.Tuner(
        build_trainable(cfg, data, exp_dir),
        param_space={"train_loop_config": search_space(s.space)},
        tune_config=tune.TuneConfig(metric=s.metric, mode=s.mode, scheduler=scheduler, num_samples=s.num_samples,
                                    # an explicit generator ignores TuneConfig's limit: give it its own
                                    search_alg=BasicVariantGenerator(random_state=s.seed, max_concurrent=concurrency)),
        # verbose=2: Tune's per-result lines and tables, which ray_progress_reporters routes to the log file.
        run_config=tune.RunConfig(name="tune", storage_path=str(exp_dir), verbose=2,
                                  callbacks=[*callbacks, ray_trial_lines], progress_reporter=ray_reporter,
                                  # one-worker trials checkpoint through Tune (multi-worker ones through Ray Train,
                                  # distributed.build_trainer): the same policy, best by domain ppl + the latest
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1,
                                                                          checkpoint_score_attribute="eval/domain_ppl",
                                                                          checkpoint_score_order="min"),
                                  failure_config=tune.FailureConfig(
                                      max_failures=2 if cfg.resources.num_workers == 1 else 0)),
    )


def sweep(cfg: ExperimentConfig, *, force: bool = False, console=None, verbose: bool = False,
          resume: bool = False) -> dict[str, Any]:
    """The whole job: prepare data, measure the base model, run the Tune sweep, select and export the winner.
    `verbose` also shows Ray Tune's own tables and logs (always written to <exp>/ray_output.log). `resume`
    continues an interrupted sweep in cfg's experiment dir (Tune's restore): finished trials are kept, unfinished
    ones resume from their latest checkpoint."""
    from raycpt import analysis, report
    from raycpt.prepare import check_storage, measure_base, prepare_experiment

    console = console or report.make_console()
    loggers = report.logger_callbacks(cfg)  # here, so a missing mlflow/wandb package fails before any work
    exp_dir = check_storage(cfg)  # a bad storage_path fails here, before anything is computed
    if resume and not (exp_dir / "tune").exists():
        raise InputError(f"{exp_dir}: no sweep to resume (no tune/ dir); start one with `raycpt sweep CONFIG`")
    if (exp_dir / "tune").exists() and not resume:
        if not force:
            raise InputError(f"experiment dir {exp_dir} already holds a sweep; pass --force to replace it or "
                             "--set name=<new name>")
        for old in ("tune", "trials", "export"):
            shutil.rmtree(exp_dir / old, ignore_errors=True)
    exp_dir.mkdir(parents=True, exist_ok=True)
    write_json(exp_dir / "raycpt_config.json", to_dict(cfg))
    started = time.perf_counter()

    with console.status("Preparing model and data (cached after the first run)"):
        manifest = prepare_experiment(cfg)
    write_json(exp_dir / "data_manifest.json", manifest)
    report.print_data(console, manifest)
    with console.status("Measuring the base model on the held-out sets"):
        base = measure_base(cfg, manifest, exp_dir)
    report.print_base(console, base)

    started_ray = connect_ray()
    try:
        import ray

        concurrency = trial_concurrency(cfg, ray.cluster_resources())
        console.print(f"[bold]Sweep[/]: {cfg.search.num_samples} sample(s) of {len(cfg.search.space)} "
                      f"hyperparameter(s), {concurrency} trial(s) at a time, scheduler {cfg.search.scheduler}")
        # The live table needs the terminal to itself: with --verbose Ray prints there too, so plain lines instead.
        progress = report.sweep_progress_callback(console, metric=cfg.search.metric, mode=cfg.search.mode,
                                                  max_reports=max_reports(cfg), concurrency=concurrency,
                                                  live=not verbose)
        if resume:
            from ray import tune

            # Tune restores its own callbacks (the live view, loggers) from the interrupted run's tuner.pkl.
            tuner = tune.Tuner.restore(str(exp_dir / "tune"), trainable=build_trainable(cfg, manifest, exp_dir),
                                       resume_unfinished=True, resume_errored=True)
        else:
            tuner = build_tuner(cfg, manifest, exp_dir, concurrency, [progress, *loggers], verbose=verbose)
        try:
            with report.ray_logs_to(exp_dir / report.RAY_OUTPUT_LOG, echo=verbose):
                tuner.fit()
        finally:
            progress.close()
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    already_exported = resume and (exp_dir / "export" / "raycpt_card.json").exists()
    if already_exported:
        console.print(f"The sweep had already exported its winner to {exp_dir / 'export'}; re-analysing only")
    summary = analysis.analyze(exp_dir, cfg, console=console, export=not already_exported)
    if cfg.report.plots:
        from raycpt.plots import write_plots

        try:
            summary["plots"] = [str(p) for p in write_plots(exp_dir, summary)]
            console.print(f"Plots: {', '.join(Path(p).name for p in summary['plots'])} in {exp_dir / 'plots'}")
        except Exception as err:  # a figure is not worth losing the summary and export over
            console.print(f"[yellow]Plots failed[/] ({type(err).__name__}: {err}); the summary and export are kept")
    summary["wall_time_s"] = time.perf_counter() - started
    write_json(exp_dir / "summary.json", summary)
    tensorboard = f"; tensorboard --logdir {exp_dir / 'tune'}" if "tensorboard" in cfg.report.loggers else ""
    size_gib = summary.get("experiment_dir_bytes", 0) / 2**30
    console.print(f"Sweep wall time: {summary['wall_time_s']:.0f} s; results in {exp_dir} ({size_gib:.1f} GiB on disk; "
                  f"Ray's own output in "
                  f"{report.RAY_OUTPUT_LOG}{tensorboard})")
    return summary
