"""`raycpt extend`: continue a sweep's wsd trial from its pre-decay checkpoint into a longer run. No Ray here.

A wsd trial of T1 steps checkpoints its last stable step S1 (raycpt.core.schedule.stable_end; metrics.PRE_DECAY).
The extension resumes that checkpoint (weights, AdamW state, step count, RNG) with `train.steps` set to the target's
T2 steps: the scheduler is rebuilt from the config and only its step count is restored, so it holds the peak lr
to T2's own last stable step and cools down exactly as a run of T2 steps would; the mixture plan is prefix-stable
(raycpt.core.data.blocks.mixture_plan, and synthetic_plan with data.synthetic), so the data stream goes on where the
trial's stopped. The result equals one uninterrupted wsd run of T2 steps (tests/test_extend.py).

`plan_extension` checks the request before any work (InputError, one line); `extend_local` runs it in this
process; the Ray path is raycpt.pipeline.extend_on_ray. Output goes to <exp>/extend-<trial>-<tokens>/.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raycpt.core import metrics as m
from raycpt.core.config import CONFIG_FILE, ExperimentConfig, apply_overrides, config_from_dict, parse_override
from raycpt.core.errors import InputError
from raycpt.core.files import read_json, write_json
from raycpt.core.forecast import cpt_law
from raycpt.core.prepare import BASE_METRICS_FILE, MANIFEST_FILE, Manifest, prepare_experiment
from raycpt.core.schedule import stable_end
from raycpt.core.train.checkpoint import (
    checkpoint_metrics,
    checkpoints_in,
    keeping_newest_checkpoint,
    pre_decay_checkpoint,
)
from raycpt.core.train.loop import train

SUMMARY_FILE = "summary.json"
"""The analysed sweep (raycpt.results.summary.SUMMARY_FILE): its winner and trial rows."""
TUNE_DIR, TRIALS_DIR = "tune", "trials"
"""Where a sweep's trials checkpoint (raycpt.edge.tune): one-worker trials in their Tune trial dir, multi-worker
ones in their Ray Train run."""
EXTENSION_FILE = "extension.json"
"""The extension's lineage, written into its dir before it runs."""
EXTENSION_GLOB = "extend-*"
"""Every extension's dir inside the experiment dir (`extension_dir`)."""
LOCAL_DIR = "local"
"""`--no-ray` checkpoints, inside the extension's dir."""
RAY_RUN_DIR = "run"
"""The Ray Train run of an extension on Ray (raycpt.pipeline.extend_on_ray), inside the extension's dir."""


def extension_dir(exp_dir: str | os.PathLike, trial_id: str, tokens: int) -> Path:
    return Path(exp_dir) / f"extend-{trial_id}-{tokens}"


def trial_checkpoint_dirs(exp_dir: str | os.PathLike, trial_id: str, recorded: str | None = None) -> list[Path]:
    """The dirs a sweep trial checkpoints into, found from the experiment dir (which may have moved since)."""
    exp_dir = Path(exp_dir)
    dirs = [exp_dir / TUNE_DIR / Path(recorded).name, Path(recorded)] if recorded else []
    dirs += sorted((exp_dir / TUNE_DIR).glob(f"*_{trial_id}_*")) if (exp_dir / TUNE_DIR).is_dir() else []
    dirs.append(exp_dir / TRIALS_DIR / f"trial_{trial_id}")
    return list({d.resolve(): d for d in dirs}.values())  # each once


def tokens_per_step(cfg: ExperimentConfig) -> int:
    return cfg.train.global_batch() * cfg.data.block_size


