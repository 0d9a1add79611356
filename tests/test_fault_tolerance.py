"""A training worker killed mid-run (by its pid) is restarted by Ray Train's FailureConfig from the last
checkpoint: the trial finishes, redoes at most eval_every steps, and ends where an uninterrupted run ends."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from raycpt.config import config_from_dict
from raycpt.prepare import prepare_experiment


def _registered_steps(storage) -> list[int]:
    """Steps of the checkpoints Ray Train has registered (listed in its checkpoint manager snapshot)."""
    steps = []
    for snapshot in storage.rglob("checkpoint_manager_snapshot.json"):
        text = snapshot.read_text(errors="replace")
        for metrics in snapshot.parent.glob("checkpoint_*/metrics.json"):
            if metrics.parent.name in text:
                try:
                    steps.append(json.loads(metrics.read_text())["step"])
                except (OSError, ValueError, KeyError):
                    continue  # still being written
    return steps


def _reported_steps(storage) -> list[int]:
    """Steps a Tune trial has reported (every report carries a checkpoint, persisted before the result is logged)."""
    steps = []
    for results in storage.rglob("result.json"):
        for line in results.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError, KeyError):
                steps.append(json.loads(line)["step"])
    return steps


def _kill_after_first_checkpoint(actor_class: str, checkpointed_steps, storage, killed: dict) -> None:
    """SIGKILL the process of the live `actor_class` actor (by pid) once a checkpoint is registered, recording the
    newest checkpointed step at that moment."""
    from ray.util.state import list_actors

    deadline, pid = time.time() + 180, None
    while time.time() < deadline:
        if pid is None:
            actors = list_actors(filters=[("class_name", "=", actor_class), ("state", "=", "ALIVE")])
            pid = actors[0]["pid"] if actors else None
        elif steps := checkpointed_steps(storage):
            killed["newest_checkpoint_step"] = max(steps)
            os.kill(pid, signal.SIGKILL)
            killed["pid"] = pid
            return
        time.sleep(0.05)


def _config(name: str, steps: int, corpora, tiny_gpt2_dir, tmp_path, **sections):
    """Tiny GPT-2, one worker of one CPU, a report + checkpoint every 10 steps."""
    return config_from_dict({
        "name": name, "storage_path": str(tmp_path),
        "model": {"source": tiny_gpt2_dir},
        "data": {"domain": corpora["domain"], "general": corpora["general"], "block_size": 32,
                 "heldout_fraction": 0.1, "heldout_blocks": 4},
        "train": {"lr": 3e-3, "steps": steps, "batch_size": 4, "eval_every": 10, "warmup_steps": 2},
        "resources": {"num_workers": 1, "cpus_per_worker": 1},
        **sections,
    })


@pytest.mark.e2e
def test_worker_killed_mid_run_resumes_and_matches_uninterrupted(corpora, tiny_gpt2_dir, tmp_path):
    import ray

    from raycpt.distributed import build_trainer

    cfg = _config("ft", 150, corpora, tiny_gpt2_dir, tmp_path)
    manifest = prepare_experiment(cfg)
    ray.init(num_cpus=2, include_dashboard=True, log_to_driver=False)
    try:
        killed: dict = {}
        storage = tmp_path / "interrupted"
        watcher = threading.Thread(target=_kill_after_first_checkpoint,
                                   args=("RayTrainWorker", _registered_steps, storage, killed), daemon=True)
        watcher.start()
        interrupted = build_trainer(cfg, manifest, storage_path=storage, name="run").fit()
        watcher.join(timeout=5)
        clean = build_trainer(cfg, manifest, storage_path=tmp_path / "clean", name="run").fit()
    finally:
        ray.shutdown()
    assert killed.get("pid"), "the worker was never killed: the run ended before its first checkpoint"
    last = interrupted.metrics
    assert last["step"] == 150 and last["restarts"] == 1
    # resumed from the newest checkpoint at the kill: at most eval_every steps redone, none skipped (the data
    # position is a function of the step, restored with the model, optimizer and scheduler)
    assert last["resumed_from_step"] >= killed["newest_checkpoint_step"] >= 10
    torch.testing.assert_close(last["eval/domain_loss"], clean.metrics["eval/domain_loss"], rtol=1e-4, atol=0)
    torch.testing.assert_close(last["train/loss"], clean.metrics["train/loss"], rtol=1e-3, atol=0)


@pytest.mark.e2e
def test_one_worker_trial_killed_mid_run_resumes_and_matches_uninterrupted(corpora, tiny_gpt2_dir, tmp_path):
    """The sweep's one-worker path (the loop in the Tune trial, no TorchTrainer): Tune's FailureConfig restarts the
    killed trial from its latest checkpoint and it ends where a run without Ray ends."""
    import ray

    from raycpt.report import logger_callbacks
    from raycpt.sweep import build_tuner
    from raycpt.train import train

    cfg = _config("ft1", 100, corpora, tiny_gpt2_dir, tmp_path,
                  search={"space": {"train.lr": {"choice": [3e-3]}}, "num_samples": 1, "scheduler": "none"})
    manifest = prepare_experiment(cfg)
    exp_dir = tmp_path / "ft1"
    exp_dir.mkdir()
    ray.init(num_cpus=2, include_dashboard=True, log_to_driver=False)
    try:
        killed: dict = {}
        watcher = threading.Thread(target=_kill_after_first_checkpoint,
                                   args=("ImplicitFunc", _reported_steps, exp_dir, killed), daemon=True)
        watcher.start()
        grid = build_tuner(cfg, manifest, exp_dir, concurrency=1, callbacks=logger_callbacks(cfg)).fit()
        watcher.join(timeout=5)
    finally:
        ray.shutdown()
    assert killed.get("pid"), "the trial was never killed: it ended before its first report"
    (result,) = list(grid)
    assert result.error is None
    last = result.metrics
    assert last["step"] == 100 and last["restarts"] == 1
    assert last["resumed_from_step"] >= killed["newest_checkpoint_step"] >= 10
    torch.set_num_threads(1)  # the trial's thread count: same reductions, same numbers
    clean = train(cfg, manifest, lambda m, c: None, checkpoint_root=tmp_path / "clean")
    torch.testing.assert_close(last["eval/domain_loss"], clean["eval/domain_loss"], rtol=1e-4, atol=0)
    torch.testing.assert_close(last["train/loss"], clean["train/loss"], rtol=1e-3, atol=0)
    assert result.checkpoint is not None and (Path(result.checkpoint.path) / "model.safetensors").exists()
