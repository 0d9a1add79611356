"""Where the loop runs on Ray: one CPT trial on 1..N workers. A thin wrapper: the loop is `core.train.loop.train`.

The Ray lines are few: [1] rebuild the config, [2] get a checkpoint to resume from, [3] prepare the model (DDP,
device; or FSDP2 shards), [4] report metrics + checkpoint from every rank (ddp: rank 0 alone writes the checkpoint;
fsdp: every rank writes its shard), [5] launch.
[6] A sweep trial with one worker skips the TorchTrainer: the loop runs in the Tune trial itself, with Tune's
checkpoint manager and FailureConfig in Ray Train's place (no controller or worker actor to start: ~16 s and
~1 GiB less per trial, benchmarks/RESULTS.md).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import shutil
import time
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
from ray import tune
from ray.train.torch import TorchTrainer
from torch.nn.parallel import DistributedDataParallel

from raycpt.core import metrics as m
from raycpt.core.config import ExperimentConfig
from raycpt.core.errors import InputError
from raycpt.core.eval.evaluate import autocast_dtype
from raycpt.core.files import write_json
from raycpt.core.model.parallel import apply_fsdp
from raycpt.core.prepare import BASE_METRICS_FILE, Manifest, cached_base, measure_base
from raycpt.core.resources import trial_resources
from raycpt.core.train.loop import train
from raycpt.edge.policy import checkpoint_config, failure_config
from raycpt.edge.staging import remove_orphans, staging_dir

PAUSE_ENV = "RAYCPT_PAUSE_AFTER_FIRST_CHECKPOINT"
"""Fault-injection hook (tests, chaos drills): a directory. After its first checkpointed report, the rank-0 loop
writes `<dir>/paused` (its pid and step) and waits until `<dir>/release` exists or it is killed. Once per dir, so
the restarted attempt runs through; unset, nothing happens."""

PLACEMENT_FILE = "ray_placement.json"
"""Written by rank 0 into every checkpoint: which Ray node trained it (clusters: did work land where expected?)."""


def ddp_kwargs() -> dict[str, Any]:
    """DistributedDataParallel arguments: no buffer broadcast in forward.

    The buffers of causal LMs (rotary `inv_freq`, causal masks) are constants, equal on every rank since every
    rank loads the same weights. DDP's default re-broadcasts them at the start of a forward that follows a
    training forward, which is a collective: when held-out eval gives a rank no block at all (fewer held-out
    blocks than workers), rank 0's broadcast meets the other rank's all-reduce and the group hangs (seen with a
    Llama on 2 workers and 1 held-out block; tests/test_ddp.py)."""
    # torch 2.13 renamed the flag; older releases only know the deprecated one.
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def check_data_visible(manifest: Manifest, node: str) -> None:
    """Fail with the fix when this node cannot read the prepared blocks: on a cluster they must sit on a
    filesystem every node mounts at the same path (RAYCPT_CACHE), since the driver prepared them on its node."""
    for corpus_name, corpus in (("domain", manifest.domain), ("general", manifest.general),
                                ("synthetic", manifest.synthetic)):
        for split, path in ((("train", corpus.train), ("heldout", corpus.heldout)) if corpus else ()):
            if not os.path.exists(path):
                raise InputError(f"node {node}: prepared {corpus_name} {split} blocks {path} not found; on a "
                                 "multi-node cluster set RAYCPT_CACHE to a shared filesystem mounted at the same path "
                                 "on every node "
                                 "(see docs/cluster.md)")


def train_fn_per_worker(train_loop_config: dict[str, Any]) -> None:
    # [1] Rebuild the config
    cfg: ExperimentConfig = train_loop_config["cfg"]  # the trial's typed config, as the driver built it
    context = ray.train.get_context()
    world_size, rank = context.get_world_size(), context.get_world_rank()

    def wrap_model(model):
        # [3] DDP wrapper and device placement from Ray Train (one worker needs no wrapper). FSDP2: Ray Train
        # gives the process group and the device (the loop already moved the model there); shard it in place.
        if world_size == 1:
            return model
        if cfg.resources.strategy == "fsdp":
            device = ray.train.torch.get_device()
            return apply_fsdp(model, cpu_offload=cfg.resources.fsdp_cpu_offload,
                              mixed_precision=device.type == "cuda"
                              and autocast_dtype(cfg.train.precision, device) == torch.bfloat16)
        return ray.train.torch.prepare_model(model, parallel_strategy="ddp", parallel_strategy_kwargs=ddp_kwargs())

    # [2] A checkpoint exists when Ray Train restarts workers after a failure: resume from it. Else a run may
    # start from a given one (`raycpt extend`: a trial's pre-decay checkpoint, on storage every worker reads).
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and train_loop_config.get("resume_from"):
        checkpoint = ray.train.Checkpoint.from_directory(train_loop_config["resume_from"])
    # [4] Every rank reports (Ray Train requires it).
    _run_loop(cfg, train_loop_config["data"], ray.train.report, ray.train.Checkpoint, checkpoint,
              rank=rank, world_size=world_size, device=ray.train.torch.get_device(), wrap_model=wrap_model,
              forgetting_bound=train_loop_config.get("forgetting_bound"),
              on_forgetting=train_loop_config.get("on_forgetting", "warn"))


def train_in_trial(cfg: ExperimentConfig, data: Manifest) -> dict[str, Any]:
    """[6] One worker, no TorchTrainer: the loop in this Tune trial, which holds the worker's resources
    (raycpt.core.resources). Resumes from Tune's latest checkpoint after a failure or a restored sweep."""
    # Tune sets CUDA_VISIBLE_DEVICES to the trial's GPU
    device = torch.device("cuda" if cfg.resources.use_gpu and torch.cuda.is_available() else "cpu")
    return _run_loop(cfg, data, tune.report, tune.Checkpoint, tune.get_checkpoint(), rank=0, world_size=1,
                     device=device)


