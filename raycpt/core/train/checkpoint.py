"""Checkpoints: what one is on disk, and everything that writes, reads, recognises, slims or exports one. No Ray.

A checkpoint is one directory, `checkpoint_step<NNNNNN>` (`checkpoint_name`), saved as one unit by
`save_checkpoint` at every eval of the loop (raycpt.core.train.loop). Every format holds, beside its weights:

- `trainer_state.pt` (STATE_FILE, loaded with weights_only=True): the `TrainState` (step, time, early-stopping
  count, restarts, RNG), the scheduler's state and the fp16 loss scaler's; and under ddp the optimizer's state
  (OPTIMIZER_KEY);
- `raycpt_config.json` (raycpt.core.config.CONFIG_FILE): the run's resolved config;
- `metrics.json` (METRICS_FILE): the report the checkpoint was saved with (its step; PRE_DECAY on a wsd run's last
  stable step: the checkpoint `raycpt extend` continues from).

The weights, by format (`resources.strategy`, `train.method`):

- **ddp** (full weights; rank 0 writes): a HF `save_pretrained` dir: `config.json`, `generation_config.json` and
  `model.safetensors` (or `model-0000k-of-0000n.safetensors` + `model.safetensors.index.json`; WEIGHT_GLOBS), so
  the checkpoint loads with `AutoModelForCausalLM.from_pretrained`.
- **fsdp** (every rank writes its shard into its own local dir; Ray merges them into one): torch DCP in `sharded/`
  (SHARDED_DIR: `.metadata` + one `__<rank>_0.distcp` per rank), holding the model ("model." entries) and the
  optimizer ("optim." entries, OPTIM_PREFIX), keyed by parameter name, so it reshards onto any number of workers;
  rank 0 adds the HF `config.json` (and `generation_config.json`). No optimizer in trainer_state.pt.
- **lora** (`train.method: lora`): the PEFT adapter alone, `adapter_model.safetensors` + `adapter_config.json`
  (ADAPTER_WEIGHTS, ADAPTER_CONFIG); the frozen base is the saved config's `model.source`.

Format detection: `is_sharded_checkpoint`, `is_adapter_checkpoint`, `has_weights`. Loading: `load_train_state`
(resume: optimizer, scheduler, scaler, state; a sharded checkpoint's weights too), `load_adapter_weights` (a LoRA
resume), `load_checkpoint_model` (the whole HF model of any format, on CPU). The disk policy (raycpt.edge.disk)
slims checkpoints with `strip_optimizer` and `remove_weights`; the export (raycpt.results.export) writes a checkpoint
of any format as HF safetensors with `write_hf_weights`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import random
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from raycpt.core import metrics as m
from raycpt.core.config import CONFIG_FILE, ExperimentConfig, TrainConfig, config_from_dict, to_dict
from raycpt.core.errors import InputError
from raycpt.core.files import read_json, write_json
from raycpt.core.model.adapters import apply_lora, merge_for_export, peft_model_of, unwrap
from raycpt.core.model.loading import load_model

CHECKPOINT_GLOB = "checkpoint_*"
"""A checkpoint's directory name, as a glob (`checkpoint_name`)."""
STATE_FILE = "trainer_state.pt"
"""TrainState, scheduler, loss scaler and (ddp) optimizer, in every checkpoint."""
METRICS_FILE = "metrics.json"
"""The report a checkpoint was saved with, in every checkpoint."""
SHARDED_DIR = "sharded"
"""A sharded checkpoint's DCP directory (`.metadata` + one `__<rank>_0.distcp` per rank), inside the checkpoint."""
ADAPTER_WEIGHTS = "adapter_model.safetensors"
"""A LoRA checkpoint's adapter weights (PEFT's file name)."""
ADAPTER_CONFIG = "adapter_config.json"
"""A LoRA checkpoint's adapter config (PEFT's file name)."""
HF_WEIGHTS = "model.safetensors"
"""A ddp checkpoint's weights in one file (HF `save_pretrained`)."""
HF_WEIGHTS_INDEX = "model.safetensors.index.json"
"""A ddp checkpoint's weights in several files: the index naming them."""
WEIGHT_GLOBS = (HF_WEIGHTS, "model-*-of-*.safetensors", HF_WEIGHTS_INDEX, "pytorch_model*.bin", ADAPTER_WEIGHTS)
"""The weight files of a ddp or lora checkpoint (a sharded one's weights are SHARDED_DIR)."""
OPTIMIZER_KEY = "optimizer"
"""The optimizer's entry in trainer_state.pt (ddp and lora checkpoints)."""
OPTIM_PREFIX = "optim"
"""The optimizer's entries in a sharded checkpoint's DCP dir (`save_sharded`)."""
_CHUNK = 64 * 2**20


