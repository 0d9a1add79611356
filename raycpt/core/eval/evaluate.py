"""Scoring, plain PyTorch + scikit-learn: held-out perplexity on fixed blocks and downstream F1 of a linear probe
on frozen features (and, through `f1_metrics`, prompted classification, lm-eval tasks and generation).
`@torch.no_grad()` functions of (model, data) that restore train mode."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from raycpt.core import metrics
from raycpt.core.data.blocks import Task
from raycpt.core.eval.generation import generation_scores
from raycpt.core.eval.harness import harness_scores
from raycpt.core.eval.prompting import PromptSpec, prompt_scores
from raycpt.core.eval.stats import f1_interval, ppl_interval
from raycpt.core.model.loading import load_tokenizer, padded_batch

MAX_LOSS_FOR_PPL = 50.0
"""exp(50) ~ 5e21: a diverged model's perplexity stays a finite number that tables and JSON can hold."""
PROBE_SUBSAMPLE = 0.8
"""With eval.seeds > 1, each probe refit sees this share of the probe's train split."""
PROBE_MAX_ITER = 2000
"""LogisticRegression iterations: standardised features converge well within this."""


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of `train.precision` on this device (None: fp32): bf16, fp16, or auto = bf16 on CUDA."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return torch.float16 if precision == "fp16" else None


