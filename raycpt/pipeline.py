"""The job as a short pipeline: open the experiment -> prepare the data -> measure the base model -> run the tuner ->
analyse, export, plot and print. `raycpt sweep` runs it all; `raycpt train` shares the first three steps and runs
one trial on Ray Train instead of the tuner."""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from pathlib import Path
from typing import Any

import ray
import torch
from rich.console import Console

from raycpt.core import metrics as m
from raycpt.core.augment import AugmentResult, augment_corpus, check_generator, generator_source, without_synthetic
from raycpt.core.config import CONFIG_FILE, ExperimentConfig, to_dict
from raycpt.core.errors import InputError
from raycpt.core.extend import (
    EXTENSION_FILE,
    RAY_RUN_DIR,
    Extension,
    Outcome,
    check_fingerprint,
    outcome,
    plan_extension,
)
from raycpt.core.files import write_json
from raycpt.core.forecast.plan import check_fits
from raycpt.core.prepare import Manifest, check_storage, measure_base, prepare_experiment
from raycpt.core.resources import trial_concurrency
from raycpt.edge.callbacks import SweepProgress
from raycpt.edge.data import RayDataMapper
from raycpt.edge.disk import prune_pre_decay
from raycpt.edge.ray_output import RAY_OUTPUT_LOG, logger_callbacks, ray_logs_to
from raycpt.edge.session import ray_session
from raycpt.edge.staging import remove_orphans_on_every_node
from raycpt.edge.tune import TRIALS_DIR, TUNE_DIR, build_tuner, max_reports, restore_tuner, rung_phases
from raycpt.edge.worker import build_trainer, measure_base_on_trial_resources
from raycpt.results.collect import DISK_BYTES
from raycpt.results.export import CARD_FILE, EXPORT_DIR, hub_token
from raycpt.results.extension import export_extension
from raycpt.results.format import fixed, make_console
from raycpt.results.plots import write_plots
from raycpt.results.progress import AugmentProgress, PrepareProgress
from raycpt.results.render import print_base, print_data, print_summary
from raycpt.results.summary import Summary, analyze, dir_bytes


def open_experiment(cfg: ExperimentConfig, *, force: bool = False, resume: bool = False,
                    replaces: tuple[str, ...] = (TUNE_DIR, TRIALS_DIR, EXPORT_DIR)) -> Path:
    """The experiment dir, checked writable, with the resolved config saved in it. An earlier sweep there is
    replaced only with `force` (its `replaces` subdirs are removed) and continued only with `resume`."""
    exp_dir = check_storage(cfg)  # a bad storage_path fails here, before anything is computed
    check_fits(cfg)  # the memory plan against resources.accelerator_type, when one is named
    if resume and not (exp_dir / TUNE_DIR).exists():
        raise InputError(f"{exp_dir}: no sweep to resume (no {TUNE_DIR}/ dir); start one with `raycpt sweep CONFIG`")
    if (exp_dir / TUNE_DIR).exists() and not resume and TUNE_DIR in replaces:
        if not force:
            raise InputError(f"experiment dir {exp_dir} already holds a sweep; pass --force to replace it or "
                             "--set name=<new name>")
        for old in replaces:
            shutil.rmtree(exp_dir / old, ignore_errors=True)
    exp_dir.mkdir(parents=True, exist_ok=True)
    write_json(exp_dir / CONFIG_FILE, to_dict(cfg))
    return exp_dir


def prepare(cfg: ExperimentConfig, exp_dir: Path, console: Console, mapper: RayDataMapper) -> Manifest:
    """Fetch, tokenise and pack (cached), on Ray Data when a corpus has several read units (Ray starts only
    then, after the inputs were checked), else in this process: the same blocks either way."""
    console.print("Preparing model and data (cached after the first run)")
    with PrepareProgress(console) as progress:
        manifest = prepare_experiment(cfg, mapper=mapper, on_unit=progress)
    manifest.save(exp_dir)
    print_data(console, manifest)
    return manifest