def checkpoint_name(step: int) -> str:
    """The directory name of the checkpoint saved after `step` optimizer steps."""
    return f"checkpoint_step{step:06d}"


# --- the train state -------------------------------------------------------------------------------------------
@dataclass
class TrainState:
    """What a resumed run needs besides the weights, the optimizer and the scheduler: saved and restored as one
    unit with them (`trainer_state.pt`, loaded with weights_only=True). The mixture and the data position are
    functions of the config and `step`; numpy draws are all from seeded generators, so no numpy state."""

    step: int = 0
    train_time_s: float = 0.0
    best_domain_ppl: float = math.inf
    evals_since_best: int = 0
    restarts: int = 0
    torch_rng: torch.Tensor | None = None
    python_rng: tuple | None = None
    cuda_rng: list[torch.Tensor] | None = None

    def capture_rng(self) -> None:
        self.torch_rng, self.python_rng = torch.get_rng_state(), random.getstate()
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None

    def restore_rng(self) -> None:
        if self.torch_rng is not None:
            torch.set_rng_state(self.torch_rng)
        if self.python_rng is not None:
            random.setstate(_as_tuples(self.python_rng))
        if self.cuda_rng is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(self.cuda_rng)


def _as_tuples(value: Any) -> Any:
    """random.setstate wants the nested tuples getstate gave (a round trip through torch.save may give lists)."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


# --- save and load -----------------------------------------------------------------------------------------------
def save_checkpoint(path: Path, model: nn.Module, state: TrainState, optimizer: torch.optim.Optimizer, scheduler,
                    cfg: ExperimentConfig, metrics: dict[str, Any], *, rank: int = 0,
                    scaler: torch.amp.GradScaler | None = None) -> None:
    """One unit: weights, the train state with optimizer, scheduler and fp16 loss scaler, the config, the metrics.
    train.method lora: the weights are the PEFT adapter alone (`save_adapter`); the frozen base is the config's
    model.source.

    strategy ddp (rank 0 alone calls it): HF `save_pretrained` safetensors, and `trainer_state.pt` with the
    optimizer. strategy fsdp (every rank calls it, into its own local dir; Ray merges them into one): each rank
    writes its shard of the weights and optimizer (torch DCP, `sharded/`), rank 0 the HF config.json and
    `trainer_state.pt` without the optimizer. `write_hf_weights` gathers the shards into HF safetensors."""
    path.mkdir(parents=True, exist_ok=True)
    hf = unwrap(model)
    sharded = cfg.resources.strategy == "fsdp"
    if sharded:
        save_sharded(path, hf, optimizer)  # a collective: every rank
    if rank != 0:
        return
    if sharded:
        hf.config.save_pretrained(path)
        if getattr(hf, "generation_config", None) is not None:
            hf.generation_config.save_pretrained(path)
    elif peft_model_of(model) is not None:
        save_adapter(model, path)
    else:
        hf.save_pretrained(path, safe_serialization=True)
    state.capture_rng()
    saved = {"state": dataclasses.asdict(state), "scheduler": scheduler.state_dict(),
             # the dynamic loss scale fp16 reached ({} when disabled): a resume must not restart it at 2**16
             "scaler": scaler.state_dict() if scaler is not None else {}}
    if not sharded:
        saved[OPTIMIZER_KEY] = optimizer.state_dict()
    torch.save(saved, path / STATE_FILE)
    write_json(path / CONFIG_FILE, to_dict(cfg))
    write_json(path / METRICS_FILE, metrics)


def load_train_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                     scaler: torch.amp.GradScaler | None = None) -> TrainState:
    """Optimizer, scheduler, loss scaler and TrainState from a checkpoint; a sharded one also loads the weights into
    `model` (resharded onto this run's workers: a collective under FSDP). The RNG state is rank 0's, on every
    rank."""
    saved = torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=True)
    if is_sharded_checkpoint(path):
        load_sharded(path, unwrap(model), optimizer)
    else:
        optimizer.load_state_dict(saved[OPTIMIZER_KEY])
    # The scheduler's step count alone: its peak lr and shape are this run's config (the LambdaLR state would also
    # bring back the saved run's base lrs), and the lr of the next step is this run's schedule's, not the one saved
    # with the optimizer. They differ when the run is longer than the one that saved or has another train.lr
    # (raycpt extend), and are equal on a plain resume.
    base_lrs = list(scheduler.base_lrs)
    scheduler.load_state_dict(saved["scheduler"])
    scheduler.base_lrs = base_lrs
    lrs = [base * factor(scheduler.last_epoch) for base, factor in zip(base_lrs, scheduler.lr_lambdas, strict=True)]
    for group, base, lr in zip(optimizer.param_groups, base_lrs, lrs, strict=True):
        group["lr"], group["initial_lr"] = lr, base
    scheduler._last_lr = lrs
    if scaler is not None and scaler.is_enabled() and saved.get("scaler"):
        scaler.load_state_dict(saved["scaler"])
    return TrainState(**saved["state"])


def save_sharded(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Model + optimizer into `<path>/sharded` with DCP, keyed by parameter name: every rank writes its shard (a
    collective: all ranks call it), rank 0 the metadata. Works with no process group (one plain model)."""
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=Path(path) / SHARDED_DIR,
             no_dist=not dist.is_initialized())