def block_losses(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of each block in a batch ([batch], float64)."""
    logits = model(input_ids=input_ids).logits
    shift_logits = logits[:, :-1, :].float()
    targets = input_ids[:, 1:]
    per_token = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), targets.reshape(-1),
                                reduction="none").view(targets.shape)
    return per_token.double().mean(dim=1)


@torch.no_grad()
def heldout_block_losses(model: nn.Module, blocks: np.ndarray, *, batch_size: int,
                         device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1,
                         autocast_dtype: torch.dtype | None = None) -> np.ndarray:
    """Mean next-token loss of every block ([n_blocks] float64; blocks are equally long, so their mean is the
    per-token loss), each worker scoring a disjoint shard, then all-reduced. Every worker runs the same number
    of forward passes (one short of blocks scores a repeat it does not count), so sharded models stay in step.
    Per-block values are what the bootstrap intervals resample (raycpt.core.eval.stats)."""
    was_training = model.training
    model.eval()
    device = torch.device(device)
    losses = torch.zeros(len(blocks), dtype=torch.float64, device=device)
    mine = np.arange(rank, len(blocks), world_size)
    per_worker = -(-len(blocks) // world_size)
    for start in range(0, per_worker, batch_size):
        rows = mine[start:start + batch_size]
        batch_rows = rows if len(rows) else np.zeros(1, dtype=np.int64)  # a repeat, to stay in step
        batch = torch.as_tensor(np.asarray(blocks[batch_rows]), dtype=torch.long, device=device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            scored = block_losses(model, batch)
        if len(rows):
            losses[torch.as_tensor(rows, device=device)] = scored
    if world_size > 1 and torch.distributed.is_initialized():
        torch.distributed.all_reduce(losses)  # sync point: every rank filled its own blocks
    model.train(was_training)
    return losses.cpu().numpy()


def heldout_loss(model: nn.Module, blocks: np.ndarray, **kwargs) -> float:
    """Mean per-token loss over `blocks` (see heldout_block_losses for the arguments)."""
    return float(heldout_block_losses(model, blocks, **kwargs).mean())


def ppl_metrics(block_loss: np.ndarray, block_size: int, name_loss: str, name_ppl: str, *, seed: int = 0
                ) -> dict[str, float | list[float]]:
    """Loss, perplexity with its bootstrap interval over blocks, and the per-block losses (for paired intervals
    in analysis) as flat metrics under the given names."""
    tokens = np.full(len(block_loss), block_size - 1, dtype=np.float64)
    # a diverged model's ppl stays finite (see MAX_LOSS_FOR_PPL)
    interval = ppl_interval(np.minimum(block_loss, MAX_LOSS_FOR_PPL) * tokens, tokens, seed=seed)
    return {name_loss: float(block_loss.mean()), **interval.to_dict(name_ppl),
            name_ppl.replace("_ppl", "_block_losses"): [float(v) for v in block_loss]}


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
        ids, mask = padded_batch(encoded, pad_id)
        ids, mask = ids.to(device), mask.to(device)
        # the decoder alone (`base_model`): its last_hidden_state is the LM's final (normed) hidden state, and the
        # LM head's logits (a vocab-sized matmul per token, ~20% of SmolLM2's forward) are never computed
        hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        pooled = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
        out[idx] = pooled.double().cpu().numpy()
    model.train(was_training)
    return out


def probe_scores(train_x: np.ndarray, train_y: list[str], test_x: np.ndarray, test_y: list[str], *,
                 seeds: int = 1, seed: int = 0, classes: list[str] | None = None) -> dict[str, Any]:
    """scikit-learn LogisticRegression on frozen features, fitted on the train split, scored on `test_x`:
    macro-F1 with its bootstrap interval over the scored texts, accuracy, per-class F1, and the predictions
    (for paired intervals against another model on the same texts).

    With `seeds` > 1 the probe is also refit on seeded 80% subsamples of the train split: `f1_sd` is their
    spread (otherwise None: one fit has no spread to report)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    classes = classes or sorted(set(train_y) | set(test_y))
    train_y_arr = np.asarray(train_y)

    def fit_predict(rows: np.ndarray, random_state: int) -> np.ndarray:
        probe = make_pipeline(StandardScaler(),
                              LogisticRegression(max_iter=PROBE_MAX_ITER, C=1.0, random_state=random_state))
        probe.fit(train_x[rows], train_y_arr[rows])
        return probe.predict(test_x)

    predicted = fit_predict(np.arange(len(train_y_arr)), seed)
    spread = None
    if seeds > 1:
        keep = max(2, int(PROBE_SUBSAMPLE * len(train_y)))
        refits = [f1_score(test_y, fit_predict(np.random.default_rng(seed + k).permutation(len(train_y))[:keep],
                                               seed + k), average="macro", labels=classes, zero_division=0)
                  for k in range(seeds)]
        spread = float(np.std(refits))
    interval = f1_interval(test_y, predicted, labels=classes, seed=seed)
    per_class = f1_score(test_y, predicted, average=None, labels=classes, zero_division=0)
    return {"f1": interval.value, "f1_ci_low": interval.low, "f1_ci_high": interval.high, "f1_sd": spread,
            "accuracy": float(accuracy_score(test_y, predicted)),
            "per_class_f1": {c: float(v) for c, v in zip(classes, per_class, strict=True)},
            "predictions": [str(p) for p in predicted]}


def downstream_f1(model: nn.Module, tokenizer, task: Task, *, splits: tuple[str, ...] = ("val",), seeds: int = 1,
                  seed: int = 0, max_length: int = 128, device: torch.device | str = "cpu") -> dict[str, dict]:
    """The linear probe of DESIGN.md end to end: fitted once on the task's train split, scored on each of `splits`
    (val for trials and selection, test for the winner and the base model once): {split: scores}."""
    parts = {"val": (task.val_texts, task.val_labels), "test": (task.test_texts, task.test_labels)}
    train_x = text_features(model, tokenizer, task.train_texts, max_length=max_length, device=device)
    scores = {}
    for split in splits:
        texts, labels = parts[split]
        scored_x = text_features(model, tokenizer, texts, max_length=max_length, device=device)
        scores[split] = probe_scores(train_x, task.train_labels, scored_x, labels, seeds=seeds, seed=seed,
                                     classes=task.classes)
    return scores


def splitless_scores(model: nn.Module, tokenizer, spec: PromptSpec, *,
                     device: torch.device | str = "cpu") -> dict[str, Any]:
    """The scores a model gets once, whatever the split: the spec's lm-eval tasks (`lm_eval/<task>/<metric>`) and
    generation (`gen/bleu`, `gen/chrf`, `gen/rougeL`), each with its interval; {} when it has neither."""
    scores: dict[str, Any] = {}
    if spec.harness is not None:
        scores.update(harness_scores(model, tokenizer, spec.harness))
    if spec.generation is not None:
        scores.update(generation_scores(model, tokenizer, spec.generation, device=device))
    return scores


def f1_metrics(model: nn.Module, model_source: str, task: Task | None, *, seeds: int, seed: int, max_length: int,
               device: torch.device | str, trust_remote_code: bool = False,
               prefixes: dict[str, str] | None = None, method: str = "probe", prompt: PromptSpec | None = None
               ) -> dict[str, Any]:
    """The downstream scores as flat metrics, for each split in `prefixes` ({split: metric prefix}, default
    {"val": "eval/"}). With a task, method probe (or both): the probe's `eval/f1` (macro) with `eval/f1_ci_low|high`,
    `eval/f1_sd` (seeds > 1), `eval/accuracy`, `eval/f1_class/<label>` and `eval/predictions`; method prompt (or
    both), with `prompt`: the same as `eval/prompt_f1`, `eval/prompt_accuracy`, `eval/prompt_f1_class/<label>`,
    `eval/prompt_predictions` (`base/...`, `test/...` under other prefixes). With or without a task, when `prompt`
    carries lm-eval tasks or generation pairs (`splitless_scores`): those once, under every prefix
    (metrics.prefixed: `lm_eval/...` and `gen/...` for trials, `base/gen/...`, `test/gen/...`)."""
    prefixes = prefixes or {"val": metrics.EVAL_PREFIX}
    tokenizer = load_tokenizer(model_source, trust_remote_code)
    by_method: dict[str, dict[str, dict]] = {}
    if task is not None and method in ("probe", "both"):
        by_method["probe"] = downstream_f1(model, tokenizer, task, splits=tuple(prefixes), seeds=seeds, seed=seed,
                                           max_length=max_length, device=device)
    if task is not None and method in ("prompt", "both"):
        if prompt is None:
            raise ValueError("eval.method prompt needs a PromptSpec")
        parts = {"val": (task.val_texts, task.val_labels), "test": (task.test_texts, task.test_labels)}
        by_method["prompt"] = {split: prompt_scores(model, tokenizer, prompt, (task.train_texts, task.train_labels),
                                                    parts[split], task.classes, device=device)
                               for split in prefixes}
    names = {"probe": (metrics.F1, metrics.ACCURACY, metrics.PREDICTIONS, metrics.F1_CLASS_PREFIX, metrics.F1_SD),
             "prompt": (metrics.PROMPT_F1, metrics.PROMPT_ACCURACY, metrics.PROMPT_PREDICTIONS,
                        metrics.PROMPT_F1_CLASS_PREFIX, None)}
    flat: dict[str, Any] = {}
    for kind, by_split in by_method.items():
        f1_name, accuracy_name, predictions_name, class_prefix, sd_name = names[kind]
        for split, scores in by_split.items():
            def name(metric: str, prefix: str = prefixes[split]) -> str:
                return prefix + metric.removeprefix(metrics.EVAL_PREFIX)

            flat.update({name(f1_name): scores["f1"], name(f1_name) + metrics.CI_LOW: scores["f1_ci_low"],
                         name(f1_name) + metrics.CI_HIGH: scores["f1_ci_high"],
                         name(accuracy_name): scores["accuracy"], name(predictions_name): scores["predictions"]})
            if sd_name and scores.get("f1_sd") is not None:
                flat[name(sd_name)] = scores["f1_sd"]
            flat.update({name(class_prefix) + label: v for label, v in scores["per_class_f1"].items()})
    if prompt is not None:
        once = splitless_scores(model, tokenizer, prompt, device=device)  # the same model scores the same: once
        for prefix in dict.fromkeys(prefixes.values()):
            flat.update({metrics.prefixed(prefix, name): value for name, value in once.items()})
    return flat
