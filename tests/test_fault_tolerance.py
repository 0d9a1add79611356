"""A training worker killed mid-run (by its pid) is restarted from the last checkpoint: the trial finishes, redoes at
most eval_every steps, and ends where an uninterrupted run ends. The kill is deterministic: the loop waits after its
first checkpoint until it is killed. Here the one-worker sweep trial (Tune's FailureConfig, HF checkpoints); a
killed Ray Train worker (Ray Train's FailureConfig, sharded checkpoints) is tests/test_fsdp.py's, which reuses this
file's kill machinery."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from raycpt.core.config import config_from_dict
from raycpt.core.prepare import prepare_experiment
from raycpt.edge.worker import PAUSE_ENV


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


def _kill_when_paused(pause_dir: Path, registered_steps, storage: Path, killed: dict, stop: threading.Event
                      ) -> None:
    """Deterministic fault injection (raycpt.edge.worker.PAUSE_ENV): the loop holds after its first checkpoint
    until released, so it cannot finish first whatever the machine's speed. Once Ray has registered that
    checkpoint, SIGKILL the paused process by its pid, then release the hook."""
    paused = pause_dir / "paused"
    while not stop.is_set():
        if paused.exists():
            with contextlib.suppress(ValueError):  # still being written
                info = json.loads(paused.read_text())
                if info["step"] in registered_steps(storage):
                    os.kill(info["pid"], signal.SIGKILL)
                    killed.update(info)
                    break
        time.sleep(0.05)
    (pause_dir / "release").touch()  # also frees a loop that was never killed (the test then fails on `killed`)


@contextlib.contextmanager
def _ray_with_kill_watcher(tmp_path: Path, registered_steps, storage: Path) -> Iterator[dict]:
    """Local Ray whose workers pause after their first checkpoint, and a watcher that kills the paused one. The
    watcher is stopped and joined before Ray shuts down."""
    import ray

    pause_dir = tmp_path / "pause"
    pause_dir.mkdir()
    killed: dict = {}
    stop = threading.Event()
    watcher = threading.Thread(target=_kill_when_paused, args=(pause_dir, registered_steps, storage, killed, stop),
                               daemon=True)
    ray.init(num_cpus=2, include_dashboard=True, log_to_driver=False,
             runtime_env={"env_vars": {PAUSE_ENV: str(pause_dir)}})
    watcher.start()
    try:
        yield killed
    finally:
        stop.set()
        watcher.join()
        ray.shutdown()


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
def test_one_worker_trial_killed_mid_run_resumes_and_matches_uninterrupted(corpora, tiny_gpt2_dir, tmp_path):
    """The sweep's one-worker path (the loop in the Tune trial, no TorchTrainer): Tune's FailureConfig restarts the
    killed trial from its latest checkpoint and it ends where a run without Ray ends."""

    from raycpt.core.train.loop import train
    from raycpt.edge.ray_output import logger_callbacks
    from raycpt.edge.tune import build_tuner

    cfg = _config("ft1", 50, corpora, tiny_gpt2_dir, tmp_path,
                  search={"space": {"train.lr": {"choice": [3e-3]}}, "num_samples": 1, "scheduler": "none"})
    manifest = prepare_experiment(cfg)
    exp_dir = tmp_path / "ft1"
    exp_dir.mkdir()
    with _ray_with_kill_watcher(tmp_path, _reported_steps, exp_dir) as killed:
        grid = build_tuner(cfg, manifest, exp_dir, concurrency=1, callbacks=logger_callbacks(cfg)).fit()
    assert killed.get("pid"), "the trial was never killed"
    (result,) = list(grid)
    assert result.error is None
    last = result.metrics
    assert last["step"] == 50 and last["restarts"] == 1
    assert last["resumed_from_step"] >= killed["step"] >= 10
    torch.set_num_threads(1)  # the trial's thread count: same reductions, same numbers
    clean = train(cfg, manifest, lambda m, c: None, checkpoint_root=tmp_path / "clean")
    torch.testing.assert_close(last["eval/domain_loss"], clean["eval/domain_loss"], rtol=1e-4, atol=0)
    torch.testing.assert_close(last["train/loss"], clean["train/loss"], rtol=1e-3, atol=0)
    assert result.checkpoint is not None and (Path(result.checkpoint.path) / "model.safetensors").exists()