def load_sharded(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Load what `save_sharded` wrote into `model` (and `optimizer`), resharding to this run's layout: FSDP on any
    number of ranks, DDP, or one plain model without a process group."""
    if optimizer is None:
        state = {"model": get_model_state_dict(model)}
    else:
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=Path(path) / SHARDED_DIR, no_dist=not dist.is_initialized())
    if optimizer is None:
        set_model_state_dict(model, state["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def save_adapter(model: nn.Module, path: Path) -> None:
    """The adapter's weights and config in PEFT's format (a tied head trained with the embeddings is saved once)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*")  # PEFT warns about saving without a hub base; nothing to do
        peft_model_of(model).save_pretrained(path, safe_serialization=True)
    (Path(path) / "README.md").unlink(missing_ok=True)  # PEFT's empty model card; the export writes the real one


def load_adapter_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a checkpoint's adapter into a model `apply_lora` built from the same config (resume)."""
    from peft import set_peft_model_state_dict  # deferred: only LoRA runs pay PEFT's import
    from safetensors.torch import load_file

    result = set_peft_model_state_dict(peft_model_of(model), load_file(Path(path) / ADAPTER_WEIGHTS))
    if result.unexpected_keys:
        raise InputError(f"checkpoint {path}: its adapter does not match train.lora_* of this run (unexpected "
                         f"{result.unexpected_keys[0]}); resume with the config it was trained with")


def load_merged(base: nn.Module, path: str | os.PathLike, t: TrainConfig) -> nn.Module:
    """`base` (the released model) with a checkpoint's adapter merged into its weights. The adapter goes on the way
    it trained (`apply_lora` with the run's `train` section, then its weights), not through
    PeftModel.from_pretrained: PEFT's saved config does not record which modules it tied to the embeddings."""
    model = apply_lora(base, t)
    load_adapter_weights(model, path)
    return merge_for_export(model)


def load_checkpoint_model(path: str | os.PathLike, dtype: str = "float32", trust_remote_code: bool = False
                          ) -> nn.Module:
    """The HF model of a checkpoint of any format, whole, on CPU (no process group needed): a sharded one is
    built from its config.json and filled from the DCP shards; a LoRA one is its base (the run's model.source) with
    the adapter merged in (a plain HF model, no PEFT wrapper)."""
    if is_adapter_checkpoint(path):
        run = config_from_dict(read_json(Path(path) / CONFIG_FILE))
        return load_merged(load_model(run.model.source, dtype, trust_remote_code), path, run.train).train()
    if not is_sharded_checkpoint(path):
        return load_model(str(path), dtype, trust_remote_code)
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code)
    load_sharded(path, model)
    return model.train()


