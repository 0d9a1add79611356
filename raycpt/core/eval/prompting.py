"""Prompted classification: the labelled task scored the way causal LMs are used, by the log-likelihood of each
label's word after a prompt (lm-evaluation-harness's multiple-choice scoring), beside the linear probe.

For each scored text the prompt is `shots` in-context examples (drawn once, seeded, from the probe-train split and
shared by every text, so every model sees the same prompt) followed by the template filled with the text up to its
`{label}` slot; each label's continuation is its word (`eval.label_words`, default the label itself) with the
template's text after the slot. The prediction is the label whose continuation has the highest summed
log-probability. Context and continuation are tokenised apart and joined (lm-eval's convention): the space before the
slot moves into the continuation, so a label word tokenises as it would mid-sentence. Scores are macro-F1 with its
bootstrap interval, accuracy, per-class F1 and the predictions (for paired intervals), like the probe's.

The PromptSpec also carries the section's other ways of prompting the model, lm-evaluation-harness tasks
(raycpt.core.eval.harness) and generation against references (raycpt.core.eval.generation), so every place that scores a
model's downstream task (a trial's end, the base model, the winner on test) runs them with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from raycpt.core.config import EvalConfig
from raycpt.core.errors import InputError
from raycpt.core.eval.generation import GenerationSpec, generation_spec
from raycpt.core.eval.harness import HarnessSpec, harness_spec
from raycpt.core.eval.stats import f1_interval
from raycpt.core.model.loading import padded_batch

TEXT_SLOT, LABEL_SLOT = "{text}", "{label}"
EXAMPLE_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class PromptSpec:
    """How to prompt: the template (with {text} and {label}), in-context examples, label words, the seed."""

    template: str
    shots: int
    label_words: dict[str, str]
    seed: int
    max_length: int
    """Tokens kept of each text (its start), as the probe does."""
    harness: HarnessSpec | None = None
    """lm-evaluation-harness tasks scored on the same model (eval.lm_eval_tasks; raycpt.core.eval.harness), or None."""
    generation: GenerationSpec | None = None
    """Generation scored against references (eval.generate_path; raycpt.core.eval.generation), or None."""


def prompt_spec(e: EvalConfig) -> PromptSpec | None:
    """How the `eval` section prompts the model: the prompted classification of eval.method prompt (or both), the
    lm-eval tasks and the generation pairs. None when it prompts it for nothing (eval.method probe alone). Whoever
    scores a model's downstream task passes this on (`evaluate.f1_metrics(prompt=...)`), which runs all three."""
    harness, generation = harness_spec(e), generation_spec(e)
    if e.method not in ("prompt", "both") and harness is None and generation is None:
        return None
    return PromptSpec(e.template, e.shots, dict(e.label_words), e.seed, e.max_length, harness, generation)


def scores_without_task(e: EvalConfig) -> bool:
    """Whether the `eval` section scores a model even without a labelled task (eval.lm_eval_tasks or
    eval.generate_path): the trial's end then scores it although `eval.task` is empty."""
    return bool(e.lm_eval_tasks or e.generate_path)


def check_prompt(spec: PromptSpec, classes: list[str], tokenizer) -> None:
    """One InputError line for a prompt that cannot score this task: a template without both slots, label words
    for labels the task does not have, or a label word that tokenises to nothing."""
    for slot in (TEXT_SLOT, LABEL_SLOT):
        if slot not in spec.template:
            raise InputError(f"eval.template: {spec.template!r} has no {slot} slot; e.g. 'Review: {{text}}\\n"
                             "Sentiment: {label}'")
    if spec.template.index(TEXT_SLOT) > spec.template.index(LABEL_SLOT):
        raise InputError("eval.template: the {label} slot must come after the {text} slot (the model reads the "
                         "text, then the label is scored)")
    unknown = sorted(set(spec.label_words) - set(classes))
    if unknown:
        raise InputError(f"eval.label_words: {unknown} are not labels of the task ({classes}); name each label "
                         "once, e.g. {fresh: good, rotten: bad}")
    for label in classes:
        word = spec.label_words.get(label, label)
        if not word.strip() or not tokenizer(" " + word.strip(), add_special_tokens=False)["input_ids"]:
            raise InputError(f"eval.label_words: the word for label {label!r} ({word!r}) tokenises to nothing; "
                             "give it a word")
    words = [spec.label_words.get(label, label).strip() for label in classes]
    if len(set(words)) != len(words):
        raise InputError(f"eval.label_words: two labels share a word ({words}); the prompt could not tell them apart")


def _split(template: str) -> tuple[str, str]:
    """(the template up to the label slot, what follows it)."""
    before, after = template.split(LABEL_SLOT, 1)
    return before, after


def _fill(template_part: str, text: str) -> str:
    return template_part.replace(TEXT_SLOT, text)