@dataclass
class Extension:
    """A checked `raycpt extend` request: what continues from where, to how far, and into which dir."""

    exp_dir: Path
    trial_id: str
    checkpoint: Path
    """The trial's pre-decay checkpoint the extension resumes."""
    cfg: ExperimentConfig
    """The trial's own config with train.steps = the target's steps (and the --set overrides)."""
    tokens_before: int
    """Tokens the trial trained (its whole run, cool-down included)."""
    tokens_at_checkpoint: int
    tokens: int
    """The extension's total tokens: the target rounded up to whole optimizer steps."""
    steps_before: int
    steps: int
    winner: bool
    why: str
    """Where the continuation's lr and mix come from."""
    forgetting_bound: float | None = None
    """(1 + select.max_forgetting) x the base model's validation general ppl: the guard's bound (None: no base
    general ppl measured)."""
    predicted: dict[str, float] | None = None
    """The sweep's CPT law on this run: {domain_ppl, general_ppl} at its end, when the law can carry it."""

    @property
    def out_dir(self) -> Path:
        return extension_dir(self.exp_dir, self.trial_id, self.tokens)

    def lineage(self) -> dict[str, Any]:
        t = self.cfg.train
        return {"trial_id": self.trial_id, "winner": self.winner, "pre_decay_checkpoint": str(self.checkpoint),
                "tokens_before": self.tokens_before, "tokens_at_checkpoint": self.tokens_at_checkpoint,
                "tokens_after": self.tokens, "steps_before": self.steps_before,
                "steps_at_checkpoint": self.tokens_at_checkpoint // tokens_per_step(self.cfg),
                "steps_after": self.steps,
                "schedule": {"schedule": t.schedule, "lr": t.lr, "warmup_steps": t.warmup_steps,
                             "decay_fraction": t.decay_fraction, "decay_shape": t.decay_shape,
                             "min_lr_ratio": t.min_lr_ratio, "stable_end_step": stable_end(self.steps,
                                                                                          t.decay_fraction)},
                "mix_ratio": t.mix_ratio, "synthetic_ratio": t.synthetic_ratio, "why": self.why,
                "experiment_dir": str(self.exp_dir),
                "forgetting_bound": self.forgetting_bound, "on_forgetting": self.cfg.extend.on_forgetting,
                "predicted_by_law": self.predicted}


def _no_pre_decay(trial_id: str, row: dict[str, Any], sweep_cfg: ExperimentConfig) -> str:
    """Why a trial has no pre-decay checkpoint, and how to get one."""
    schedule = row.get("hp/train.schedule") or sweep_cfg.train.schedule
    keep = sweep_cfg.checkpoint.keep_pre_decay
    if schedule != "wsd":
        return (f"trial {trial_id} ran train.schedule={schedule}: only a wsd trial keeps a pre-decay checkpoint to "
                "continue from; sweep with --set train.schedule=wsd")
    status, step = row.get("status"), row.get(m.STEP)
    if status == "stopped":
        return (f"trial {trial_id} was stopped by the scheduler (ASHA) at step {step}: stopped trials keep no "
                "pre-decay checkpoint; extend a finished trial (the winner by default)")
    if status in ("failed", "running", "pending"):
        return (f"trial {trial_id} is {status} (at step {step}) and has no pre-decay checkpoint; finish the sweep "
                "(`raycpt sweep --resume EXPERIMENT_DIR`) or extend a finished trial (the winner by default)")
    return (f"trial {trial_id}: its pre-decay checkpoint is not on disk (checkpoint.keep_pre_decay={keep} keeps it "
            "for the winner only); extend the winner, or re-run the sweep with --set checkpoint.keep_pre_decay=all")