def write_hf_weights(checkpoint: Path, out: Path, *, load_dtype: str, dtype: str, max_shard_size: str,
                     trust_remote_code: bool = False, adapter_dir: Path | None = None) -> None:
    """A checkpoint of any format gathered into HF safetensors in `out`: loaded whole on CPU in `load_dtype`
    (`load_checkpoint_model`: a sharded one's DCP shards gathered with no process group, so it needs the whole
    model's memory; a LoRA one merged into its base), cast to `dtype`, saved in files of at most `max_shard_size`
    with config.json (naming that dtype) and generation_config.json. `adapter_dir`: a LoRA checkpoint's adapter
    files are also copied there, as saved."""
    model = load_checkpoint_model(checkpoint, load_dtype, trust_remote_code)
    model.to(getattr(torch, dtype))
    model.save_pretrained(out, safe_serialization=True, max_shard_size=max_shard_size)
    if adapter_dir is not None and is_adapter_checkpoint(checkpoint):
        adapter_dir.mkdir(parents=True, exist_ok=True)
        for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
            shutil.copy2(checkpoint / name, adapter_dir / name)


# --- what a checkpoint is ----------------------------------------------------------------------------------------
def is_sharded_checkpoint(path: str | Path) -> bool:
    return (Path(path) / SHARDED_DIR / ".metadata").is_file()


