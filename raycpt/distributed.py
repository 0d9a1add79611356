"""Ray Train: one CPT trial on 1..N workers. A thin wrapper: the loop itself is `raycpt.train.train`.

The Ray lines are few: [1] rebuild the config, [2] get a checkpoint to resume from, [3] prepare the model (DDP,
device), [4] report metrics + checkpoint from every rank (rank 0 alone writes the checkpoint), [5] launch.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Any

from raycpt.config import ExperimentConfig, config_from_dict, to_dict


def train_fn_per_worker(train_loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    import torch

    from raycpt.train import train

    # [1] Rebuild the config; one torch thread per CPU this worker holds (oversubscription slows CPU training).
    cfg = config_from_dict(train_loop_config["cfg"])
    torch.set_num_threads(max(1, round(cfg.resources.cpus_per_worker)))
    context = ray.train.get_context()
    world_size = context.get_world_size()

    def report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        # [4] Every rank reports (Ray Train requires it); the checkpoint is uploaded to storage, then dropped here.
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)
        if checkpoint_dir:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)

    # [2] A checkpoint exists when Ray Train restarts workers after a failure: resume from it.
    checkpoint = ray.train.get_checkpoint()
    with tempfile.TemporaryDirectory(prefix="raycpt-ckpt-") as root, \
            (checkpoint.as_directory() if checkpoint else contextlib.nullcontext(None)) as resume_dir:
        train(cfg, train_loop_config["data"], report, checkpoint_root=root, resume_dir=resume_dir,
              rank=context.get_world_rank(), world_size=world_size, device=ray.train.torch.get_device(),
              # [3] DDP wrapper and device placement from Ray Train (a no-op wrapper for one worker)
              wrap_model=ray.train.torch.prepare_model if world_size > 1 else (lambda m: m))


def build_trainer(cfg: ExperimentConfig, data: dict[str, Any], *, storage_path: str | Path, name: str,
                  callbacks: list | None = None):
    """[5] A TorchTrainer for one trial, with bounded checkpoints (best by domain ppl + the latest)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    r = cfg.resources
    return TorchTrainer(
        train_fn_per_worker,
        train_loop_config={"cfg": to_dict(cfg), "data": data},
        scaling_config=ray.train.ScalingConfig(num_workers=r.num_workers, use_gpu=r.use_gpu,
                                               resources_per_worker={"CPU": r.cpus_per_worker,
                                                                     **r.worker_resources}),
        run_config=ray.train.RunConfig(
            name=name, storage_path=str(storage_path), callbacks=callbacks or [],
            # Ray Train always keeps the latest checkpoint too, so a restart resumes from the newest state.
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1,
                                                         checkpoint_score_attribute="eval/domain_ppl",
                                                         checkpoint_score_order="min"),
            failure_config=ray.train.FailureConfig(max_failures=2),
        ),
    )
