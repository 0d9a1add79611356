"""Metric names: a public contract. The loop reports them, ASHA schedules on them, analysis selects by them, and
reports and plots show them. Spell a name here once and import it everywhere else.

A trial reports `eval/...` on the validation held-out sets; the base model's values carry `base/...` instead.
"""

from __future__ import annotations

STEP = "step"
TOKENS = "tokens"
"""Training tokens consumed so far, summed over workers."""
TRAIN_LOSS = "train/loss"
"""Mean next-token cross-entropy of the training micro-batches over the report window: the CE alone, also with
train.distill_weight > 0 (whose KL term is DISTILL_KL), so loss curves stay comparable across distill weights."""
DISTILL_KL = "train/distill_kl"
"""train.distill_weight > 0: the mean KL(p_base || p_model) per token of the general replay rows, over the
micro-batches of the report window that held general rows (None with distillation off, or with no general row in
the window). A micro-batch with general rows trains on its CE + distill_weight x its KL."""
DOMAIN_LOSS = "eval/domain_loss"
DOMAIN_PPL = "eval/domain_ppl"
GENERAL_LOSS = "eval/general_loss"
GENERAL_PPL = "eval/general_ppl"
F1 = "eval/f1"
"""Macro-F1 of the linear probe on the labelled task (finished trials and the base model only)."""
F1_SD = "eval/f1_sd"
ACCURACY = "eval/accuracy"
F1_CLASS_PREFIX = "eval/f1_class/"
PREDICTIONS = "eval/predictions"
"""The probe's predicted label for every validation text, in the task's order (paired intervals need them)."""
PROMPT_F1 = "eval/prompt_f1"
"""Macro-F1 of prompted classification (each label's log-likelihood after a prompt; raycpt.core.eval.prompting)."""
PROMPT_ACCURACY = "eval/prompt_accuracy"
PROMPT_F1_CLASS_PREFIX = "eval/prompt_f1_class/"
PROMPT_PREDICTIONS = "eval/prompt_predictions"
DOWNSTREAM = {F1: PREDICTIONS, PROMPT_F1: PROMPT_PREDICTIONS}
"""The classification scores `select.metric` may name -> the per-text predictions its paired intervals use. It may
also name an lm-eval score (`lm_eval/<task>/<metric>`), whose paired intervals use its per-example values
(SAMPLES)."""
SAMPLES = "_samples"
"""Suffix of an lm-eval score's per-example values, one per document in doc_id order ('lm_eval/hellaswag/acc_norm
_samples'): what makes two models' scores on the same documents comparable as a paired difference."""
LM_EVAL_PREFIX = "lm_eval/"
"""lm-evaluation-harness scores (eval.lm_eval_tasks; raycpt.core.eval.harness): 'lm_eval/<task>/<metric>', or
'lm_eval/<task>/<filter>/<metric>' for a filter other than lm-eval's 'none', each with a 95% interval (CI_LOW,
CI_HIGH) from lm-eval's standard error. Split-less: a model is scored once on each task's own evaluation split."""
GEN_PREFIX = "gen/"
GEN_BLEU = "gen/bleu"
"""Corpus BLEU (sacrebleu, 0-100) of greedy generations against the references of eval.generate_path."""
GEN_CHRF = "gen/chrf"
"""Corpus chrF (sacrebleu, 0-100) of the same generations."""
GEN_ROUGE_L = "gen/rougeL"
"""ROUGE-L F-measure (rouge-score, 0-1), the mean over examples, of the same generations."""
GENERATION = (GEN_BLEU, GEN_CHRF, GEN_ROUGE_L)
SPLITLESS_PREFIXES = (LM_EVAL_PREFIX, GEN_PREFIX)
"""Downstream scores a model gets once, whatever the split (`prefixed` names them for the base model and the test
split); analysis collects every trial metric that starts with one of these."""
DOMAIN_BLOCK_LOSSES = "eval/domain_block_losses"
GENERAL_BLOCK_LOSSES = "eval/general_block_losses"
"""Mean loss of every held-out validation block, in order (bootstrap and paired intervals resample them)."""
CI_LOW, CI_HIGH = "_ci_low", "_ci_high"
"""Suffixes of a metric's 95% bootstrap interval: 'eval/f1_ci_low'."""
DOMAIN_FRACTION = "data/domain_fraction"
"""The share of training blocks the loop actually drew from the domain side of the mixture (the domain corpus and,
with data.synthetic, the synthetic one), since the run (re)started."""
SYNTHETIC_FRACTION = "data/synthetic_fraction"
"""The realised share of synthetic blocks (data.synthetic) among the domain-side blocks the loop drew since the run
(re)started; train.synthetic_ratio is its target. None without a synthetic corpus (or without domain-side blocks)."""
TOKENS_PER_S = "perf/tokens_per_s"
MFU = "perf/mfu"
LR = "lr"
TRAIN_TIME_S = "time/train_s"
RESTARTS = "restarts"
RESUMED_FROM_STEP = "resumed_from_step"
FINISHED = "finished"
"""True on a trial's last report when it ran all its steps (or stopped early by its own patience rule)."""
CHECKPOINT_PATH = "checkpoint_path"
PRE_DECAY = "pre_decay"
"""True on the report (and in the checkpoint's metrics.json) of a wsd run's last stable step: the pre-decay
checkpoint `raycpt extend` continues from (raycpt.core.schedule.stable_end)."""
FORGETTING = "guard/forgetting"
"""Set (a sentence; else None) on a report whose validation general ppl crossed the run's forgetting bound
(`raycpt extend`: (1 + select.max_forgetting) x the base model's)."""
CHECKPOINT_SCORE = "checkpoint_score"
"""What Ray ranks a trial's checkpoints by (raycpt.edge.policy): the domain ppl, or 0 for the pre-decay checkpoint,
so Ray keeps that one besides the latest."""
LOSS_IMPL = "train/loss_impl"
"""The next-token loss the trial actually ran (hf | chunked | liger), after `train.loss_impl`'s fallbacks."""