def plan_extension(exp_dir: str | os.PathLike, tokens: int, trial_id: str | None = None,
                   overrides: list[str] | None = None, *, asked_as: tuple[str, str] = ("--tokens", "--trial")
                   ) -> Extension:
    """Check a `raycpt extend` request against the analysed sweep in `exp_dir`, before any work: a winner (or the
    named trial) with a pre-decay checkpoint, and `tokens` above what it trained. InputError (one line) if not,
    naming the request as `asked_as` (the options, or final.tokens / final.trial)."""
    tokens_name, trial_name = asked_as
    exp_dir = Path(exp_dir).resolve()
    if not (exp_dir / CONFIG_FILE).is_file():
        raise InputError(f"{exp_dir}: not a raycpt experiment dir (no {CONFIG_FILE}); pass the "
                         "<storage_path>/<name> dir of a sweep")
    if not (exp_dir / SUMMARY_FILE).is_file():
        raise InputError(f"{exp_dir}: no {SUMMARY_FILE}; analyse the sweep first (`raycpt analyze {exp_dir}`)")
    summary = read_json(exp_dir / SUMMARY_FILE)
    sweep_cfg = config_from_dict(read_json(exp_dir / CONFIG_FILE))
    winner = summary.get("winner")
    if trial_id is None:
        if not winner:
            raise InputError(f"{exp_dir}: the sweep has no winner to extend; name a trial with {trial_name} ID "
                             f"(`raycpt report {exp_dir}` lists them)")
        trial_id = winner
    rows = {row["trial_id"]: row for row in summary.get("trials") or []}
    if trial_id not in rows:
        raise InputError(f"{trial_name} {trial_id}: no such trial in {exp_dir} (trials: {', '.join(sorted(rows))})")
    row = rows[trial_id]
    checkpoint = pre_decay_checkpoint(trial_checkpoint_dirs(exp_dir, trial_id, row.get("path")))
    if checkpoint is None:
        raise InputError(_no_pre_decay(trial_id, row, sweep_cfg))
    saved = read_json(checkpoint / CONFIG_FILE)
    trial_cfg = config_from_dict(saved)
    if tokens is None or tokens <= 0:
        raise InputError(f"{tokens_name} {tokens}: give the extension's total training tokens, a positive integer")
    per_step = tokens_per_step(trial_cfg)
    steps_before = trial_cfg.train.total_steps(trial_cfg.data.block_size)
    tokens_before = steps_before * per_step
    if tokens <= tokens_before:
        raise InputError(f"{tokens_name} {tokens}: not above the {tokens_before} tokens trial {trial_id} trained "
                         f"({steps_before} steps of {per_step} tokens); ask for more, e.g. {tokens_name} "
                         f"{4 * tokens_before}")
    steps = math.ceil(tokens / per_step)
    raw = dict(saved)
    raw["train"] = {**raw["train"], "steps": steps, "tokens": 0}
    raw["search"] = {**raw["search"], "space": {}}  # one run, not a sweep
    raw["storage_path"], raw["name"] = str(exp_dir.parent), exp_dir.name  # where the sweep's dir is now
    raw["export"] = {**raw["export"], "push_to_hub": ""}  # not over the winner's repo; --set it to publish
    raw = apply_overrides(raw, dict(parse_override(o) for o in overrides or []))
    cfg = config_from_dict(raw)
    if cfg.train.schedule != "wsd":
        raise InputError(f"train.schedule={cfg.train.schedule}: an extension continues a wsd run's stable phase "
                         "and cools down like a wsd run; drop the --set train.schedule override")
    at = checkpoint_metrics(checkpoint) or {}
    t, was = cfg.train, trial_cfg.train
    source = f"trial {trial_id}" + (" (the winner)" if trial_id == winner else "")
    if (t.lr, t.mix_ratio) == (was.lr, was.mix_ratio):
        why = (f"lr {t.lr:g} and mix {t.mix_ratio:g} from {source} (a continuation keeps the trial's lr and stream; "
               "the final-run recommendation is in `raycpt analyze --suggest`)")
    else:
        why = (f"lr {t.lr:g} and mix {t.mix_ratio:g} from --set ({source} ran lr {was.lr:g}, mix {was.mix_ratio:g})"
               + ("; another mix draws another stream, so blocks the trial saw may come again"
                  if t.mix_ratio != was.mix_ratio else ""))
    if t.synthetic_ratio != was.synthetic_ratio:
        why += (f"; synthetic_ratio {t.synthetic_ratio:g} from --set ({source} ran {was.synthetic_ratio:g}): another "
                "share draws another stream, so blocks the trial saw may come again")
    prediction, said = _law_prediction(summary, cfg)
    why += "; " + said
    base = read_json(exp_dir / BASE_METRICS_FILE) if (exp_dir / BASE_METRICS_FILE).is_file() else {}
    base_general = base.get(m.base_name(m.GENERAL_PPL))
    bound = (1 + cfg.select.max_forgetting) * base_general if base_general else None
    return Extension(exp_dir, trial_id, checkpoint, cfg, tokens_before, int(at.get(m.TOKENS) or 0),
                     steps * per_step, steps_before, steps, trial_id == winner, why, bound, prediction)


def _law_prediction(summary: dict[str, Any], cfg: ExperimentConfig) -> tuple[dict[str, float] | None, str]:
    """The sweep's CPT law on the extended run (its final domain and general ppl), or why it says nothing."""
    fits = {name: cpt_law.CptLawFit.from_dict(raw)
            for name, raw in ((summary.get("recommendation") or {}).get("fits") or {}).items()}
    t = cfg.train
    run = cpt_law.RunSchedule(t.lr, t.total_steps(cfg.data.block_size), t.warmup_steps, t.schedule, t.decay_fraction,
                              t.decay_shape, t.min_lr_ratio)
    predicted, said = cpt_law.predict_run(fits, run, t.mix_ratio, max_loo_error=cfg.law.max_loo_error,
                                          max_extrapolation=cfg.law.max_extrapolation)
    if predicted is None:
        return None, f"no prediction: {said}"
    ppl = {name.replace("_loss", "_ppl"): math.exp(value) for name, value in predicted.items()}
    return ppl, f"{said}: " + ", ".join(f"{name.replace('_', ' ')} {value:.2f}" for name, value in ppl.items())