def _run_loop(cfg: ExperimentConfig, data: Manifest, report_fn, checkpoint_cls, checkpoint, *, rank: int,
              world_size: int, device, wrap_model=lambda model: model, forgetting_bound: float | None = None,
              on_forgetting: str = "warn") -> dict[str, Any]:
    """The loop inside Ray (a Ray Train worker or a Tune trial; `report_fn`/`checkpoint_cls` are that API's):
    one torch thread per CPU held (oversubscription slows CPU training), resume from `checkpoint` when Ray hands
    one back, and report each checkpoint with the node that trained it; Ray's checkpoint manager copies it to
    storage, then the local copy is removed."""
    torch.set_num_threads(max(1, round(cfg.resources.cpus_per_worker)))
    node_ip = ray.util.get_node_ip_address()
    check_data_visible(data, node_ip)
    placement = {"rank": rank, "world_size": world_size, "node_id": ray.get_runtime_context().get_node_id(),
                 "node_ip": node_ip}

    def report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        # ddp: rank 0 alone has a checkpoint dir. fsdp: every rank has one with its own shard files (sharded/
        # __<rank>_0.distcp; rank 0 also the rest); Ray Train persists each rank's dir into the same storage dir,
        # so together they are one checkpoint ("distributed checkpointing" in Ray Train's checkpoint guide).
        if checkpoint_dir and rank == 0:
            write_json(Path(checkpoint_dir) / PLACEMENT_FILE, placement)
        report_fn(metrics, checkpoint=checkpoint_cls.from_directory(checkpoint_dir) if checkpoint_dir else None)
        if checkpoint_dir:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
            if rank == 0:
                _pause_if_asked(metrics[m.STEP])

    remove_orphans()  # staged checkpoints of trials that were stopped or killed on this node
    with staging_dir() as root, \
            (checkpoint.as_directory() if checkpoint else contextlib.nullcontext(None)) as resume_dir:
        return train(cfg, data, report, checkpoint_root=root, resume_dir=resume_dir, rank=rank,
                     world_size=world_size, device=device, wrap_model=wrap_model, forgetting_bound=forgetting_bound,
                     on_forgetting=on_forgetting)


def measure_base_on_trial_resources(cfg: ExperimentConfig, manifest: Manifest, exp_dir: Path) -> dict[str, Any]:
    """raycpt.core.prepare.measure_base as a Ray task holding one trial worker's resources (its GPU), so the base
    model is scored on the device and in the precision trials use. Cached results return without a task."""
    cached = cached_base(cfg, manifest, exp_dir)
    if cached is not None:
        return cached
    worker = dict(trial_resources(cfg.resources).workers[0] if cfg.resources.num_workers > 1
                  else trial_resources(cfg.resources).driver)
    task = ray.remote(_measure_base_task).options(num_cpus=worker.pop("CPU", 1.0), num_gpus=worker.pop("GPU", 0.0),
                                                  resources=worker or None)
    base = ray.get(task.remote(cfg, manifest, str(exp_dir)))
    write_json(exp_dir / BASE_METRICS_FILE, base)  # here too: a worker node's disk may not be the driver's
    return base


def _measure_base_task(cfg: ExperimentConfig, manifest: Manifest, exp_dir: str) -> dict[str, Any]:
    torch.set_num_threads(max(1, round(cfg.resources.cpus_per_worker)))
    return measure_base(cfg, manifest, Path(exp_dir))


def _pause_if_asked(step: int) -> None:
    """See PAUSE_ENV: hold here after the first checkpoint until a test has killed this process or released it."""
    pause_dir = os.environ.get(PAUSE_ENV)
    if not pause_dir or os.path.exists(os.path.join(pause_dir, "paused")):
        return
    write_json(Path(pause_dir) / "paused", {"pid": os.getpid(), "step": step})
    while not os.path.exists(os.path.join(pause_dir, "release")):
        time.sleep(0.05)


def build_trainer(cfg: ExperimentConfig, data: Manifest, *, storage_path: str | Path, name: str,
                  callbacks: list | None = None, resume_from: str | Path | None = None,
                  forgetting_bound: float | None = None, on_forgetting: str = "warn") -> TorchTrainer:
    """[5] A TorchTrainer for one trial, with the checkpoint and failure policy of raycpt.edge.policy.
    `resume_from`: a checkpoint dir the run starts from (`raycpt extend`: a trial's pre-decay checkpoint); once the
    run has checkpoints of its own, Ray Train restarts it from its latest instead. `forgetting_bound`,
    `on_forgetting`: the loop's forgetting guard (raycpt.core.train.loop.train)."""
    r = cfg.resources
    return TorchTrainer(
        train_fn_per_worker,
        # Train V2 has no resume_from_checkpoint: the start checkpoint travels in the loop's config
        train_loop_config={"cfg": cfg, "data": data, "resume_from": str(resume_from or ""),
                           "forgetting_bound": forgetting_bound, "on_forgetting": on_forgetting},
        scaling_config=ray.train.ScalingConfig(num_workers=r.num_workers, use_gpu=r.use_gpu,
                                               resources_per_worker={"CPU": r.cpus_per_worker,
                                                                     **r.worker_resources}),
        run_config=ray.train.RunConfig(
            name=name, storage_path=str(storage_path), callbacks=callbacks or [],
            checkpoint_config=checkpoint_config(ray.train.CheckpointConfig),
            failure_config=failure_config(ray.train.FailureConfig),
        ),
    )