def measure(cfg: ExperimentConfig, manifest: Manifest, exp_dir: Path, console: Console) -> dict[str, Any]:
    """Score the base model on the held-out sets trials will use, on the trials' device and in their precision:
    here on CPU, as a Ray task on a trial's GPU when trials use GPUs (so call it inside `ray_session`)."""
    with console.status("Measuring the base model on the held-out sets"):
        measure_on = measure_base_on_trial_resources if cfg.resources.use_gpu else measure_base
        base = measure_on(cfg, manifest, exp_dir)
    print_base(console, base)
    return base


def run_tuner(cfg: ExperimentConfig, manifest: Manifest, exp_dir: Path, console: Console, *, loggers: list,
              resume: bool = False, verbose: bool = False) -> None:
    """The Tune sweep (inside `ray_session`), with the live view; returns when it ends."""
    concurrency = trial_concurrency(cfg, ray.cluster_resources())
    console.print(f"[bold]Sweep[/]: {cfg.search.num_samples} sample(s) of {len(cfg.search.space)} "
                  f"hyperparameter(s), {concurrency} trial(s) at a time, search {cfg.search.algorithm}, "
                  f"scheduler {cfg.search.scheduler}")
    phases = rung_phases(cfg)
    if phases:
        console.print(phases)
    # The live table needs the terminal to itself: with --verbose Ray prints there too, so plain lines instead.
    progress = SweepProgress(console, metric=cfg.search.metric, mode=cfg.search.mode,
                             max_reports=max_reports(cfg), concurrency=concurrency, live=not verbose)
    tuner = (restore_tuner(cfg, manifest, exp_dir) if resume
             else build_tuner(cfg, manifest, exp_dir, concurrency, [progress, *loggers], verbose=verbose))
    try:
        with ray_logs_to(exp_dir / RAY_OUTPUT_LOG, echo=verbose):
            tuner.fit()
    finally:
        progress.close()
        remove_orphans_on_every_node()


def finish(cfg: ExperimentConfig, exp_dir: Path, console: Console, *, export: bool = True,
           force: bool = False) -> Summary:
    """Select, export (and verify) the winner, draw the plots, print the table and winner panel, save
    summary.json."""
    summary = analyze(exp_dir, cfg, export=export, force=force)
    keep_pre_decay(cfg, exp_dir, summary, console)
    print_summary(console, summary)
    if cfg.report.plots:
        try:
            summary.plots = [str(p) for p in write_plots(exp_dir, summary)]
            console.print(f"Plots: {', '.join(Path(p).name for p in summary.plots)} in {exp_dir / 'plots'}")
        except Exception as err:  # a figure is not worth losing the summary and export over
            console.print(f"[yellow]Plots failed[/] ({type(err).__name__}: {err}); the summary and export are kept")
    return summary


def keep_pre_decay(cfg: ExperimentConfig, exp_dir: Path, summary: Summary, console: Console) -> None:
    """The sweep is analysed: wsd trials' pre-decay checkpoints are kept for `checkpoint.keep_pre_decay` (the winner
    by default, for `raycpt extend`) and removed for the rest; the summary's disk numbers follow."""
    pruned = prune_pre_decay(exp_dir, summary.trials, cfg.checkpoint, summary.winner, summary.order)
    if not pruned["kept"] and not pruned["removed"]:
        return
    for row in summary.trials:
        row[DISK_BYTES] = max(0, (row.get(DISK_BYTES) or 0) - pruned["freed_by_trial"].get(row["trial_id"], 0))
    summary.experiment_dir_bytes = dir_bytes(exp_dir)
    kept = ", ".join(f"trial {trial}" for trial in pruned["kept"]) or "no trial"
    console.print(f"Pre-decay checkpoints (checkpoint.keep_pre_decay={cfg.checkpoint.keep_pre_decay}): kept for "
                  f"{kept}; {pruned['removed']} removed ({pruned['freed'] / 2**30:.2f} GiB freed)"
                  + (f"; continue the winner with `raycpt extend {exp_dir} --tokens N`"
                     if summary.winner in pruned["kept"] else ""))


