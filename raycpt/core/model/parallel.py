"""FSDP2 (`resources.strategy: fsdp`), no Ray.

`apply_fsdp` shards each decoder layer, then the root (embeddings, final norm and the head: tied embeddings stay in
one unit), as torchtitan does. The loop drives a sharded model like a DDP one; the differences live here:
`no_gradient_sync` for the micro-batches of a step but the last, and `root_unsharded` for code that calls a
submodule directly (the probe's decoder-only forward). Sharded checkpoints (torch.distributed.checkpoint: every rank
writes its own shard of the model and optimizer into one DCP directory, and loading reshards onto any number of
workers) are raycpt.core.train.checkpoint's `save_sharded` / `load_sharded`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated decoder blocks, found generically: the `nn.ModuleList`s of the classes HF names in
    `_no_split_modules` (LlamaDecoderLayer, GPT2Block, ...), else the longest ModuleList of one block type."""
    no_split = set(getattr(model, "_no_split_modules", None) or ())
    lists = [ml for ml in model.modules() if isinstance(ml, nn.ModuleList) and len(ml)]
    layers = [block for ml in lists for block in ml if type(block).__name__ in no_split]
    if layers:
        return layers
    uniform = [ml for ml in lists if len({type(block) for block in ml}) == 1]
    return list(max(uniform, key=len)) if uniform else []


def apply_fsdp(model: nn.Module, *, mixed_precision: bool, cpu_offload: bool) -> nn.Module:
    """Shard `model` (already on its device, activation checkpointing already enabled) over the default process
    group with FSDP2: each decoder layer is one unit, the root holds the rest. `mixed_precision`: bf16 params in
    forward/backward, fp32 gradient reduction (use it on CUDA with bf16); `cpu_offload`: sharded params, grads and
    the optimizer step live in CPU memory. Returns the same module, now an FSDPModule."""
    device = next(model.parameters()).device
    mesh = dist.device_mesh.init_device_mesh(device.type, (dist.get_world_size(),))
    kwargs = {"mesh": mesh}
    if mixed_precision:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=device.type == "cuda")
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        # the last layer's params are gathered again at once by backward: keep them (torchtitan's choice)
        fully_shard(layer, reshard_after_forward=i < len(layers) - 1, **kwargs)
    fully_shard(model, **kwargs)
    return model


def fsdp_root(model: nn.Module) -> FSDPModule | None:
    """The outermost FSDP module inside `model` (through a torch.compile wrapper), or None when not sharded."""
    return next((mod for mod in model.modules() if isinstance(mod, FSDPModule)), None)


@contextlib.contextmanager
def no_gradient_sync(model: nn.Module) -> Iterator[None]:
    """Accumulate gradients locally (a micro-batch that is not the step's last): FSDP2's
    `set_requires_gradient_sync(False)`, DDP's `no_sync()`; a plain model, or a compiled DDP one, syncs anyway."""
    root = fsdp_root(model)
    if root is not None:
        root.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            root.set_requires_gradient_sync(True)
    else:
        with model.no_sync() if hasattr(model, "no_sync") else contextlib.nullcontext():
            yield


@contextlib.contextmanager
def root_unsharded(model: nn.Module) -> Iterator[None]:
    """Gather the root unit's params (embeddings, final norm) for code that calls a submodule directly (the
    layers gather their own in their hooks). A collective under FSDP: every rank must enter; else a no-op."""
    root = fsdp_root(model)
    if root is None:
        yield
        return
    root.unshard()
    try:
        yield
    finally:
        root.reshard()
