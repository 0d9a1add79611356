"""Bounded disk (the config's `checkpoint:` section, raycpt.core.config.CheckpointConfig): a Tune callback that
prunes what trials leave on disk while the sweep runs.

- A running trial keeps optimizer state only in its newest checkpoint, the one a restart resumes from: the older
  checkpoints Ray keeps (the best and the latest, raycpt.edge.policy) lose theirs once a newer one is registered.
- A trial that ended keeps none: finished and ASHA-stopped trials lose it everywhere, and stopped ones their
  weights too (keep_weights: finished; only finished trials can win). A trial that failed past its retries keeps
  its newest checkpoint whole, so `raycpt sweep --resume` can retry it from there, and loses the rest.
- A wsd trial's pre-decay checkpoint (metrics.PRE_DECAY in its metrics.json) stays whole while the sweep runs,
  whatever the trial's fate; once the sweep is analysed, `prune_pre_decay` keeps it for the trials
  `checkpoint.keep_pre_decay` names (the winner by default: `raycpt extend` continues from it) and removes the rest.

Both layouts: one-worker trials checkpoint into their Tune trial dir (<exp>/tune/<trial>/checkpoint_*),
multi-worker ones through Ray Train (<exp>/trials/trial_<id>/checkpoint_*). What is removed from a checkpoint,
and how, is raycpt.core.train.checkpoint's (`strip_optimizer`, `remove_weights`): this module decides when and where.

A change waits for Tune's next experiment-state snapshot (Tune calls `get_state` while saving it): a driver killed
before then resumes its trials from the checkpoints that snapshot lists, which still hold their optimizer state.
The file work runs on one background thread, so the Tune loop never waits on a large rewrite.
"""

from __future__ import annotations

import functools
import logging
import pickle
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ray.tune import Callback

from raycpt.core import metrics
from raycpt.core.config import CheckpointConfig
from raycpt.core.extend import trial_checkpoint_dirs
from raycpt.core.train.checkpoint import (
    CHECKPOINT_GLOB,
    checkpoint_step,
    dir_bytes,
    is_pre_decay,
    remove_weights,
    strip_optimizer,
)

TRIALS_DIR = "trials"
"""Ray Train runs of multi-worker trials inside the experiment dir (raycpt.edge.tune.TRIALS_DIR)."""

log = logging.getLogger("raycpt")


def trial_dirs(exp_dir: str | Path, trial_id: str, trial_path: str | None) -> list[Path]:
    """Where a trial's checkpoints live: its Tune trial dir and, for a multi-worker trial, its Ray Train run."""
    dirs = [Path(trial_path)] if trial_path else []
    return [*dirs, Path(exp_dir) / TRIALS_DIR / f"trial_{trial_id}"]


def checkpoints(dirs: list[Path]) -> list[Path]:
    """Every complete checkpoint (one with its metrics.json) in `dirs`, oldest first."""
    found = [p for d in dirs if d.is_dir() for p in d.glob(CHECKPOINT_GLOB) if p.is_dir()]
    stepped = [(checkpoint_step(p), p) for p in found]
    return [p for step, p in sorted((s, p) for s, p in stepped if s is not None)]


def prune_running(dirs: list[Path], newest: str | Path) -> int:
    """A running trial: strip the optimizer from every checkpoint older than `newest`, the one a restart resumes
    from (checkpoints newer than it may still be in flight: left alone)."""
    newest_step = checkpoint_step(Path(newest))
    if newest_step is None:
        return 0
    return sum(strip_optimizer(p) for p in checkpoints(dirs) if checkpoint_step(p) < newest_step
               and not is_pre_decay(p))


def prune_ended(dirs: list[Path], policy: CheckpointConfig, *, finished: bool, failed: bool,
                newest: str | Path | None = None) -> int:
    """A trial that ended: see the module docstring. `newest`: a failed trial's latest registered checkpoint."""
    freed = 0
    keep = Path(newest).resolve() if failed and newest else None
    for path in checkpoints(dirs):
        if (keep is not None and path.resolve() == keep) or is_pre_decay(path):  # pre-decay: prune_pre_decay
            continue
        if policy.keep_optimizer == "latest":
            freed += strip_optimizer(path)
        if not finished and policy.keep_weights != "all":
            freed += remove_weights(path)
    return freed


def pre_decay_keepers(policy: CheckpointConfig, winner: str | None, order: list[str]) -> set[str]:
    """The trial ids whose pre-decay checkpoint `checkpoint.keep_pre_decay` keeps after analysis (`order`: trial
    ids, best first under the selection rule)."""
    if policy.keep_pre_decay == "winner":
        return {winner} if winner else set()
    if policy.keep_pre_decay == "top_k":
        return set(order[:policy.keep_pre_decay_k]) | ({winner} if winner else set())
    return set()