def sweep(cfg: ExperimentConfig, *, force: bool = False, console: Console | None = None, verbose: bool = False,
          resume: bool = False) -> Summary:
    """The whole job. `verbose` also shows Ray Tune's own tables and logs (always in <exp>/ray_output.log);
    `resume` continues an interrupted sweep in cfg's experiment dir: finished trials are kept, unfinished ones
    resume from their latest checkpoint."""
    console = console or make_console()
    started = time.perf_counter()
    loggers = logger_callbacks(cfg)  # here, so a missing mlflow/wandb package fails before any work
    hub_token(cfg)  # export.push_to_hub without HF_TOKEN fails now, not after the sweep
    exp_dir = open_experiment(cfg, force=force, resume=resume)
    if cfg.augments():
        augment(cfg, console)
    with RayDataMapper() as mapper, contextlib.ExitStack() as session:
        manifest = prepare(cfg, exp_dir, console, mapper)
        session.enter_context(ray_session())  # the one the data step started, if it did
        measure(cfg, manifest, exp_dir, console)
        run_tuner(cfg, manifest, exp_dir, console, loggers=loggers, resume=resume, verbose=verbose)
    already_exported = resume and (exp_dir / EXPORT_DIR / CARD_FILE).exists()
    if already_exported:
        console.print(f"The sweep had already exported its winner to {exp_dir / EXPORT_DIR}; re-analysing only")
    summary = finish(cfg, exp_dir, console, export=not already_exported, force=force)
    summary.wall_time_s = time.perf_counter() - started
    summary.save()
    tensorboard = f"; tensorboard --logdir {exp_dir / TUNE_DIR}" if "tensorboard" in cfg.report.loggers else ""
    console.print(f"Sweep wall time: {summary.wall_time_s:.0f} s; results in {exp_dir} "
                  f"({summary.experiment_dir_bytes / 2**30:.1f} GiB on disk, trials "
                  f"{sum(t.get('disk_bytes') or 0 for t in summary.trials) / 2**30:.2f} GiB; Ray's own output in "
                  f"{RAY_OUTPUT_LOG}{tensorboard})")
    if cfg.final.tokens > 0:
        final_run(cfg, exp_dir, console, force=force)
    return summary


def final_run(cfg: ExperimentConfig, exp_dir: Path, console: Console, *, force: bool = False) -> dict[str, Any] | None:
    """`final.tokens`: continue the winner (or `final.trial`) into the final run at the end of the sweep's job, as
    `raycpt extend EXPERIMENT_DIR --tokens N` does; returns its card. A request that cannot run (no winner, a trial
    without a pre-decay checkpoint, too few tokens) is said in one line, and the sweep's results stand."""
    try:
        ext = plan_extension(exp_dir, cfg.final.tokens, cfg.final.trial or None,
                             asked_as=("final.tokens", "final.trial"))
        if (ext.out_dir / EXPORT_DIR).is_dir() and any((ext.out_dir / EXPORT_DIR).iterdir()) and not force:
            console.print(f"The final run was already exported to {ext.out_dir / EXPORT_DIR}; not run again")
            return None
        console.print(f"[bold]Final run[/] (final.tokens={cfg.final.tokens}): trial {ext.trial_id} from its "
                      f"pre-decay checkpoint to {ext.tokens} tokens; {ext.why}")
        result = extend_on_ray(ext, console)
        if result.stopped:
            console.print(f"[yellow]stopped[/]: {result.stopped}")
        card = export_extension(ext, result, force=force)
    except InputError as err:
        console.print(f"[yellow]Final run not run[/]: {' '.join(str(err).split())}")
        return None
    console.print(f"Final run: step {result.metrics.get(m.STEP)}, domain ppl "
                  f"{fixed(result.metrics.get(m.DOMAIN_PPL))}; exported to {ext.out_dir / EXPORT_DIR}")
    return card


TRAIN_DIR = "train"
"""`raycpt train`'s Ray Train run, inside the experiment dir."""


def train_one(cfg: ExperimentConfig, console: Console) -> dict[str, Any]:
    """`raycpt train`: one trial's loop on Ray Train with resources.num_workers workers (no Tune). A run of the same
    name resumes from its latest checkpoint. Returns the last metrics."""
    exp_dir = open_experiment(cfg, replaces=())
    if (exp_dir / TRAIN_DIR / "run").exists():
        # Ray Train restores a run of the same name from its latest checkpoint: say so instead of surprising
        console.print(f"[yellow]resuming[/] the run in {exp_dir / TRAIN_DIR / 'run'} from its latest checkpoint "
                      "(remove that dir or --set name=<new> to start fresh)")
    if cfg.augments():
        augment(cfg, console)
    with RayDataMapper() as mapper, contextlib.ExitStack() as session:
        manifest = prepare(cfg, exp_dir, console, mapper)
        session.enter_context(ray_session())
        measure(cfg, manifest, exp_dir, console)
        trial_concurrency(cfg, ray.cluster_resources())  # fails early when the trial cannot fit
        result = build_trainer(cfg, manifest, storage_path=exp_dir / TRAIN_DIR, name="run").fit()
    metrics = dict(result.metrics or {})
    metrics["checkpoint"] = result.checkpoint.path if result.checkpoint else None
    return metrics


