"""Scoring, plain PyTorch + scikit-learn: held-out perplexity on fixed blocks and downstream F1 of a linear probe
on frozen features. `@torch.no_grad()` functions of (model, data) that restore train mode."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from raycpt.core import metrics
from raycpt.core.data import Task
from raycpt.core.models import load_tokenizer

MAX_LOSS_FOR_PPL = 50.0
"""exp(50) ~ 5e21: a diverged model's perplexity stays a finite number that tables and JSON can hold."""
PROBE_SUBSAMPLE = 0.8
"""With eval.seeds > 1, each probe refit sees this share of the probe's train split."""
PROBE_MAX_ITER = 2000
"""LogisticRegression iterations: standardised features converge well within this."""


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
    return math.exp(min(loss, MAX_LOSS_FOR_PPL))


@torch.no_grad()
def text_features(model: nn.Module, tokenizer, texts: list[str], *, batch_size: int = 32, max_length: int = 128,
                  device: torch.device | str = "cpu") -> np.ndarray:
    """Mask-aware mean of the last hidden state per text (frozen model), as float64 features for the probe.

    Texts are run longest-first so each batch pads little; rows come back in the input order."""
    was_training = model.training
    model.eval()
    lengths = [len(t) for t in texts]
    order = np.argsort(lengths)[::-1]
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float64)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    body = getattr(model, "base_model", model)
    for start in range(0, len(texts), batch_size):
        idx = order[start:start + batch_size]
        encoded = [tokenizer(texts[i], add_special_tokens=False, truncation=True, max_length=max_length,
                             verbose=False)["input_ids"] or [pad_id] for i in idx]
        width = max(len(e) for e in encoded)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, e in enumerate(encoded):
            ids[row, : len(e)] = torch.as_tensor(e)
            mask[row, : len(e)] = 1
        ids, mask = ids.to(device), mask.to(device)
        # the decoder alone (`base_model`): its last_hidden_state is the LM's final (normed) hidden state, and the
        # LM head's logits (a vocab-sized matmul per token, ~20% of SmolLM2's forward) are never computed
        hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        pooled = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
        out[idx] = pooled.double().cpu().numpy()
    model.train(was_training)
    return out


def probe_scores(train_x: np.ndarray, train_y: list[str], test_x: np.ndarray, test_y: list[str], *,
                 seeds: int = 1, seed: int = 0) -> dict[str, float | dict[str, float]]:
    """scikit-learn LogisticRegression on frozen features: macro-F1, accuracy and per-class F1 on the test split.

    With `seeds` > 1 the probe is refit on seeded 80% subsamples of the train split (the test split is fixed and
    never changes, so nothing leaks): F1 is their mean, `f1_sd` their spread."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    classes = sorted(set(train_y) | set(test_y))
    train_y_arr, f1s, accs, per_class = np.asarray(train_y), [], [], []
    for k in range(seeds):
        if seeds == 1:
            rows = np.arange(len(train_y_arr))
        else:
            keep = max(2, int(PROBE_SUBSAMPLE * len(train_y)))
            rows = np.random.default_rng(seed + k).permutation(len(train_y_arr))[:keep]
        probe = make_pipeline(StandardScaler(),
                              LogisticRegression(max_iter=PROBE_MAX_ITER, C=1.0, random_state=seed + k))
        probe.fit(train_x[rows], train_y_arr[rows])
        predicted = probe.predict(test_x)
        f1s.append(f1_score(test_y, predicted, average="macro", labels=classes, zero_division=0))
        accs.append(accuracy_score(test_y, predicted))
        per_class.append(f1_score(test_y, predicted, average=None, labels=classes, zero_division=0))
    return {"f1": float(np.mean(f1s)), "f1_sd": float(np.std(f1s)), "accuracy": float(np.mean(accs)),
            "per_class_f1": {c: float(v) for c, v in zip(classes, np.mean(per_class, axis=0), strict=True)}}


def downstream_f1(model: nn.Module, tokenizer, task: Task, *, seeds: int = 1, seed: int = 0, max_length: int = 128,
                  device: torch.device | str = "cpu") -> dict[str, float | dict[str, float]]:
    """The linear probe of DESIGN.md on the labelled task (train/test texts and labels), end to end."""
    train_x = text_features(model, tokenizer, task.train_texts, max_length=max_length, device=device)
    test_x = text_features(model, tokenizer, task.test_texts, max_length=max_length, device=device)
    return probe_scores(train_x, task.train_labels, test_x, task.test_labels, seeds=seeds, seed=seed)


def f1_metrics(model: nn.Module, model_source: str, task: Task, *, seeds: int, seed: int, max_length: int,
               device: torch.device | str, trust_remote_code: bool = False, prefix: str = metrics.EVAL_PREFIX
               ) -> dict[str, float]:
    """The probe's scores as flat metrics: `eval/f1` (macro), `eval/f1_sd`, `eval/accuracy`,
    `eval/f1_class/<label>` (`base/...` with prefix 'base/')."""
    tokenizer = load_tokenizer(model_source, trust_remote_code)
    scores = downstream_f1(model, tokenizer, task, seeds=seeds, seed=seed, max_length=max_length, device=device)

    def name(metric: str) -> str:
        return prefix + metric.removeprefix(metrics.EVAL_PREFIX)

    flat = {name(metrics.F1): scores["f1"], name(metrics.F1_SD): scores["f1_sd"],
            name(metrics.ACCURACY): scores["accuracy"]}
    flat.update({name(metrics.F1_CLASS_PREFIX) + label: v for label, v in scores["per_class_f1"].items()})
    return flat
