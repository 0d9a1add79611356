"""Ray Train: one CPT trial on 1..N workers. A thin wrapper: the loop itself is `raycpt.train.train`.

The Ray lines are few: [1] rebuild the config, [2] get a checkpoint to resume from, [3] prepare the model (DDP,
device), [4] report metrics + checkpoint from every rank (rank 0 alone writes the checkpoint), [5] launch.
[6] A sweep trial with one worker skips the TorchTrainer: the loop runs in the Tune trial itself, with Tune's
checkpoint manager and FailureConfig in Ray Train's place (no controller or worker actor to start: ~16 s and
~1 GiB less per trial, benchmarks/RESULTS.md).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from raycpt.config import ExperimentConfig, config_from_dict, to_dict
from raycpt.errors import InputError
from raycpt.files import write_json

PLACEMENT_FILE = "ray_placement.json"
"""Written by rank 0 into every checkpoint: which Ray node trained it (clusters: did work land where expected?)."""


def ddp_kwargs() -> dict[str, Any]:
    """DistributedDataParallel arguments: no buffer broadcast in forward.

    The buffers of causal LMs (rotary `inv_freq`, causal masks) are constants, equal on every rank since every
    rank loads the same weights. DDP's default re-broadcasts them at the start of a forward that follows a
    training forward, which is a collective: when held-out eval gives a rank no block at all (fewer held-out
    blocks than workers), rank 0's broadcast meets the other rank's all-reduce and the group hangs (seen with a
    Llama on 2 workers and 1 held-out block; tests/test_ddp.py)."""
    from torch.nn.parallel import DistributedDataParallel

    # torch 2.13 renamed the flag; older releases only know the deprecated one.
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def check_data_visible(data: dict[str, Any], node: str) -> None:
    """Fail with the fix when this node cannot read the prepared blocks: on a cluster they must sit on a
    filesystem every node mounts at the same path (RAYCPT_CACHE), since the driver prepared them on its node."""
    for corpus in ("domain", "general"):
        for split in ("train", "heldout"):
            path = (data.get(corpus) or {}).get(split)
            if path and not os.path.exists(path):
                raise InputError(f"node {node}: prepared {corpus} blocks {path} not found; on a multi-node cluster "
                                 "set RAYCPT_CACHE to a shared filesystem mounted at the same path on every node "
                                 "(see docs/cluster.md)")


def train_fn_per_worker(train_loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    # [1] Rebuild the config
    cfg = config_from_dict(train_loop_config["cfg"])
    context = ray.train.get_context()
    world_size, rank = context.get_world_size(), context.get_world_rank()

    def wrap_model(model):
        # [3] DDP wrapper and device placement from Ray Train (one worker needs no wrapper)
        if world_size == 1:
            return model
        return ray.train.torch.prepare_model(model, parallel_strategy="ddp", parallel_strategy_kwargs=ddp_kwargs())

    # [2] A checkpoint exists when Ray Train restarts workers after a failure: resume from it.
    # [4] Every rank reports (Ray Train requires it).
    _run_loop(cfg, train_loop_config["data"], ray.train.report, ray.train.Checkpoint, ray.train.get_checkpoint(),
              rank=rank, world_size=world_size, device=ray.train.torch.get_device(), wrap_model=wrap_model)


def train_in_trial(cfg: ExperimentConfig, data: dict[str, Any]) -> dict[str, Any]:
    """[6] One worker, no TorchTrainer: the loop in this Tune trial, which holds the worker's resources
    (sweep.build_trainable). Resumes from Tune's latest checkpoint after a failure or a restored sweep."""
    import torch
    from ray import tune

    # Tune sets CUDA_VISIBLE_DEVICES to the trial's GPU
    device = torch.device("cuda" if cfg.resources.use_gpu and torch.cuda.is_available() else "cpu")
    return _run_loop(cfg, data, tune.report, tune.Checkpoint, tune.get_checkpoint(), rank=0, world_size=1,
                     device=device)


def _run_loop(cfg: ExperimentConfig, data: dict[str, Any], report_fn, checkpoint_cls, checkpoint, *, rank: int,
              world_size: int, device, wrap_model=lambda model: model) -> dict[str, Any]:
    """The loop inside Ray (a Ray Train worker or a Tune trial; `report_fn`/`checkpoint_cls` are that API's):
    one torch thread per CPU held (oversubscription slows CPU training), resume from `checkpoint` when Ray hands
    one back, and report each checkpoint with the node that trained it; Ray's checkpoint manager copies it to
    storage, then the local copy is removed."""
    import ray
    import torch

    from raycpt.train import train

    torch.set_num_threads(max(1, round(cfg.resources.cpus_per_worker)))
    node_ip = ray.util.get_node_ip_address()
    check_data_visible(data, node_ip)
    placement = {"rank": rank, "world_size": world_size, "node_id": ray.get_runtime_context().get_node_id(),
                 "node_ip": node_ip}

    def report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        if checkpoint_dir:  # rank 0 only
            write_json(Path(checkpoint_dir) / PLACEMENT_FILE, placement)
        report_fn(metrics, checkpoint=checkpoint_cls.from_directory(checkpoint_dir) if checkpoint_dir else None)
        if checkpoint_dir:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)

    with tempfile.TemporaryDirectory(prefix="raycpt-ckpt-") as root, \
            (checkpoint.as_directory() if checkpoint else contextlib.nullcontext(None)) as resume_dir:
        return train(cfg, data, report, checkpoint_root=root, resume_dir=resume_dir, rank=rank,
                     world_size=world_size, device=device, wrap_model=wrap_model)


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