def prompt_context(spec: PromptSpec, text: str, examples: list[tuple[str, str]]) -> str:
    """The prompt a text is scored with: the filled examples, then the template up to the label slot."""
    before, after = _split(spec.template)
    shown = [_fill(before, t) + spec.label_words.get(y, y) + _fill(after, t) for t, y in examples]
    return EXAMPLE_SEPARATOR.join([*shown, _fill(before, text)])


def demonstrations(spec: PromptSpec, texts: list[str], labels: list[str]) -> list[tuple[str, str]]:
    """The in-context examples: `shots` (text, label) pairs drawn once from the probe-train split, seeded."""
    if spec.shots <= 0 or not texts:
        return []
    order = np.random.default_rng(spec.seed).permutation(len(texts))[:spec.shots]
    return [(texts[i], labels[i]) for i in order]


def _clip(tokenizer, text: str, max_length: int) -> str:
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return text if len(ids) <= max_length else tokenizer.decode(ids[:max_length])


@torch.no_grad()
def label_logprobs(model: nn.Module, tokenizer, contexts: list[str], continuations: list[str], *,
                   batch_size: int = 8, device: torch.device | str = "cpu") -> np.ndarray:
    """[len(contexts), len(continuations)] summed log-probabilities of each continuation after each context.
    Context and continuation are tokenised apart (trailing spaces of the context moved into the continuation)."""
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = []  # per context: its ids, and each continuation's ids
    for context in contexts:
        stripped = context.rstrip(" ")
        moved = context[len(stripped):]
        encoded.append((tokenizer(stripped, add_special_tokens=False, verbose=False)["input_ids"],
                        [tokenizer(moved + c, add_special_tokens=False, verbose=False)["input_ids"]
                         for c in continuations]))
    out = np.zeros((len(contexts), len(continuations)))
    if all(len(cont) == 1 for _, conts in encoded for cont in conts):
        # every continuation is one token: one forward of each context scores them all at its last position
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))  # long first: batches pad little
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            ids, mask = padded_batch([encoded[i][0] for i in rows], pad)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            last = torch.log_softmax(logits[torch.arange(len(rows)), (mask.sum(1) - 1).to(logits.device)], -1)
            for row, i in enumerate(rows):
                out[i] = last[row, [cont[0] for cont in encoded[i][1]]].double().cpu().numpy()
    else:
        pairs = [(i, j, ctx, cont) for i, (ctx, conts) in enumerate(encoded) for j, cont in enumerate(conts)]
        pairs.sort(key=lambda p: -(len(p[2]) + len(p[3])))
        for start in range(0, len(pairs), batch_size):
            batch = pairs[start:start + batch_size]
            ids, mask = padded_batch([ctx + cont for _, _, ctx, cont in batch], pad)
            logp = torch.log_softmax(model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float(),
                                     -1).cpu()
            for row, (i, j, ctx, cont) in enumerate(batch):
                positions = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1)  # position t predicts token t + 1
                out[i, j] = float(logp[row, positions, torch.as_tensor(cont)].sum())
    model.train(was_training)
    return out


def prompt_scores(model: nn.Module, tokenizer, spec: PromptSpec, train: tuple[list[str], list[str]],
                  scored: tuple[list[str], list[str]], classes: list[str], *,
                  device: torch.device | str = "cpu") -> dict[str, Any]:
    """Prompted classification of the `scored` (texts, labels) with examples from `train`: f1 (macro) with its
    interval, accuracy, per-class F1 and the predictions, as `evaluate.probe_scores` reports them."""
    from sklearn.metrics import accuracy_score, f1_score

    examples = [(_clip(tokenizer, t, spec.max_length), y) for t, y in demonstrations(spec, *train)]
    contexts = [prompt_context(spec, _clip(tokenizer, t, spec.max_length), examples) for t in scored[0]]
    after = _split(spec.template)[1]
    continuations = [spec.label_words.get(c, c).strip() + after for c in classes]
    # the continuation's text after the slot refers to no text; fill any {text} there with nothing
    continuations = [c.replace(TEXT_SLOT, "") for c in continuations]
    scores = label_logprobs(model, tokenizer, contexts, continuations, device=device)
    predicted = [classes[k] for k in scores.argmax(axis=1)]
    labels = scored[1]
    interval = f1_interval(labels, predicted, labels=classes, seed=spec.seed)
    per_class = f1_score(labels, predicted, average=None, labels=classes, zero_division=0)
    return {"f1": interval.value, "f1_ci_low": interval.low, "f1_ci_high": interval.high,
            "accuracy": float(accuracy_score(labels, predicted)),
            "per_class_f1": {c: float(v) for c, v in zip(classes, per_class, strict=True)},
            "predictions": predicted}