def extend_on_ray(ext: Extension, console: Console) -> Outcome:
    """`raycpt extend` on Ray Train, the way `raycpt train` runs (resources.num_workers workers, ddp or fsdp): the
    loop resumes the trial's pre-decay checkpoint and runs to the extension's steps, checkpointing into
    <exp>/extend-<trial>-<tokens>/run, with the forgetting guard on. Started again after a kill, Ray Train resumes
    the run from its own latest checkpoint."""
    out = ext.out_dir
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / EXTENSION_FILE, ext.lineage())
    if (out / RAY_RUN_DIR).exists():
        console.print(f"[yellow]resuming[/] the extension in {out / RAY_RUN_DIR} from its latest checkpoint")
    with RayDataMapper() as mapper, contextlib.ExitStack() as session:
        console.print("Preparing model and data (cached by the sweep)")
        with PrepareProgress(console) as progress:
            manifest = prepare_experiment(ext.cfg, mapper=mapper, on_unit=progress)
        check_fingerprint(manifest, ext.exp_dir)  # the sweep's data and model, or nothing runs
        session.enter_context(ray_session())
        trial_concurrency(ext.cfg, ray.cluster_resources())  # fails early when the run cannot fit
        result = build_trainer(ext.cfg, manifest, storage_path=out, name=RAY_RUN_DIR, resume_from=ext.checkpoint,
                               forgetting_bound=ext.forgetting_bound,
                               on_forgetting=ext.cfg.extend.on_forgetting).fit()
    last = dict(result.metrics or {})
    if last.get(m.FORGETTING):
        console.print(f"[yellow]forgetting[/]: {last[m.FORGETTING]}")
    return outcome(ext, result.checkpoint.path if result.checkpoint else None, [last])


def augment(cfg: ExperimentConfig, console: Console, *, num_cpus: int | None = None) -> AugmentResult:
    """`raycpt augment`, and the stage `sweep`, `train` and `prepare` run first with `data.synthetic: augment`: check
    the generator, run the data step (cached; it fixes the held-out split the leakage guard reads; without the
    synthetic corpus, which this writes), then rewrite the domain corpus's units on Ray Data (augment.workers
    actors, one generator each; one GPU each with resources.use_gpu), resuming from the units an earlier run
    finished."""
    cfg = without_synthetic(cfg)
    exp_dir = check_storage(cfg)
    generator = check_generator(cfg)  # a bad generator fails before the data step and any generation
    if cfg.resources.use_gpu and not os.environ.get("RAY_ADDRESS") and not torch.cuda.is_available():
        raise InputError("resources.use_gpu: no GPU on this machine for the generators; set resources.use_gpu=false "
                         "or run on a GPU machine (RAY_ADDRESS for a cluster)")
    exp_dir.mkdir(parents=True, exist_ok=True)
    with RayDataMapper(num_cpus=num_cpus, dashboard=False) as data_mapper, RayDataMapper(
            workers=cfg.augment.workers or None, num_cpus=num_cpus, dashboard=False,
            num_gpus=1 if cfg.resources.use_gpu else 0) as mapper:
        manifest = prepare(cfg, exp_dir, console, data_mapper)
        a = cfg.augment
        console.print(f"[bold]Augment[/]: {generator_source(cfg)[0]} rewrites each training document in "
                      f"{', '.join(a.styles)} x {a.copies} (at most {a.max_new_tokens} tokens, temperature "
                      f"{a.temperature}, top_p {a.top_p}, seed {a.seed})")
        with AugmentProgress(console) as progress:
            result = augment_corpus(cfg, mapper=mapper, on_unit=progress, manifest=manifest, generator=generator)
    console.print(result.describe())
    return result