def prune_pre_decay(exp_dir: str | Path, trials: list[dict[str, Any]], policy: CheckpointConfig,
                    winner: str | None, order: list[str]) -> dict[str, Any]:
    """After the sweep is analysed: remove the pre-decay checkpoints of the trials `checkpoint.keep_pre_decay` does
    not keep (`trials`: rows with trial_id and path). Returns {"kept": {trial id: path}, "removed": n, "freed":
    bytes, "freed_by_trial": {trial id: bytes}}."""
    keep_all = policy.keep_pre_decay == "all"
    keepers = pre_decay_keepers(policy, winner, order)
    kept, removed, freed_by_trial = {}, 0, {}
    for trial in trials:
        found = checkpoints(trial_checkpoint_dirs(exp_dir, trial["trial_id"], trial.get("path")))
        for path in (p for p in found if is_pre_decay(p)):
            if keep_all or trial["trial_id"] in keepers:
                kept[trial["trial_id"]] = str(path)
                continue
            if path == found[-1]:  # also the trial's last checkpoint (it stopped there): only its optimizer goes
                size = strip_optimizer(path)
            else:
                size = dir_bytes(path)
                shutil.rmtree(path, ignore_errors=True)
            removed += 1
            freed_by_trial[trial["trial_id"]] = freed_by_trial.get(trial["trial_id"], 0) + size
    return {"kept": kept, "removed": removed, "freed": sum(freed_by_trial.values()),
            "freed_by_trial": freed_by_trial}


def _safely(job: Callable[[], int], what: str) -> None:
    try:
        freed = job()
        if freed:
            log.debug("checkpoint policy: %s freed %d bytes", what, freed)
    except (OSError, RuntimeError, ValueError, pickle.UnpicklingError) as err:
        # Ray may remove a checkpoint while it is pruned; the next pass (or the sweep's end) catches up
        log.warning("checkpoint policy: %s: %s", what, err)


class DiskPolicy(Callback):
    """Applies `cfg.checkpoint` to the sweep's trials (see the module docstring). Picklable: Tune saves it with the
    Tuner and restores it with `raycpt sweep --resume`."""

    def __init__(self, exp_dir: str | Path, policy: CheckpointConfig) -> None:
        self.exp_dir, self.policy = str(exp_dir), policy
        self._waiting: list[tuple[Callable[[], int], str]] = []  # until the next experiment-state snapshot
        self._ready: list[tuple[Callable[[], int], str]] = []
        self._executor: ThreadPoolExecutor | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_waiting": [], "_ready": [], "_executor": None}

    def _dirs(self, trial) -> list[Path]:
        return trial_dirs(self.exp_dir, trial.trial_id, trial.path)

    def _newer(self, trial, newest: str) -> None:
        if self.policy.keep_optimizer == "latest":
            self._waiting.append((functools.partial(prune_running, self._dirs(trial), newest),
                                  f"trial {trial.trial_id}"))

    def _ended(self, trial, *, failed: bool) -> tuple[Callable[[], int], str]:
        last = trial.last_result or {}
        newest = trial.checkpoint.path if trial.checkpoint else last.get(metrics.CHECKPOINT_PATH)
        return (functools.partial(prune_ended, self._dirs(trial), self.policy, finished=bool(last.get(
            metrics.FINISHED)), failed=failed, newest=newest), f"ended trial {trial.trial_id}")

    # one-worker trials: Tune has registered the trial's new checkpoint
    def on_trial_save(self, iteration: int, trials: list, trial, **info) -> None:
        if trial.checkpoint is not None:
            self._newer(trial, trial.checkpoint.path)

    # multi-worker trials: the result names the checkpoint Ray Train has registered
    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        if result.get(metrics.CHECKPOINT_PATH):
            self._newer(trial, result[metrics.CHECKPOINT_PATH])

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._waiting.append(self._ended(trial, failed=False))

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._waiting.append(self._ended(trial, failed=True))

    def get_state(self) -> dict | None:
        # Tune is saving its experiment state, which lists every checkpoint registered so far: from here on a
        # resumed sweep restarts trials from those, so the older ones may go.
        self._ready += self._waiting
        self._waiting = []
        return None

    def on_step_begin(self, iteration: int, trials: list, **info) -> None:
        if self._ready:
            self._executor = self._executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="raycpt-disk")
            for job, what in self._ready:
                self._executor.submit(_safely, job, what)
            self._ready = []

    def on_experiment_end(self, trials: list, **info) -> None:
        """Every trial has ended: finish the queued work, then one pass over every ended trial (a checkpoint still
        being written when its trial was stopped is caught here)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        jobs = [*self._ready, *self._waiting]
        self._ready, self._waiting = [], []
        jobs += [self._ended(t, failed=t.status == "ERROR") for t in trials if t.status in ("TERMINATED", "ERROR")]
        for job, what in jobs:
            _safely(job, what)
