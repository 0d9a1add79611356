"""Multi-worker DDP on CPU (gloo) trains the same model as one worker with the same global batch.

One worker with batch_size 4 and two workers with batch_size 2 draw the same blocks at every step
(`data.worker_positions` gives each rank a disjoint slice of the same global plan) and DDP averages the two
half-batch gradients, so the loss trajectories may differ only by float summation order. The held-out set has
an odd number of blocks, so ranks score unequal shards (and the Llama run, whose rotary buffers DDP would
re-broadcast at every forward, shows eval does not desynchronise the ranks).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from raycpt.config import config_from_dict
from raycpt.prepare import prepare_experiment

HELDOUT_BLOCKS = 5  # odd: with 2 ranks x batch 2, rank 0 scores 2 batches and rank 1 scores 1
STEPS, EVAL_EVERY, GLOBAL_BATCH = 8, 2, 4
RTOL = 1e-4  # observed: ~1e-6 relative (float32 summation order); far below a one-step change in loss


def experiment(source: str, corpora: dict[str, str], storage: Path, num_workers: int,
               heldout_blocks: int = HELDOUT_BLOCKS) -> dict[str, Any]:
    return {
        "name": f"ddp-{num_workers}", "storage_path": str(storage),
        "model": {"source": source},
        "data": {"domain": corpora["domain"], "general": corpora["general"], "block_size": 32,
                 "heldout_fraction": 0.1, "heldout_blocks": heldout_blocks},
        "train": {"lr": 3e-3, "warmup_steps": 2, "steps": STEPS, "eval_every": EVAL_EVERY, "mix_ratio": 0.7,
                  "batch_size": GLOBAL_BATCH // num_workers, "precision": "fp32"},
        "resources": {"num_workers": num_workers, "cpus_per_worker": 1},
    }


def run_reports(raw: dict[str, Any], storage: Path) -> list[list[dict[str, Any]]]:
    """Fit one TorchTrainer; every report's metrics from every rank, in order (recorded on the controller)."""
    from ray.train import UserCallback

    from raycpt.distributed import build_trainer

    class ReportLog(UserCallback):
        """Appends each report (all ranks' metrics) as one JSON line; runs in the Train controller process."""

        def __init__(self, path: str):
            self.path = path

        def after_report(self, run_context, metrics, checkpoint):
            with open(self.path, "a") as fh:
                fh.write(json.dumps(metrics) + "\n")

    cfg = config_from_dict(raw)
    manifest = prepare_experiment(cfg)
    log = storage / f"{cfg.name}.jsonl"
    build_trainer(cfg, manifest, storage_path=storage, name=cfg.name, callbacks=[ReportLog(str(log))]).fit()
    return [json.loads(line) for line in log.read_text().splitlines()]


def assert_same_trajectory(single: list[list[dict]], multi: list[list[dict]]) -> float:
    """Asserts the trajectories match; returns the largest relative difference seen (printed for the record)."""
    assert len(single) == len(multi) == STEPS // EVAL_EVERY
    worst = 0.0
    assert all(len(r) == 1 for r in single) and all(len(r) == 2 for r in multi)
    for (one,), (rank0, rank1) in zip(single, multi, strict=True):
        assert one["step"] == rank0["step"] == rank1["step"]
        assert one["tokens"] == rank0["tokens"]  # same global batch
        assert rank0["data/domain_fraction"] == one["data/domain_fraction"]
        for key in ("train/loss", "eval/domain_loss", "eval/general_loss"):
            worst = max(worst, abs(rank0[key] - one[key]) / abs(one[key]))
            torch.testing.assert_close(rank0[key], one[key], rtol=RTOL, atol=0.0, msg=f"{key} at step {one['step']}")
            # every rank reports the all-reduced value
            torch.testing.assert_close(rank1[key], rank0[key], rtol=1e-12, atol=0.0)
    # the loss moved: a trajectory that matches but never changes would prove nothing
    assert single[-1][0]["train/loss"] < single[0][0]["train/loss"] - 0.05
    return worst


@pytest.fixture()
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=True, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.mark.e2e
@pytest.mark.parametrize("model", ["packaged:tiny-gpt2", "tiny-llama"])
def test_two_workers_match_one_worker_with_same_global_batch(model, corpora, tiny_llama_dir, tmp_path, local_ray):
    source = tiny_llama_dir if model == "tiny-llama" else model
    single = run_reports(experiment(source, corpora, tmp_path, num_workers=1), tmp_path)
    multi = run_reports(experiment(source, corpora, tmp_path, num_workers=2), tmp_path)
    worst = assert_same_trajectory(single, multi)
    print(f"{model}: largest relative difference 1 vs 2 workers: {worst:.2e} (tolerance {RTOL:.0e})")