def is_adapter_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` is a LoRA run's checkpoint (a PEFT adapter, its base named in the run's config)."""
    return (Path(path) / ADAPTER_WEIGHTS).is_file()


def has_weights(path: str | os.PathLike) -> bool:
    """Whether `path` is a checkpoint with weights: HF safetensors (one file or an index of shards), DCP, or a
    LoRA adapter."""
    path = Path(path)
    return ((path / HF_WEIGHTS).is_file() or (path / HF_WEIGHTS_INDEX).is_file()
            or is_sharded_checkpoint(path) or is_adapter_checkpoint(path))


def checkpoint_metrics(path: str | os.PathLike) -> dict[str, Any] | None:
    """A checkpoint's metrics.json (None while it is being written, or not a checkpoint)."""
    try:
        found = json.loads((Path(path) / METRICS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) and m.STEP in found else None


def checkpoint_step(path: Path) -> int | None:
    """The step a checkpoint was saved at (its metrics.json); None while it is still being written."""
    try:
        return int((checkpoint_metrics(path) or {})[m.STEP])
    except (ValueError, KeyError, TypeError):
        return None


def is_pre_decay(path: str | os.PathLike) -> bool:
    """Whether a checkpoint is a wsd run's pre-decay one (its metrics.json says so)."""
    return bool((checkpoint_metrics(path) or {}).get(m.PRE_DECAY))


def checkpoints_in(dirs: list[Path]) -> list[Path]:
    """Every complete checkpoint (checkpoint_* with its metrics.json) in `dirs`, oldest step first."""
    found = {p.resolve() for d in dirs if d.is_dir() for p in d.glob(CHECKPOINT_GLOB) if p.is_dir()}
    stepped = [(checkpoint_metrics(p), p) for p in found]
    return [p for mt, p in sorted(((mt, p) for mt, p in stepped if mt), key=lambda item: (item[0][m.STEP],
                                                                                             str(item[1])))]


def pre_decay_checkpoint(dirs: list[Path]) -> Path | None:
    """The pre-decay checkpoint among `dirs`' checkpoints (the newest, should a retried trial have two)."""
    found = [p for p in checkpoints_in(dirs) if is_pre_decay(p)]
    return found[-1] if found else None


# --- slimming: optimizer state and weights out of a saved checkpoint ---------------------------------------------
def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) if Path(path).exists() else 0


def _is_optim(fqn: str) -> bool:
    return fqn == OPTIM_PREFIX or fqn.startswith(OPTIM_PREFIX + ".")


def _read_dcp_metadata(dcp: Path):
    with (dcp / ".metadata").open("rb") as fh:
        return pickle.load(fh)  # DCP's own format, written by this sweep's trials


def has_optimizer(path: Path) -> bool:
    """Whether a checkpoint holds optimizer state (in trainer_state.pt or its DCP dir)."""
    state = Path(path) / STATE_FILE
    if state.is_file() and OPTIMIZER_KEY in torch.load(state, map_location="cpu", weights_only=True, mmap=True):
        return True
    dcp = Path(path) / SHARDED_DIR
    return (dcp / ".metadata").is_file() and any(_is_optim(k) for k in _read_dcp_metadata(dcp).state_dict_metadata)


def _strip_state_file(path: Path) -> int:
    if not path.is_file():
        return 0
    saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # the optimizer is never read
    if OPTIMIZER_KEY not in saved:
        return 0
    before = path.stat().st_size
    del saved[OPTIMIZER_KEY]
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(saved, tmp)
    del saved  # unmap the old file before it is replaced
    os.replace(tmp, path)
    return before - path.stat().st_size


def _strip_dcp(dcp: Path) -> int:
    """Rewrite a DCP dir without its optimizer entries: new data files holding only the model's byte ranges, then
    the metadata pointing at them is swapped in atomically, then the old files go. A crash at any point leaves a
    loadable checkpoint (the old one, or the new one plus orphaned old files)."""
    if not (dcp / ".metadata").is_file():
        return 0
    meta = _read_dcp_metadata(dcp)
    if not any(_is_optim(k) for k in meta.state_dict_metadata):
        return 0
    before = dir_bytes(dcp)
    by_file: dict[str, list] = {}
    for index, info in meta.storage_data.items():
        if not _is_optim(index.fqn):
            by_file.setdefault(info.relative_path, []).append((index, info))
    storage, old_files = {}, {info.relative_path for info in meta.storage_data.values()}
    for relative, items in by_file.items():
        new_name = f"{Path(relative).stem}.model{Path(relative).suffix}"
        with (dcp / relative).open("rb") as src, (dcp / new_name).open("wb") as dst:
            for index, info in sorted(items, key=lambda item: item[1].offset):
                src.seek(info.offset)
                storage[index] = dataclasses.replace(info, relative_path=new_name, offset=dst.tell())
                left = info.length
                while left:
                    chunk = src.read(min(left, _CHUNK))
                    if not chunk:
                        raise OSError(f"{dcp / relative}: shorter than its metadata says")
                    dst.write(chunk)
                    left -= len(chunk)
    meta.state_dict_metadata = {k: v for k, v in meta.state_dict_metadata.items() if not _is_optim(k)}
    meta.storage_data = storage
    if isinstance(meta.planner_data, dict):
        meta.planner_data = {k: v for k, v in meta.planner_data.items() if not _is_optim(k)}
    tmp = dcp / ".metadata.tmp"
    with tmp.open("wb") as fh:
        pickle.dump(meta, fh)
    os.replace(tmp, dcp / ".metadata")
    for relative in old_files - {info.relative_path for info in storage.values()}:
        (dcp / relative).unlink(missing_ok=True)
    return before - dir_bytes(dcp)


def strip_optimizer(path: Path) -> int:
    """Remove a checkpoint's optimizer state, keep everything else; returns the bytes freed."""
    return _strip_state_file(Path(path) / STATE_FILE) + _strip_dcp(Path(path) / SHARDED_DIR)


def remove_weights(path: Path) -> int:
    """Remove a checkpoint's weights (safetensors, or the DCP dir, optimizer included); metrics and configs stay."""
    path, freed = Path(path), 0
    for pattern in WEIGHT_GLOBS:
        for file in path.glob(pattern):
            freed += file.stat().st_size
            file.unlink(missing_ok=True)
    if (path / SHARDED_DIR).is_dir():
        freed += dir_bytes(path / SHARDED_DIR)
        shutil.rmtree(path / SHARDED_DIR, ignore_errors=True)
    return freed


def keeping_newest_checkpoint(report: Callable[[dict[str, Any], str | None], None]
                              ) -> Callable[[dict[str, Any], str | None], None]:
    """`report` (the loop's, raycpt.core.train.loop.Report), after removing the previous checkpoint once a newer one is
    written. For runs outside Ray, where nothing resumes from an older one: the loop writes one per eval, each the
    weights plus AdamW state, which would fill a disk over a long run (in Ray, the checkpoint manager keeps what
    `checkpoint` says). A wsd run's pre-decay checkpoint (metrics.PRE_DECAY) is never removed."""
    newest: list[str] = []

    def report_and_prune(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        if checkpoint_dir:
            for old in newest:
                shutil.rmtree(old, ignore_errors=True)
            # a wsd run's pre-decay checkpoint is kept: `raycpt extend` continues from it
            newest[:] = [] if metrics.get(m.PRE_DECAY) else [checkpoint_dir]
        report(metrics, checkpoint_dir)

    return report_and_prune