EVAL_PREFIX = "eval/"
BASE_PREFIX = "base/"
TEST_PREFIX = "test/"
"""Scored once after selection, for the winner and the base model only: 'test/f1', 'test/domain_ppl'."""
LIFT_PREFIX = "lift/"
"""Paired differences against the base model on the same texts/blocks: 'lift/f1' (absolute), 'lift/domain_ppl'
(relative change), each with its interval."""

SCHEDULABLE = (DOMAIN_PPL, DOMAIN_LOSS, GENERAL_PPL, TRAIN_LOSS)
"""Metrics reported at every eval, so ASHA (`search.metric`) can compare trials on them."""

FINAL = (STEP, TOKENS, TRAIN_LOSS, DISTILL_KL, DOMAIN_LOSS, DOMAIN_PPL, DOMAIN_PPL + CI_LOW, DOMAIN_PPL + CI_HIGH,
         GENERAL_LOSS, GENERAL_PPL, GENERAL_PPL + CI_LOW, GENERAL_PPL + CI_HIGH, F1, F1 + CI_LOW, F1 + CI_HIGH, F1_SD,
         ACCURACY, DOMAIN_FRACTION, SYNTHETIC_FRACTION, TOKENS_PER_S, MFU, TRAIN_TIME_S, CHECKPOINT_PATH, LOSS_IMPL,
         PREDICTIONS, DOMAIN_BLOCK_LOSSES, GENERAL_BLOCK_LOSSES, PROMPT_F1, PROMPT_F1 + CI_LOW, PROMPT_F1 + CI_HIGH,
         PROMPT_ACCURACY, PROMPT_PREDICTIONS)
"""A trial's last values that analysis collects into its row."""


def base_name(metric: str) -> str:
    """The base model's name of a trial metric: 'eval/domain_ppl' -> 'base/domain_ppl'."""
    return BASE_PREFIX + metric.removeprefix(EVAL_PREFIX)


def test_name(metric: str) -> str:
    """'eval/f1' -> 'test/f1'."""
    return TEST_PREFIX + metric.removeprefix(EVAL_PREFIX)


def lift_name(metric: str) -> str:
    """'eval/f1' -> 'lift/f1'."""
    return LIFT_PREFIX + metric.removeprefix(EVAL_PREFIX)


def lm_eval_name(task: str, metric: str, filter_name: str = "none") -> str:
    """'lm_eval/hellaswag/acc_norm'; a filter other than lm-eval's 'none' goes between: 'lm_eval/gsm8k/strict-match/
    exact_match'."""
    return LM_EVAL_PREFIX + task + "/" + (metric if filter_name == "none" else f"{filter_name}/{metric}")


def prefixed(prefix: str, metric: str) -> str:
    """A split-less metric (SPLITLESS_PREFIXES) under a split's prefix: 'eval/' keeps it as trials report it
    ('gen/bleu'), 'base/' gives 'base/gen/bleu', 'test/' 'test/gen/bleu', 'base/test/' 'base/test/gen/bleu'."""
    return metric if prefix == EVAL_PREFIX else prefix + metric


def paired_values(metric: str) -> str:
    """The per-text or per-example values a `select.metric`'s paired intervals are computed from: the predictions
    of a classification score (DOWNSTREAM), the per-example values of an lm-eval score."""
    return DOWNSTREAM.get(metric) or metric + SAMPLES


def short_name(metric: str) -> str:
    """'eval/domain_ppl' -> 'domain_ppl' (the keys of `raycpt report --format json`)."""
    return metric.split("/", 1)[-1]
