"""Held-out perplexity. Plain PyTorch: `@torch.no_grad()` functions of (model, blocks) that restore train mode."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def block_token_losses(model: nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over a batch of blocks, and the number of predicted tokens."""
    logits = model(input_ids=input_ids).logits
    shift_logits = logits[:, :-1, :].float()
    targets = input_ids[:, 1:]
    loss_sum = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), targets.reshape(-1),
                               reduction="sum")
    return loss_sum, targets.numel()


@torch.no_grad()
def heldout_loss(model: nn.Module, blocks: np.ndarray, *, batch_size: int, device: torch.device | str = "cpu",
                 rank: int = 0, world_size: int = 1, autocast_dtype: torch.dtype | None = None) -> float:
    """Mean per-token loss over `blocks`, each worker scoring a disjoint shard; all-reduced when distributed."""
    was_training = model.training
    model.eval()
    device = torch.device(device)
    total = torch.zeros(2, dtype=torch.float64, device=device)
    mine = np.arange(rank, len(blocks), world_size)
    for start in range(0, len(mine), batch_size):
        batch = torch.as_tensor(np.asarray(blocks[mine[start:start + batch_size]]), dtype=torch.long, device=device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss_sum, count = block_token_losses(model, batch)
        total[0] += loss_sum.double()
        total[1] += count
    if world_size > 1 and torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)  # sync point: every rank scores its shard, then sum
    model.train(was_training)
    return float(total[0] / total[1])


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))