def check_fingerprint(manifest: Manifest, exp_dir: Path) -> None:
    """The extension trains on the data and model the sweep prepared: same manifest fingerprint, or InputError."""
    path = Path(exp_dir) / MANIFEST_FILE
    if not path.is_file():
        raise InputError(f"{exp_dir}: no {MANIFEST_FILE}; the sweep never prepared its data, nothing to continue")
    swept = Manifest.load(exp_dir).fingerprint
    if swept and manifest.fingerprint != swept:
        raise InputError(f"the model or data changed since the sweep (fingerprint {manifest.fingerprint} vs "
                         f"{swept} in {path}): the extension would not continue the trial's stream; restore them, or "
                         "run a new sweep")


def resume_point(ext: Extension, own_dirs: list[Path]) -> Path:
    """Where the extension (re)starts: its own newest checkpoint when an earlier attempt was killed, else the
    trial's pre-decay checkpoint."""
    own = [p for p in checkpoints_in(own_dirs) if (checkpoint_metrics(p) or {}).get(m.STEP, 0)
           > ((checkpoint_metrics(ext.checkpoint) or {}).get(m.STEP, 0))]
    return own[-1] if own else ext.checkpoint


@dataclass
class Outcome:
    """How an extension ended: the checkpoint to score and export, with its metrics, and the forgetting guard's
    word when it crossed the bound (stopped: the run ended there; else: it warned and ran on)."""

    metrics: dict[str, Any]
    checkpoint: str
    stopped: str | None = None
    warned: list[str] = field(default_factory=list)


def outcome(ext: Extension, last_checkpoint: str | None, reports: list[dict[str, Any]]) -> Outcome:
    """The exported checkpoint is the last one written (the trial's pre-decay one if the extension wrote none
    before the guard stopped it); its metrics are those saved with it."""
    path = str(last_checkpoint or ext.checkpoint)
    crossed = [r[m.FORGETTING] for r in reports if r.get(m.FORGETTING)]
    stopped = (f"{crossed[-1]}; stopped there (extend.on_forgetting=stop): exported the last checkpoint within the "
               f"bound, step {(checkpoint_metrics(path) or {}).get(m.STEP)}") if crossed and \
        ext.cfg.extend.on_forgetting == "stop" else None
    return Outcome(checkpoint_metrics(path) or {}, path, stopped, [] if stopped else crossed)


def extend_local(ext: Extension, log: Callable[[str], None]) -> Outcome:
    """Run the extension in this process (no Ray). A killed extension started again resumes from its own newest
    checkpoint; one that already ran to the end is only scored again."""
    manifest = prepare_experiment(ext.cfg)
    check_fingerprint(manifest, ext.exp_dir)
    out = ext.out_dir / LOCAL_DIR
    out.mkdir(parents=True, exist_ok=True)
    write_json(ext.out_dir / EXTENSION_FILE, ext.lineage())
    resume = resume_point(ext, [out, ext.out_dir / RAY_RUN_DIR])  # an earlier attempt's, with Ray or without
    done = checkpoint_metrics(resume) or {}
    if done.get(m.STEP, 0) >= ext.steps:  # an earlier attempt ran to the end: nothing left to train
        log(f"the extension already ran to step {done[m.STEP]} ({resume})")
        return outcome(ext, str(resume), [done])
    log(f"extending trial {ext.trial_id} from step {done[m.STEP]} ({resume}) to {ext.steps} steps, {ext.tokens} "
        f"tokens; {ext.why}")
    reports: list[dict[str, Any]] = []
    last: list[str] = []

    def report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        reports.append(metrics)
        last[:] = [checkpoint_dir] if checkpoint_dir else last
        log(f"step {metrics[m.STEP]}: train loss {metrics[m.TRAIN_LOSS]:.4f}, domain ppl "
            f"{metrics[m.DOMAIN_PPL]:.2f}, lr {metrics[m.LR]:.3g}" + (" (pre-decay)" if metrics[m.PRE_DECAY] else "")
            + (f"; {metrics[m.FORGETTING]}" if metrics.get(m.FORGETTING) else ""))

    train(ext.cfg, manifest, keeping_newest_checkpoint(report), checkpoint_root=out, resume_dir=str(resume),
          forgetting_bound=ext.forgetting_bound, on_forgetting=ext.cfg.extend.on_forgetting)
    if not last:  # stopped before writing one: the newest of an earlier attempt, else the trial's
        last = [str(resume)]
    return outcome(ext, last[0], reports)
