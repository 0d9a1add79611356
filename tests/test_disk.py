"""Bounded disk (`checkpoint:` policy, raycpt.edge.disk): only a running trial's newest checkpoint keeps optimizer
state, ended trials keep none, ASHA-stopped trials keep no weights, and what is stripped still loads: the unit
tests on real checkpoints of both formats (HF + trainer_state.pt, and sharded DCP), the e2e test on the smoke
sweep's experiment dir."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from raycpt.core.config import CheckpointConfig, config_from_dict
from raycpt.core.model.loading import load_model
from raycpt.core.train.checkpoint import (
    STATE_FILE,
    TrainState,
    dir_bytes,
    has_optimizer,
    has_weights,
    load_checkpoint_model,
    save_checkpoint,
    strip_optimizer,
)
from raycpt.core.train.loop import build_optimizer, build_scheduler
from raycpt.edge.disk import checkpoints, prune_ended, prune_running, trial_dirs
from raycpt.edge.policy import CHECKPOINTS_KEPT
from raycpt.edge.staging import remove_orphans


def _save(tiny_gpt2_dir: str, root: Path, steps: list[int], strategy: str = "ddp") -> list[Path]:
    """Real checkpoints of the tiny GPT-2 after one AdamW step (so the optimizer has state), as the loop saves."""
    cfg = config_from_dict({"model": {"source": tiny_gpt2_dir}, "data": {"domain": "x"}, "train": {"mix_ratio": 1},
                            "resources": {"strategy": strategy}})
    model = load_model(tiny_gpt2_dir)
    optimizer = build_optimizer(model, 1e-3, 0.0, torch.device("cpu"))
    scheduler = build_scheduler(optimizer, 1, 10, 0.1)
    model(input_ids=torch.arange(16).view(1, 16), labels=torch.arange(16).view(1, 16)).loss.backward()
    optimizer.step()
    paths = []
    for step in steps:
        path = root / f"checkpoint_{step:06d}"
        save_checkpoint(path, model, TrainState(step=step), optimizer, scheduler, cfg, {"step": step})
        paths.append(path)
    return paths


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_stripping_the_optimizer_keeps_a_loadable_checkpoint(tiny_gpt2_dir, tmp_path, strategy):
    (path,) = _save(tiny_gpt2_dir, tmp_path, [5], strategy)
    before, weights = dir_bytes(path), load_checkpoint_model(path).state_dict()
    assert has_optimizer(path)
    freed = strip_optimizer(path)
    assert not has_optimizer(path) and has_weights(path)
    weight_bytes = sum(v.numel() * v.element_size() for v in load_model(tiny_gpt2_dir).parameters())
    assert freed >= 1.9 * weight_bytes  # AdamW's two moments, as large as the fp32 weights each
    assert dir_bytes(path) == before - freed
    for key, value in load_checkpoint_model(path).state_dict().items():
        torch.testing.assert_close(value, weights[key], rtol=0, atol=0)
    assert "state" in torch.load(path / STATE_FILE, weights_only=True)  # step, RNG, scheduler stay
    assert strip_optimizer(path) == 0  # idempotent


def test_running_trial_keeps_optimizer_in_its_newest_checkpoint_only(tiny_gpt2_dir, tmp_path):
    trial = tmp_path / "tune" / "trial_a"
    old, best, newest, in_flight = _save(tiny_gpt2_dir, trial, [6, 12, 18, 24])
    prune_running([trial], newest)
    assert [has_optimizer(p) for p in (old, best, newest, in_flight)] == [False, False, True, True]
    assert checkpoints([trial]) == [old, best, newest, in_flight]


@pytest.mark.parametrize("finished, failed, weights_left", [(True, False, 2), (False, False, 0), (False, True, 1)],
                         ids=["finished", "stopped", "failed"])
def test_ended_trial_keeps_no_optimizer_and_stopped_ones_no_weights(tiny_gpt2_dir, tmp_path, finished, failed,
                                                                     weights_left):
    # a multi-worker trial's Ray Train run (<exp>/trials/trial_<id>) as the other layout
    dirs = trial_dirs(tmp_path, "b", None)
    best, newest = _save(tiny_gpt2_dir, dirs[0], [6, 12])
    prune_ended(dirs, CheckpointConfig(), finished=finished, failed=failed, newest=newest)
    assert sum(has_weights(p) for p in (best, newest)) == weights_left
    # a failed trial keeps its newest checkpoint whole, so `raycpt sweep --resume` can retry it from there
    assert [has_optimizer(p) for p in (best, newest)] == [False, failed]
    assert (newest / "metrics.json").exists()  # what the report reads stays


@pytest.mark.e2e
def test_smoke_sweep_disk_is_bounded(smoke_sweep):
    from raycpt.results.render import report_json

    cfg, summary = smoke_sweep
    exp_dir = cfg.experiment_dir()
    weights = (exp_dir / "export" / "model.safetensors").stat().st_size  # the tiny model's weights
    trials = {t["trial_id"]: t for t in summary.trials}
    by_status = {status: [t for t in trials.values() if t["status"] == status] for status in ("finished", "stopped")}
    assert by_status["finished"] and by_status["stopped"]  # ASHA stopped the tiny-lr trial

    def trial_checkpoints(trial):
        return checkpoints(trial_dirs(exp_dir, trial["trial_id"], trial["path"]))

    every = [p for t in trials.values() for p in trial_checkpoints(t)]
    assert every and not [p for p in every if has_optimizer(p)]  # no optimizer state once the sweep has ended
    assert not [p for t in by_status["stopped"] for p in trial_checkpoints(t) if has_weights(p)]
    with_weights = [p for p in every if has_weights(p)]
    # Ray keeps the best and the latest checkpoint of a trial; only finished trials keep their weights
    assert len(with_weights) <= (CHECKPOINTS_KEPT + 1) * len(by_status["finished"])
    # The bound: one copy of the weights per kept checkpoint, one for the export, and one more for everything
    # else (configs, metrics, logs, the tokenizer, plots). Without the policy each of the 4 checkpoints a trial
    # writes until ASHA stops it, and each kept one, would also hold AdamW's 2 x the weights.
    checkpoint_bytes = sum(dir_bytes(p) for p in every)
    assert checkpoint_bytes <= weights * len(with_weights) + weights / 10 * len(every)
    assert summary.experiment_dir_bytes <= weights * (len(with_weights) + 2)


    report = report_json(summary)
    assert report["disk"]["experiment_bytes"] == summary.experiment_dir_bytes
    rows = {row["trial_id"]: row for row in report["trials"]}
    assert report["disk"]["trials_bytes"] == sum(row["disk_bytes"] for row in rows.values())
    for trial in by_status["stopped"]:
        assert 0 < rows[trial["trial_id"]]["disk_bytes"] < weights / 10
    for trial in by_status["finished"]:
        assert rows[trial["trial_id"]]["disk_bytes"] >= weights


@pytest.mark.e2e
def test_stopped_trials_leave_no_staged_checkpoint_on_the_node(smoke_sweep, node_tmp):
    # ASHA ends a stopped trial inside its report, before it removes its staged copy of that checkpoint: without
    # the cleanup every stopped trial left a whole model in the node's temp dir, for good
    _, summary = smoke_sweep
    assert any(t["status"] == "stopped" for t in summary.trials)
    assert not [p for p in node_tmp.iterdir() if p.name.startswith("raycpt-ckpt-")]


def test_only_staging_dirs_of_exited_processes_are_removed(tmp_path):
    import subprocess
    import sys

    exited = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                            text=True, check=True)
    gone = tmp_path / f"raycpt-ckpt-{int(exited.stdout)}-abc"
    ours = tmp_path / f"raycpt-ckpt-{os.getpid()}-def"
    other_live = tmp_path / "raycpt-ckpt-1-ghi"  # pid 1 lives as long as the machine
    unrelated = tmp_path / "someone-else-123"
    for path in (gone, ours, other_live, unrelated):
        (path / "checkpoint_000001").mkdir(parents=True)
        (path / "checkpoint_000001" / "model.safetensors").write_bytes(b"x" * 1000)
    assert remove_orphans(tmp_path) == 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (ours, other_live, unrelated))
