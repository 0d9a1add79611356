"""Generation scored against references: each input of `eval.generate_path` is continued greedily by the model as
it is in memory (HF `generate`, no sampling, at most `max_new_tokens`), cut at the first stop string, and the
predictions are scored against their targets the way people report them: corpus BLEU and chrF with sacrebleu's
defaults (13a tokenisation; chrF: character 6-grams, beta 2), both 0-100, and ROUGE-L F with rouge-score's defaults
(its English tokeniser, lower case, no stemming), the mean over examples, 0-1.

Each score comes with a 95% percentile-bootstrap interval over examples: the examples are resampled and the corpus
score is recomputed from their summed statistics (raycpt.core.eval.stats.corpus_interval; sacrebleu's own bootstrap does
the same), seeded with eval.seed.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from raycpt.core import metrics
from raycpt.core.config import EvalConfig
from raycpt.core.errors import InputError
from raycpt.core.eval.stats import corpus_interval
from raycpt.core.model.loading import max_positions, padded_batch

INSTALL_HINT = "pip install 'raycpt[generate]'"
BATCH_SIZE = 8
"""Inputs generated together (left-padded, longest first so a batch pads little)."""
FIELDS = ("input", "target")


@dataclass(frozen=True)
class GenerationSpec:
    """What to generate and score: the `eval.generate_*` fields and the seed of the intervals."""

    path: str
    max_new_tokens: int = 64
    stop: tuple[str, ...] = ("\n",)
    limit: int = 0
    """0: every pair."""
    seed: int = 0


def generation_spec(e: EvalConfig) -> GenerationSpec | None:
    """The GenerationSpec of the `eval` section, or None when eval.generate_path is empty."""
    if not e.generate_path:
        return None
    return GenerationSpec(e.generate_path, e.generate_max_new_tokens, tuple(e.generate_stop), e.generate_limit,
                          e.seed)


def require_scorers() -> None:
    """One InputError line when sacrebleu or rouge-score is not installed."""
    missing = [name for name, module in (("sacrebleu", "sacrebleu"), ("rouge-score", "rouge_score"))
               if importlib.util.find_spec(module) is None]
    if missing:
        raise InputError(f"eval.generate_path: {' and '.join(missing)} not installed; {INSTALL_HINT} (or set "
                         "eval.generate_path='')")


def read_pairs(path: str, limit: int = 0) -> tuple[list[str], list[str]]:
    """(inputs, targets) of a jsonl file of {"input": ..., "target": ...} lines (blank lines skipped), the first
    `limit` (0: all). Every line is checked: one InputError line names the file and line of the first bad one."""
    where = "eval.generate_path"
    file = Path(path)
    if not file.is_file():
        raise InputError(f"{where}: {path} not found; give a jsonl file with one {{\"input\": ..., \"target\": ...}} "
                         "object per line")
    inputs, targets = [], []
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise InputError(f"{where}: {path} is not UTF-8 text") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{where}: {path} line {number}: not JSON ({err.msg}); write one "
                             "{\"input\": ..., \"target\": ...} object per line") from None
        if not isinstance(row, dict):
            raise InputError(f"{where}: {path} line {number}: expected an object {{\"input\": ..., \"target\": ...}}, "
                             f"got {type(row).__name__}")
        for field in FIELDS:
            if not isinstance(row.get(field), str):
                got = "nothing" if field not in row else repr(row[field])[:40]
                raise InputError(f"{where}: {path} line {number}: '{field}' must be a string, got {got}; each line "
                                 "needs \"input\" and \"target\"")
        inputs.append(row["input"])
        targets.append(row["target"])
    if not inputs:
        raise InputError(f"{where}: {path} holds no pairs; write one {{\"input\": ..., \"target\": ...}} per line")
    return (inputs[:limit], targets[:limit]) if limit else (inputs, targets)


def cut_at_stop(text: str, stop: tuple[str, ...] | list[str]) -> str:
    """`text` up to the first occurrence of any stop string."""
    ends = [text.find(s) for s in stop if s and s in text]
    return text[:min(ends)] if ends else text


@torch.no_grad()
def greedy_generate(model: nn.Module, tokenizer, inputs: list[str], *, max_new_tokens: int,
                    stop: tuple[str, ...] | list[str] = (), batch_size: int = BATCH_SIZE,
                    device: torch.device | str = "cpu") -> list[str]:
    """Each input continued greedily, at most `max_new_tokens` tokens, stopped (and cut) at the first stop string or
    the end-of-sequence token. An input longer than the model's positions allow keeps its end."""
    from transformers import GenerationConfig

    was_training = model.training
    model.eval()
    eos = model.generation_config.eos_token_id if getattr(model, "generation_config", None) else None
    eos = tokenizer.eos_token_id if eos is None else eos
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    positions = max_positions(model.config)
    keep = max(1, positions - max_new_tokens) if positions else None
    encoded = []
    for text in inputs:
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"] or [tokenizer.eos_token_id]
        encoded.append(ids[-keep:] if keep else ids)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad,
                              eos_token_id=eos, stop_strings=[s for s in stop if s] or None)
    out = [""] * len(encoded)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            ids, mask = padded_batch([encoded[i] for i in rows], pad, left=True)
            generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                       generation_config=config, tokenizer=tokenizer if config.stop_strings else None)
            for row, i in enumerate(rows):
                text = tokenizer.decode(generated[row, ids.shape[1]:], skip_special_tokens=True)
                out[i] = cut_at_stop(text, stop)
    finally:
        model.train(was_training)
    return out


def generation_metrics(predictions: list[str], targets: list[str], *, seed: int = 0) -> dict[str, float]:
    """`gen/bleu` and `gen/chrf` (sacrebleu corpus scores, 0-100) and `gen/rougeL` (mean ROUGE-L F, 0-1), each with
    its 95% bootstrap interval over examples."""
    from rouge_score import rouge_scorer  # deferred: the scorers are optional (raycpt[generate])
    from sacrebleu.metrics import BLEU, CHRF  # deferred: as above

    if len(predictions) != len(targets) or not targets:
        raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets: need one each, at least one")
    flat: dict[str, float] = {}
    for name, metric in ((metrics.GEN_BLEU, BLEU()), (metrics.GEN_CHRF, CHRF())):
        # per-example sufficient statistics; a corpus score is computed from their sums (sacrebleu's corpus_score)
        units = np.asarray(metric._extract_corpus_statistics(predictions, [targets]), dtype=np.float64)
        flat.update(corpus_interval(units, lambda sums, metric=metric: float(
            metric._compute_score_from_stats(list(sums)).score), seed=seed).to_dict(name))
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    per_example = [[scorer.score(target, prediction)["rougeL"].fmeasure]
                   for prediction, target in zip(predictions, targets, strict=True)]
    n = len(per_example)
    flat.update(corpus_interval(per_example, lambda sums: float(sums[0]) / n, seed=seed).to_dict(metrics.GEN_ROUGE_L))
    return flat


def generation_scores(model: nn.Module, tokenizer, spec: GenerationSpec, *,
                      device: torch.device | str = "cpu") -> dict[str, float]:
    """The spec's pairs generated by `model` and scored: `gen/bleu`, `gen/chrf`, `gen/rougeL` with intervals."""
    inputs, targets = read_pairs(spec.path, spec.limit)
    predictions = greedy_generate(model, tokenizer, inputs, max_new_tokens=spec.max_new_tokens, stop=spec.stop,
                                  device=device)
    return generation_metrics(predictions, targets, seed=spec.seed)
