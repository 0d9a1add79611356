"""Typed experiment config: one dataclass per YAML section, `--set a.b=c` overrides, and `validate`.

Every field has a default except `data.domain`. `load_config(path, overrides)` is the only entry point the
commands use; it raises `ConfigError` listing every problem, so a user fixes a config in one pass.

One file on purpose, over the core's ~450-line norm: the sections' docstrings are the configuration reference
(`python -m raycpt.config_reference` renders docs/config.md from them) and the validation reads across sections,
so a field, its meaning and its checks are found in one place.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from raycpt.core import metrics
from raycpt.core.errors import ConfigError
from raycpt.core.files import read_json
from raycpt.core.schedule import DECAY_SHAPES, SCHEDULES, stable_end


@dataclass
class ModelConfig:
    source: str = "packaged:smollm2-135m"
    """Local directory, Hugging Face hub id, or `packaged:smollm2-135m` / `packaged:tiny-gpt2`."""
    dtype: str = "float32"
    """Weights dtype when loading: float32 | bfloat16 | float16. Mixed precision is `train.precision`."""
    gradient_checkpointing: bool = False
    """Trade compute for activation memory; only worth it when a batch does not fit."""
    trust_remote_code: bool = False
    """Run model code shipped with a hub repo. Off unless you trust that repo."""


@dataclass
class DataConfig:
    domain: str | dict[str, str] = ""
    """Domain corpus: txt/jsonl/parquet/csv file, directory or glob, hub dataset id, `packaged:rotten-tomatoes`, or
    a hub mapping {path: wikitext, name: wikitext-2-raw-v1, split: train, revision: main} (path required)."""
    general: str | dict[str, str] = ""
    """General replay corpus (same forms), e.g. `packaged:news`. Empty means no replay (then mix_ratio must be 1)."""
    synthetic: str | dict[str, str] = ""
    """Synthetic domain corpus (same forms): prepared like the others, with its own held-out split, and drawn for
    train.synthetic_ratio of the domain side of the mixture. `augment` means this experiment's own rewrites (the
    texts/ dir of augment.output, default <experiment dir>/augment/texts): `raycpt prepare`, `sweep` and `train`
    then run the augment stage first (the `augment` section's settings; units already written are kept), so one
    config does both (write ./augment for a directory of that name). Empty means none (then synthetic_ratio must
    be 0)."""
    text_field: str = "text"
    """Column holding the text in jsonl/parquet/csv/hub sources."""
    txt_unit: str = "file"
    """What one document of a .txt corpus is: file (the whole file) | paragraph (blank-line separated) | line.
    Documents are joined with EOS, and held-out perplexity holds out whole documents."""
    block_size: int = 128
    """Tokens per training block; documents are joined with EOS and cut into blocks of this size."""
    heldout_fraction: float = 0.05
    """Fraction of each corpus' documents held out for perplexity, fixed before any trial starts."""
    heldout_blocks: int = 8
    """Held-out validation blocks per corpus for eval/*_ppl: shared by every trial and the base model, used by
    ASHA and the selection rule."""
    test_blocks: int = 0
    """Held-out test blocks per corpus (0 = as many as heldout_blocks), scored once for the winner and the base
    model after selection (test/*_ppl); they come from the same held-out documents, after the validation blocks."""
    max_tokens: int = 0
    """Cap on training tokens kept per corpus (0 = all)."""
    seed: int = 0
    """Seed for the held-out split and the mixture sampler."""
    dedup: str = "none"
    """none | exact: drop documents whose normalised text (case and whitespace ignored) was already seen; counted
    in the manifest (duplicates_removed)."""
    shards: int = 0
    """Training shards (hash buckets) per corpus; 0 = one per 64 MiB of input. Fixed by the corpus, never by the
    number of workers, so the blocks are the same however many prepare."""
    unit_mb: float = 16.0
    """Input MiB per read unit (a line range of .jsonl/.txt, parquet row groups): the grain of parallel
    tokenising and of resuming a killed prepare; one unit's documents are in memory at a time."""
    streaming: bool = False
    """Read a hub dataset as a stream (no full download), stopping once data.max_tokens (required) are read."""


@dataclass
class TrainConfig:
    lr: float = 2e-4
    """Peak learning rate reached after warmup (re-warm) from the released weights."""
    min_lr_ratio: float = 0.1
    """Decay floor as a fraction of lr, reached at the run's last step (cosine and wsd; constant never decays)."""
    warmup_steps: int = 2
    """Linear warmup steps."""
    schedule: str = "cosine"
    """cosine | wsd | constant, after the warmup (`raycpt.core.schedule.lr_at`). cosine: decay over the whole run.
    wsd (warmup-stable-decay): hold lr, then cool down over the last `decay_fraction` of the run; a wsd trial keeps
    its last stable checkpoint, from which `raycpt extend` continues it to a longer run with the same optimizer
    state and data stream. constant: hold lr to the end."""
    decay_fraction: float = 0.2
    """wsd: share of the run's total steps spent cooling down, round(decay_fraction x steps) steps (a run extended
    to T steps cools down exactly as a run of T steps)."""
    decay_shape: str = "1-sqrt"
    """wsd: the cool-down's shape: 1-sqrt (Hagele et al. 2024) | linear | cosine."""
    steps: int = 24
    """Optimizer steps (ignored when `tokens` is set)."""
    tokens: int = 0
    """Training-token budget instead of `steps` (0 = use steps): the run takes ceil(tokens / (global batch x
    data.block_size)) optimizer steps (`TrainConfig.total_steps`), so trials with different batch sizes see the same
    tokens. Sweepable instead of steps (not both)."""
    batch_size: int = 4
    """Blocks per micro-batch per worker (at most: see `micro_batching`)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step on one worker; with `global_batch_size` 0 the global batch is
    batch_size x grad_accum blocks, whatever the number of workers."""
    global_batch_size: int = 0
    """Blocks per optimizer step summed over all workers (0 = batch_size x grad_accum). It stays fixed when
    resources.num_workers changes: each worker's accumulation is derived (`micro_batching`)."""
    weight_decay: float = 0.01
    """AdamW weight decay (not applied to biases and norms)."""
    adam_beta1: float = 0.9
    """AdamW beta1 (first-moment decay)."""
    adam_beta2: float = 0.95
    """AdamW beta2: the LLM pre-training convention (GPT-3, Llama), a shorter second-moment memory than PyTorch's
    and the HF Trainer's 0.999."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    dropout: float = 0.0
    """Dropout during CPT, set wherever the architecture has it: GPT-2-style models get it on embeddings, residual
    and attention; Llama-style models (SmolLM2, Qwen, Mistral) only have attention dropout, so only that. Released
    models often ship with 0."""
    mix_ratio: float = 0.8
    """Fraction of training blocks drawn from the domain corpus; the rest is general replay. With data.synthetic:
    the domain side, real and synthetic (synthetic_ratio splits it)."""
    synthetic_ratio: float = 0.0
    """Share of the domain side of the mixture (mix_ratio of the blocks) drawn from data.synthetic instead of
    data.domain: of all blocks, mix_ratio x synthetic_ratio are synthetic, mix_ratio x (1 - synthetic_ratio) real
    domain, 1 - mix_ratio general; realised exactly at every step, as mix_ratio is. 0 = real domain only (the
    same run as without data.synthetic); with mix_ratio 0 it draws nothing. Sweep it to see whether augmentation
    pays, e.g. search.space: {train.synthetic_ratio: {grid: [0, 0.5]}}."""
    distill_weight: float = 0.0
    """Knowledge distillation from the frozen base model against forgetting (0 = off): the training loss becomes
    CE + distill_weight x KL(p_base || p_model), the per-token KL of the next-token distributions averaged over the
    general replay rows of each micro-batch (docs/distill.md). `train/loss` stays the CE; `train/distill_kl`
    reports the KL. Needs data.general. Cost: a second frozen copy of the base model's weights in memory (none
    under method lora: the teacher is the model with its adapters disabled) and one extra forward per general row."""
    eval_every: int = 8
    """Steps between held-out evaluations, reports and checkpoints (the last step always evaluates)."""
    grad_clip: float = 1.0
    """Max global grad norm (0 = off)."""
    early_stopping_patience: int = 0
    """Stop a trial after this many evals without domain-ppl improvement (0 = off)."""
    precision: str = "auto"
    """fp32 | bf16 | fp16 | auto (bf16 autocast on CUDA, fp32 on CPU). fp16: float16 autocast with a dynamic loss
    scale (torch.amp.GradScaler, saved in checkpoints) for GPUs without bf16 (V100, T4); needs resources.use_gpu and
    model.dtype float32 (the scaler unscales fp32 gradients), and resources.strategy ddp."""
    compile: bool = False
    """torch.compile the model (pays a compile warm-up; worth it on GPU for long runs)."""
    loss_impl: str = "auto"
    """Next-token loss: hf (the model's own) | chunked (never materialises the [batch, seq, vocab] logits; exact
    to fp32 rounding) | liger (liger-kernel's fused kernel on CUDA, `pip install raycpt[gpu]`) | auto (liger ->
    chunked -> hf on CUDA, hf on CPU). An unavailable choice falls back, saying why."""
    peak_tflops: float = 0.0
    """The accelerator's dense peak TFLOP/s per worker, for `perf/mfu`; 0 = look up known GPUs (bf16: H100/H200
    989, A100 312, L40S 362, L4 121), no MFU on CPU or an unknown GPU."""
    seed: int = 0
    """Seed for dropout masks and the data order within the mixture."""
    method: str = "full"
    """full: every weight trains | lora: the released weights stay frozen and low-rank adapters (PEFT's LoRA, or
    DoRA with `lora_dora`) train in the decoder's linear layers; gradients and AdamW state shrink to the adapter's
    params. A LoRA checkpoint holds the adapter (PEFT's adapter_model.safetensors + adapter_config.json) and
    resumes from model.source + that adapter; the export merges it into full weights (no PEFT needed to load it).
    Not with resources.strategy fsdp."""
    lora_rank: int = 8
    """LoRA: rank r of each adapter (B @ A, A: r x in, B: out x r)."""
    lora_alpha: int = 16
    """LoRA: the adapter's output is scaled by lora_alpha / lora_rank."""
    lora_dropout: float = 0.0
    """LoRA: dropout on the adapter's input (the frozen path keeps `dropout`)."""
    lora_target_modules: list[str] = field(default_factory=list)
    """LoRA: names (or name suffixes) of the modules that get adapters, e.g. [q_proj, v_proj]; empty = every linear
    layer of the decoder, attention and MLP, not the LM head (PEFT's all-linear)."""
    lora_dora: bool = False
    """LoRA: weight-decomposed LoRA (DoRA): a trained magnitude per output feature besides the low-rank direction
    update; slower per step, often closer to full fine-tuning at low rank."""
    lora_train_embeddings: bool = False
    """LoRA: also train the input embeddings and the LM head fully (PEFT's modules_to_save; a tied head stays tied
    to the embeddings): worth it when the domain brings tokens the base model barely saw. Adds the V x h matrix
    (twice when untied) to the gradients, the optimizer state and every checkpoint."""

    def total_steps(self, block_size: int) -> int:
        """Optimizer steps of the run: `steps`, or with a token budget ceil(tokens / (global batch x block_size)).
        What the loop, the LR schedule, ASHA's max_t, progress estimates and the memory plan use."""
        if self.tokens > 0:
            return max(1, math.ceil(self.tokens / (self.global_batch() * block_size)))
        return self.steps

    def global_batch(self) -> int:
        """Blocks per optimizer step, summed over workers."""
        return self.global_batch_size or self.batch_size * self.grad_accum

    def micro_batching(self, world_size: int) -> tuple[int, int]:
        """(blocks per micro-batch per worker, micro-batches per step) for `world_size` workers, keeping the
        global batch fixed (nanoGPT's rule: accumulation shrinks as workers grow). The micro-batch is the largest
        divisor of each worker's share that is at most `batch_size`, so memory per forward never grows."""
        per_worker, rest = divmod(self.global_batch(), world_size)
        if rest or per_worker == 0:
            raise ConfigError(f"train.global_batch_size: {self.global_batch()} blocks per step cannot be split "
                              f"evenly over {world_size} workers; use a multiple of resources.num_workers")
        micro = max(d for d in range(1, min(self.batch_size, per_worker) + 1) if per_worker % d == 0)
        return micro, per_worker // micro


@dataclass
class EvalConfig:
    task: str | dict[str, str] = ""
    """Labelled downstream task source (csv/jsonl/parquet, hub dataset id or `packaged:rotten-tomatoes`, or a hub
    mapping {path, name, split, revision}; a hub task reads its `train` split unless the mapping names one)."""
    test_task: str | dict[str, str] = ""
    """Explicit labelled test source (same forms as task; a hub one reads its `test` split unless the mapping names
    one); empty = a seeded split of `task`."""
    text_field: str = "text"
    """Column holding each labelled text in the task's csv/jsonl/parquet/hub rows (packaged tasks set it)."""
    label_field: str = "label"
    """Column holding each text's label: strings or integers (a hub ClassLabel column reads as its names)."""
    labels: list[str] = field(default_factory=list)
    """Keep only these labels (empty = all)."""
    train_size: int = 300
    """Texts the probe is fitted on (0 = all that remain after validation and test)."""
    val_size: int = 300
    """Validation texts: every trial's eval/f1 and the selection rule. They never enter the CPT corpus."""
    test_size: int = 300
    """Test texts (ignored with test_task): scored once for the winner and the base model after selection
    (test/f1). They never enter the CPT corpus, the probe's training or the selection."""
    seed: int = 0
    """Seed of the train/test split (fixed for the whole sweep) and of the probe."""
    seeds: int = 1
    """Refit the probe on this many seeded 80% subsamples of the train split; F1 is their mean (± sd)."""
    max_length: int = 128
    """Tokens per text fed to the frozen model for probe features (and kept of each text in a prompt)."""
    method: str = "probe"
    """How finished trials, the base model and the winner are scored on the task: probe (a linear probe on frozen
    features: `eval/f1`) | prompt (each label's log-likelihood after a prompt, lm-evaluation-harness style:
    `eval/prompt_f1`; raycpt.core.eval.prompting) | both. `select.metric` names the one the pick uses."""
    template: str = "Text: {text}\nLabel: {label}"
    """eval.method prompt: the prompt for one text; {text} is the text, {label} the slot whose label word is scored."""
    shots: int = 4
    """eval.method prompt: in-context examples (template filled with a probe-train text and its label word) before
    each scored text; drawn once, seeded, the same for every text and model."""
    label_words: dict[str, str] = field(default_factory=dict)
    """eval.method prompt: the word scored for each label, e.g. {fresh: good, rotten: bad}; a label not named is
    scored as itself."""
    lm_eval_tasks: list[str] = field(default_factory=list)
    """lm-evaluation-harness tasks (or groups) scored on the in-memory model at every finished trial's end, for the
    base model once and for the winner on test: `lm_eval/<task>/<metric>` with a 95% interval (± 1.96 x lm-eval's
    standard error); empty = off. lm-eval's own names (hellaswag, arc_easy: their data come from the hub) or your
    task YAMLs' in `lm_eval_include_path`. Needs `pip install 'raycpt[lm-eval]'`; checked by `raycpt validate`."""
    lm_eval_include_path: str = ""
    """A directory of your own lm-eval task YAMLs (lm-eval's --include_path), e.g. experiments/lm_eval_tasks; a
    relative path is read from where raycpt runs. Relative `data_files` in those YAMLs are read from this directory
    (so trials find them whatever their working directory)."""
    lm_eval_num_fewshot: int = -1
    """lm-eval: in-context examples per question; -1 = each task's own default (its YAML's num_fewshot, else 0)."""
    lm_eval_limit: int = 0
    """lm-eval: score only the first N examples of each task (0 = all); quick looks, not numbers to publish."""
    lm_eval_batch_size: int = 8
    """lm-eval: requests per forward pass."""
    generate_path: str = ""
    """A jsonl file of {"input": ..., "target": ...} pairs: each input is continued greedily (HF generate on the
    in-memory model) and scored against its target: corpus BLEU and chrF (sacrebleu, 0-100) and ROUGE-L F (rouge-score,
    0-1), `gen/bleu`, `gen/chrf`, `gen/rougeL`, each with a 95% bootstrap interval over examples; at every finished
    trial's end, for the base model once and the winner on test; empty = off. Needs `pip install
    'raycpt[generate]'`."""
    generate_max_new_tokens: int = 64
    """Generation: tokens generated per input at most."""
    generate_stop: list[str] = field(default_factory=lambda: ["\n"])
    """Generation: it ends at the first of these strings (cut from the prediction), else after max_new_tokens."""
    generate_limit: int = 0
    """Generation: score only the first N pairs of the file (0 = all)."""


@dataclass
class SearchConfig:
    space: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    """Dotted field -> one distribution: {loguniform: [lo, hi]}, {uniform: [lo, hi]}, {choice: [...]},
    {grid: [...]}."""
    num_samples: int = 4
    """Samples drawn from the space (each grid point is sampled this many times; with optuna, trials proposed)."""
    scheduler: str = "asha"
    """asha | none."""
    metric: str = metrics.DOMAIN_PPL
    """What ASHA compares trials on (reported at every eval)."""
    mode: str = "min"
    """min | max: whether lower or higher values of search.metric are better."""
    grace_period: int = 1
    """ASHA: reports a trial gets before it can be stopped."""
    reduction_factor: int = 2
    """ASHA: keep the top 1/reduction_factor at each rung."""
    max_concurrent_trials: int = 0
    """0 = as many as the cluster's CPUs (or GPUs) fit."""
    seed: int = 0
    """Seed of the search (random sampler or optuna's TPE), so a sweep proposes the same hyperparameters again."""
    algorithm: str = "random"
    """random | optuna. random: Tune's seeded random sampling (and grid). optuna: model-based search (Optuna's TPE,
    via Tune's OptunaSearch): later trials are proposed from the metric of earlier ones (ASHA still stops trials
    early); num_samples is the number of trials; no grid distributions; `--resume` restores its state."""


@dataclass
class SelectConfig:
    metric: str = metrics.F1
    """The downstream metric the pick uses (its paired intervals decide ties): eval/f1 (the probe's macro-F1) |
    eval/prompt_f1 (prompted classification's; needs eval.method prompt or both) | an lm-eval score of one of
    eval.lm_eval_tasks, lm_eval/<task>/<metric> (e.g. lm_eval/hellaswag/acc_norm; a filter other than 'none' goes
    between: lm_eval/gsm8k/strict-match/exact_match), paired through its per-example values (a corpus-level score
    such as BLEU has none: then only equal scores tie)."""
    max_forgetting: float = 0.10
    """A winner's general ppl (point estimate) may be at most (1 + max_forgetting) x the base model's. Ties in F1
    are decided by paired bootstrap intervals on the validation texts (docs/selection.md)."""


@dataclass
class ResourcesConfig:
    num_workers: int = 1
    """Ray Train workers per trial (data parallel: see `strategy`)."""
    strategy: str = "ddp"
    """How workers share the model: ddp | fsdp. ddp: every worker holds the whole model and optimizer, gradients
    are all-reduced (DistributedDataParallel); checkpoints are HF save_pretrained dirs. fsdp: FSDP2 shards each
    decoder layer's params, grads and optimizer state over the workers (bf16 params with fp32 reduction on CUDA),
    for models whose training state does not fit one accelerator; checkpoints are sharded (torch DCP: each worker
    writes its shard) and resume on any number of workers; the export gathers them into HF safetensors. Losses
    match ddp to float rounding. With one worker there is nothing to shard: the model trains unwrapped, its
    checkpoints still in the sharded format."""
    fsdp_cpu_offload: bool = False
    """strategy fsdp: keep the sharded params, grads and optimizer step in CPU memory (slower; for models whose
    shards still do not fit the accelerators)."""
    use_gpu: bool = False
    """Give each worker one GPU (trials and the base measurement run on CUDA, bf16 autocast under precision auto)."""
    accelerator_type: str = ""
    """The GPU each worker gets, for the memory plan (`raycpt plan`): H100 | H200 | A100-80G | A100-40G | L40S | L4 |
    A10G. Set, `raycpt sweep` and `train` refuse a config whose plan does not fit it; empty = not checked."""
    cpus_per_worker: float = 1.0
    """CPUs Ray reserves for each worker (its data loading and, on CPU, its compute threads)."""
    worker_resources: dict[str, float] = field(default_factory=dict)
    """Extra (custom) Ray resources each worker needs, e.g. {accelerator_type:H100: 0.01} or a node label."""
    trial_cpus: float = 0.0
    """CPU held by each trial's driver, which only waits on its workers; 0 = none (it then reserves a little
    memory instead, since Ray needs a non-empty resource request)."""


@dataclass
class ReportConfig:
    loggers: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Tune logger callbacks: any of tensorboard, csv, json, mlflow, wandb (mlflow/wandb need their packages)."""
    mlflow_tracking_uri: str = ""
    """MLflow tracking URI (empty: MLFLOW_TRACKING_URI from the environment, else ./mlruns)."""
    wandb_project: str = ""
    """W&B project (the API key comes from WANDB_API_KEY in the environment, never from this file)."""
    plots: bool = True
    """Write PNG plots into the experiment dir at the end of a sweep."""


@dataclass
class ExportConfig:
    max_shard_size: str = "5GB"
    """Largest safetensors file of the exported winner (`save_pretrained(max_shard_size=...)`): a bigger model is
    written as model-0000k-of-0000n.safetensors + model.safetensors.index.json. A size such as 5GB, 500MB, 2GiB."""
    adapter: bool = False
    """train.method lora: also write the winner's unmerged PEFT adapter to export/adapter/ (load it onto the base
    model with peft's PeftModel.from_pretrained); the export itself is always the merged full weights."""
    push_to_hub: str = ""
    """Hugging Face Hub repo id (user/name) to upload the export to once its reload check passed; empty = off. The
    token comes from HF_TOKEN in the environment only, never from this file; the card's README.md becomes the
    repo's README."""
    dtype: str = "auto"
    """The exported weights' dtype: auto | float32 | bfloat16 | float16. auto = the base model's own, as its
    config.json names it (float32 when it names none): a bf16 hub model exports bf16, half the bytes of fp32;
    packaged:smollm2-135m (dequantised to float32) exports float32 unless this says bfloat16. The reload check
    still holds the export to the trial's numbers within 1e-3 (rounding fp32-trained SmolLM2-135M to bf16 moves its
    validation ppl by ~6e-4 on CPU); should it fail, export.dtype=float32 keeps the trained precision."""


@dataclass
class LawConfig:
    target_tokens: int = 0
    """Training tokens of the final run the sweep recommends (the CPT law's lr, mix and schedule at that budget, or
    the fallback; final.yaml of `raycpt analyze --suggest`); 0 = 10 x the largest budget (train.steps x tokens per
    step) of any trial in the sweep."""
    max_loo_error: float = 0.05
    """The schedule-aware CPT law (core.forecast.cpt_law) recommends the final run only when its leave-one-trial-out
    error on the trials' curves is at most this; otherwise the recommendation falls back (and says so)."""
    max_extrapolation: float = 4.0
    """How far past the data the CPT law may predict: the recommended run's forward area (sum of its lr over its
    steps) at most this multiple of the largest a trial reached; beyond it the recommendation falls back."""
    lr_horizon_exponent: float = 0.3
    """The fallback's lr for a longer run: the reference trial's lr x (run tokens / its tokens) ** -exponent (the
    token-horizon rule of Bjorck et al. 2025)."""
    fallback: str = "recipe"
    """The run recommended when the CPT law cannot carry one: recipe (Ibrahim et al. 2024's continual pre-training
    recipe around the reference trial's lr: re-warm over 1% of the steps, cosine re-decay to 0.1 x the peak, at
    least 5% general replay) | winner (the reference trial's own schedule, warmup and mix). Both scale the lr by
    law.lr_horizon_exponent."""


@dataclass
class ExtendConfig:
    on_forgetting: str = "stop"
    """`raycpt extend`: when the validation general ppl crosses (1 + select.max_forgetting) x the base model's, it
    says so at once and then: stop (the run ends there; its last checkpoint within the bound is the one exported,
    and the card says where and why) | warn (it runs on to the end)."""


@dataclass
class FinalConfig:
    tokens: int = 0
    """Total training tokens `raycpt sweep` continues the winner to at the end of the same job, as `raycpt extend
    EXPERIMENT_DIR --tokens N` does (0 = off). Needs wsd trials (train.schedule wsd)."""
    trial: str = ""
    """The trial final.tokens continues (empty = the winner)."""


@dataclass
class AugmentConfig:
    """`raycpt augment CONFIG`: a generator LM rewrites each training document of the domain corpus in a few
    styles (WRAP, EntiGraph), into a jsonl corpus (docs/augment.md). Held-out and downstream validation / test
    texts never reach the generator."""

    model: str = ""
    """The generator: a causal LM source (local dir, hub id, packaged:smollm2-135m); empty = model.source."""
    styles: list[str] = field(default_factory=lambda: ["paraphrase", "qa"])
    """The rewrites made of each document, by name: built in (paraphrase: encyclopedic paraphrase | qa: questions
    and answers | summary | simple: plain language | entities: the entities and how they relate) or one of
    `templates` (which wins over a built-in of the same name)."""
    templates: dict[str, str] = field(default_factory=dict)
    """Your own styles: name -> prompt with a {text} slot where the document goes, e.g. {glossary: "List the terms
    this text defines, each with its definition.\\n\\n{text}\\n\\nGlossary:\\n"}; only those named in `styles` run."""
    copies: int = 1
    """Rewrites per document per style, each sampled with its own seed."""
    max_new_tokens: int = 256
    """Tokens generated per rewrite at most (it also ends at the generator's end-of-sequence token)."""
    temperature: float = 0.7
    """Sampling temperature; 0 = greedy (then copies > 1 repeat the same text)."""
    top_p: float = 0.9
    """Nucleus sampling: sample from the smallest set of tokens whose probability reaches top_p (1 = all)."""
    seed: int = 0
    """Seed of the sampling: each rewrite's seed is derived from (seed, the document's text key, style, copy), so
    the output is the same for a seed whatever the batching and the workers."""
    max_input_tokens: int = 1024
    """A longer document is cut to its first max_input_tokens tokens before it goes into the prompt (less where
    the generator's positions need it)."""
    batch_size: int = 8
    """Prompts generated together (left-padded) per worker."""
    chat: bool = True
    """Wrap each prompt as a user message in the generator's chat template when its tokenizer has one."""
    workers: int = 0
    """Generator actors on Ray Data, each with its own copy of the model (one GPU each with resources.use_gpu);
    0 = as many as the cluster's CPUs (GPUs)."""
    output: str = ""
    """Where the rewrites go (augment.json and the corpus dir texts/); empty = <experiment dir>/augment."""


@dataclass
class CheckpointConfig:
    keep_optimizer: str = "latest"
    """latest: a running trial keeps optimizer state only in its newest checkpoint (the one a restart resumes
    from), and a trial that ended keeps none (a failed one keeps its newest whole, so `sweep --resume` can retry
    it) | all: every kept checkpoint keeps it (3x the weights for AdamW in the weights' dtype)."""
    keep_weights: str = "finished"
    """Which ended trials keep their checkpoints' weights: finished (ASHA-stopped trials keep none; only finished
    trials can win) | all."""
    keep_pre_decay: str = "winner"
    """train.schedule wsd: which trials keep their pre-decay checkpoint (weights and optimizer state, whole: what
    `raycpt extend` continues from) once the sweep is analysed; until then every trial keeps it. winner | top_k (the
    best `keep_pre_decay_k` under the selection rule) | all | none."""
    keep_pre_decay_k: int = 3
    """keep_pre_decay top_k: how many of the best trials keep theirs."""


@dataclass
class ExperimentConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    law: LawConfig = field(default_factory=LawConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    extend: ExtendConfig = field(default_factory=ExtendConfig)
    final: FinalConfig = field(default_factory=FinalConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    name: str = "raycpt"
    """Experiment name: results go to <storage_path>/<name>."""
    storage_path: str = "runs"
    """Where experiments are written (local dir, shared FS on clusters)."""

    def experiment_dir(self) -> Path:
        return Path(self.storage_path).expanduser().resolve() / self.name

    def augment_dir(self) -> Path:
        """Where `raycpt augment` writes: augment.output, default <experiment dir>/augment."""
        return Path(self.augment.output).expanduser().absolute() if self.augment.output else (
            self.experiment_dir() / "augment")

    def augments(self) -> bool:
        """data.synthetic names this experiment's own rewrites: the augment stage runs before the data step."""
        return self.data.synthetic == SYNTHETIC_FROM_AUGMENT

    def synthetic_source(self) -> str | dict[str, str]:
        """data.synthetic as a corpus source (`augment` resolved to the texts/ dir the augment stage writes)."""
        return str(self.augment_dir() / AUGMENT_TEXTS) if self.augments() else self.data.synthetic


SYNTHETIC_FROM_AUGMENT = "augment"
"""data.synthetic's keyword for this experiment's own rewrites (ExperimentConfig.synthetic_source)."""
AUGMENT_TEXTS = "texts"
"""The corpus dir inside the augment output."""
AUGMENT_MANIFEST = "augment.json"
"""The augment stage's record inside its output, written last (its presence says the stage finished)."""
REMOVED_FIELDS = {
    "select.f1_tolerance": "ties in F1 are now decided by paired bootstrap intervals on the validation texts; "
                           "delete the line",
}
"""Fields earlier versions had, with what replaced them (a config naming one gets told, not ignored)."""
DISTRIBUTIONS = ("loguniform", "uniform", "choice", "grid")
SEARCH_ALGORITHMS = ("random", "optuna")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
METHODS = ("full", "lora")
LOSS_IMPLS = ("auto", "hf", "chunked", "liger")
STRATEGIES = ("ddp", "fsdp")
ACCELERATOR_TYPES = ("H100", "H200", "A100-80G", "A100-40G", "L40S", "L4", "A10G")
"""GPUs the memory plan knows (their memory: raycpt.core.forecast.plan.ACCELERATOR_MEMORY_MIB)."""
KEEP_OPTIMIZER = ("latest", "all")
KEEP_WEIGHTS = ("finished", "all")
KEEP_PRE_DECAY = ("winner", "top_k", "all", "none")
ON_FORGETTING = ("stop", "warn")
LAW_FALLBACKS = ("recipe", "winner")
AUGMENT_STYLES = ("paraphrase", "qa", "summary", "simple", "entities")
"""augment.styles built in (their prompts: raycpt.core.augment.STYLE_TEMPLATES)."""
HUB_REPO = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
"""A Hugging Face Hub repo id: owner/name."""
SHARD_SIZE = re.compile(r"[1-9][0-9]*[KMG]i?B")
"""What transformers' save_pretrained accepts as max_shard_size: an integer with KB, MB, GB, KiB, MiB or GiB."""
DTYPES = ("float32", "bfloat16", "float16")
EXPORT_DTYPES = ("auto", *DTYPES)

TXT_UNITS = ("file", "paragraph", "line")
DEDUP_MODES = ("none", "exact")
LOGGERS = ("tensorboard", "csv", "json", "mlflow", "wandb")


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that reads `1e-4` as a float (YAML 1.1 wants a dot: `1.0e-4`), as users write it."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+|\.[0-9_]+"
               r"(?:[eE][-+]?[0-9]+)?|\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def _section_classes() -> dict[str, type]:
    return {f.name: f.default_factory for f in dataclasses.fields(ExperimentConfig) if f.default_factory
            is not dataclasses.MISSING}


EVAL_METHODS = ("probe", "prompt", "both")


def _closest(name: str, options: list[str]) -> str:
    match = difflib.get_close_matches(name, options, n=1)
    return f" (did you mean '{match[0]}'?)" if match else f" (valid: {', '.join(options)})"


def _coerce(value: Any, target: Any, where: str, problems: list[str]) -> Any:
    """Convert YAML/CLI values to the field's type, recording a problem instead of raising."""
    kind = target.__class__
    if isinstance(target, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        problems.append(f"{where}: expected true/false, got {value!r}")
        return target
    if isinstance(target, (int, float)):
        try:
            if isinstance(value, bool):
                raise ValueError
            converted = kind(float(value)) if kind is float else int(str(value), 0) if isinstance(
                value, str) else int(value)
            if kind is int and not isinstance(value, str) and float(value) != converted:
                raise ValueError
            return converted
        except (TypeError, ValueError):
            problems.append(f"{where}: expected {'a number' if kind is float else 'an integer'}, got {value!r}")
            return target
    if isinstance(target, str):
        if isinstance(value, (dict, list)):
            problems.append(f"{where}: expected a string, got {value!r}")
            return target
        return "" if value is None else str(value)
    if isinstance(target, list):
        if not isinstance(value, list):
            problems.append(f"{where}: expected a list, got {value!r}")
            return target
        return [str(v) for v in value]
    if isinstance(target, dict):
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a mapping, got {value!r}")
            return target
        return value
    return value


PATH_FIELDS = ("eval.lm_eval_include_path", "eval.generate_path")
"""Local paths trials read themselves (not the driver, as it does the corpora and the task): made absolute when the
config is loaded, so a trial finds them whatever its working directory."""
SOURCE_FIELDS = ("data.domain", "data.general", "data.synthetic", "eval.task", "eval.test_task")
"""Fields naming a corpus or task: a string, or a mapping with SOURCE_KEYS."""
SOURCE_KEYS = ("path", "name", "split", "revision", "text_field")
"""A source as a mapping: `path` (local file/dir/glob or hub id), hub `name`/`split`/`revision`, and its own
`text_field` (overrides data.text_field / eval.text_field for this source alone)."""


def _coerce_source(value: Any, where: str, problems: list[str]) -> str | dict[str, str]:
    """A source field: a string (path, hub id, packaged:...) or {path, name, split, revision} for a hub dataset."""
    if value is None:
        return ""
    if not isinstance(value, dict):
        if isinstance(value, list):
            problems.append(f"{where}: expected a path, hub id or mapping {{path: ..., name: ..., split: ...}}, "
                            f"got {value!r}")
            return value  # the problem is reported; not also "required"
        return str(value)
    unknown = sorted(str(k) for k in value if k not in SOURCE_KEYS)
    if unknown:
        problems.append(f"{where}.{unknown[0]}: unknown key{_closest(unknown[0], list(SOURCE_KEYS))}; a source "
                        f"mapping takes {', '.join(SOURCE_KEYS)}")
        return value
    if not value.get("path"):
        problems.append(f"{where}: a hub mapping needs path, e.g. {{path: wikitext, name: wikitext-2-raw-v1, "
                        "split: train}")
        return value
    bad = next((k for k, v in value.items() if isinstance(v, (dict, list, bool))), None)
    if bad:
        problems.append(f"{where}.{bad}: expected a string, got {value[bad]!r}")
        return value
    return {k: str(value[k]) for k in SOURCE_KEYS if value.get(k) is not None and value.get(k) != ""}


def _build(raw: dict[str, Any], problems: list[str]) -> ExperimentConfig:
    cfg = ExperimentConfig()
    sections = _section_classes()
    for key, value in raw.items():
        if key in sections:
            if value is None:
                continue
            if not isinstance(value, dict):
                problems.append(f"{key}: expected a mapping of fields, got {value!r}")
                continue
            section = getattr(cfg, key)
            names = [f.name for f in dataclasses.fields(section)]
            for sub, subvalue in value.items():
                if f"{key}.{sub}" in REMOVED_FIELDS:
                    problems.append(f"{key}.{sub}: removed; {REMOVED_FIELDS[f'{key}.{sub}']}")
                    continue
                if sub not in names:
                    problems.append(f"{key}.{sub}: unknown field{_closest(sub, names)}")
                    continue
                if f"{key}.{sub}" in SOURCE_FIELDS:
                    setattr(section, sub, _coerce_source(subvalue, f"{key}.{sub}", problems))
                    continue
                value = _coerce(subvalue, getattr(section, sub), f"{key}.{sub}", problems)
                if f"{key}.{sub}" in PATH_FIELDS and value:
                    value = str(Path(value).expanduser().absolute())
                setattr(section, sub, value)
        elif key in ("name", "storage_path"):
            setattr(cfg, key, _coerce(value, getattr(cfg, key), key, problems))
        else:
            problems.append(f"{key}: unknown section{_closest(key, list(sections) + ['name', 'storage_path'])}")
    return cfg


def parse_override(text: str) -> tuple[str, Any]:
    """`train.lr=3e-4` -> ("train.lr", 3e-4); values are parsed as YAML so lists and numbers work."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set train.lr=3e-4")
    key, value = text.split("=", 1)
    try:
        parsed = yaml.load(value, Loader=_YamlLoader) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return key.strip(), parsed


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys in a raw config mapping (`search.space.train.lr` keeps its dotted tail as one key)."""
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for key, value in overrides.items():
        parts = key.split(".")
        if parts[0] == "search" and len(parts) > 2 and parts[1] == "space":
            raw.setdefault("search", {}).setdefault("space", {})
            raw["search"]["space"] = dict(raw["search"]["space"] or {})
            raw["search"]["space"][".".join(parts[2:])] = value
        elif len(parts) == 1:
            raw[key] = value
        else:
            section = raw.setdefault(parts[0], {})
            if not isinstance(section, dict):
                section = raw[parts[0]] = {}
            section[".".join(parts[1:])] = value
    return raw


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path}: not found; pass a YAML file such as experiments/laptop.yaml")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_YamlLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        reason = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"config file {path}:{where}: YAML syntax error: {reason}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path}: not UTF-8 text") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path}: expected a mapping of sections (data:, train:, ...) at the top")
    return raw


def load_config(path: str | os.PathLike | None, overrides: list[str] | dict[str, Any] | None = None
                ) -> ExperimentConfig:
    """Read YAML, apply `--set` overrides, validate. Raises ConfigError with every problem found."""
    raw = read_yaml(path) if path is not None else {}
    if isinstance(overrides, list):
        overrides = dict(parse_override(o) for o in overrides)
    raw = apply_overrides(raw, overrides or {})
    return config_from_dict(raw)


def config_from_dict(raw: dict[str, Any]) -> ExperimentConfig:
    problems: list[str] = []
    cfg = _build(raw, problems)
    problems += validate(cfg)
    if problems:
        raise ConfigError("; ".join(problems))
    return cfg


def to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def with_sample(cfg: ExperimentConfig, sample: dict[str, Any]) -> ExperimentConfig:
    """A trial's config: `cfg` with the trial's sampled hyperparameters (`train.*` keys, as search.space names
    them) applied, each converted to its field's type as the YAML would be. The rest is `cfg` itself: the whole
    config, its search space and every value the space can produce were validated once, when the sweep started
    (`validate`), so a trial start builds and checks nothing else."""
    problems: list[str] = []
    changes = {}
    for key, value in sample.items():
        section, _, name = key.partition(".")
        if section != "train" or name not in {f.name for f in dataclasses.fields(TrainConfig)}:
            problems.append(f"search.space.{key}: not sweepable (only train.* fields are)")
            continue
        changes[name] = _coerce(value, getattr(cfg.train, name), key, problems)
    if problems:
        raise ConfigError("; ".join(problems))
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **changes))


def with_overrides(cfg: ExperimentConfig, overrides: dict[str, Any]) -> ExperimentConfig:
    """A copy of `cfg` with dotted overrides applied (how a trial's sampled hyperparameters are applied)."""
    return config_from_dict(apply_overrides(to_dict(cfg), overrides))


def _check_range(problems: list[str], where: str, value: float, lo: float | None = None, hi: float | None = None,
                 lo_open: bool = False, hint: str = "") -> None:
    bad = (lo is not None and (value <= lo if lo_open else value < lo)) or (hi is not None and value > hi)
    if bad:
        lo_txt = "" if lo is None else (f"> {lo}" if lo_open else f">= {lo}")
        hi_txt = "" if hi is None else f"<= {hi}"
        allowed = " and ".join(t for t in (lo_txt, hi_txt) if t)
        problems.append(f"{where}: {value} is out of range, must be {allowed}{hint}")


def _validate_space(space: dict[str, Any], problems: list[str]) -> None:
    # data.block_size is not sweepable: the data is packed once for the whole sweep (say so, rather than ignore it)
    sweepable = {f"train.{f.name}" for f in dataclasses.fields(TrainConfig)}
    for key, spec in space.items():
        if key == "data.block_size":
            problems.append("search.space.data.block_size: not sweepable (the corpora are packed once per sweep); "
                            "run one sweep per block size with --set data.block_size=N --set name=<new name>")
            continue
        if key not in sweepable:
            problems.append(f"search.space.{key}: not a sweepable field{_closest(key, sorted(sweepable))}")
            continue
        if not isinstance(spec, dict) or len(spec) != 1:
            problems.append(f"search.space.{key}: expected one distribution, e.g. {{loguniform: [1e-5, 1e-3]}}")
            continue
        (dist, args), = spec.items()
        if dist not in DISTRIBUTIONS:
            problems.append(f"search.space.{key}: unknown distribution '{dist}'{_closest(dist, list(DISTRIBUTIONS))}")
        elif not isinstance(args, list) or not args:
            problems.append(f"search.space.{key}.{dist}: expected a non-empty list")
        elif dist in ("loguniform", "uniform"):
            if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
                problems.append(f"search.space.{key}.{dist}: expected [low, high] numbers, got {args!r}")
            elif args[0] >= args[1] or (dist == "loguniform" and args[0] <= 0):
                problems.append(f"search.space.{key}.{dist}: need 0 < low < high for loguniform, low < high for "
                                f"uniform, got {args!r}")
        else:
            probe = TrainConfig() if key.startswith("train.") else DataConfig()
            for value in args:
                sub: list[str] = []
                _coerce(value, getattr(probe, key.split(".", 1)[1]), f"search.space.{key}", sub)
                problems += sub[:1]


def _validate_augment(a: AugmentConfig, p: list[str]) -> None:
    """The augment section: styles that exist, templates with a {text} slot, sampling settings in range."""
    for name, template in a.templates.items():
        if not isinstance(template, str) or not template.strip():
            p.append(f"augment.templates.{name}: empty; write a prompt with a {{text}} slot, e.g. "
                     "'Rewrite this as a textbook section:\\n\\n{text}\\n'")
        elif "{text}" not in template:
            p.append(f"augment.templates.{name}: no {{text}} slot, so the document would not reach the prompt; "
                     "put {text} where the document goes")
    known = [*AUGMENT_STYLES, *(n for n in a.templates if n not in AUGMENT_STYLES)]
    for name in a.styles:
        if name not in known:
            p.append(f"augment.styles: '{name}' is neither built in nor in augment.templates{_closest(name, known)}")
    if not a.styles:
        p.append(f"augment.styles: empty; name at least one style (built in: {', '.join(AUGMENT_STYLES)})")
    repeated = sorted({name for name in a.styles if a.styles.count(name) > 1})
    if repeated:
        p.append(f"augment.styles: {', '.join(repeated)} named twice; name each style once (augment.copies sets "
                 "the rewrites per style)")
    _check_range(p, "augment.copies", a.copies, 1)
    _check_range(p, "augment.max_new_tokens", a.max_new_tokens, 1)
    _check_range(p, "augment.temperature", a.temperature, 0)
    _check_range(p, "augment.top_p", a.top_p, 0, 1, lo_open=True)
    _check_range(p, "augment.max_input_tokens", a.max_input_tokens, 1)
    _check_range(p, "augment.batch_size", a.batch_size, 1)
    _check_range(p, "augment.workers", a.workers, 0)


def validate(cfg: ExperimentConfig) -> list[str]:
    """Every problem in the config, each naming the field and what is allowed."""
    p: list[str] = []
    d, t, s, r, m, e = cfg.data, cfg.train, cfg.search, cfg.resources, cfg.model, cfg.eval
    if not d.domain:
        p.append("data.domain: required; give a corpus path, a hub dataset or packaged:rotten-tomatoes")
    if not m.source:
        p.append("model.source: required; a local dir, hub id or packaged:smollm2-135m")
    if d.txt_unit not in TXT_UNITS:
        p.append(f"data.txt_unit: '{d.txt_unit}' is not allowed{_closest(d.txt_unit, list(TXT_UNITS))}")
    if m.dtype not in DTYPES:
        p.append(f"model.dtype: '{m.dtype}' is not allowed{_closest(m.dtype, list(DTYPES))}")
    _check_range(p, "data.block_size", d.block_size, 8, 1 << 17)
    _check_range(p, "data.heldout_fraction", d.heldout_fraction, 0, 0.5, lo_open=True)
    _check_range(p, "data.heldout_blocks", d.heldout_blocks, 1)
    _check_range(p, "data.test_blocks", d.test_blocks, 0)
    _check_range(p, "data.max_tokens", d.max_tokens, 0)
    if d.dedup not in DEDUP_MODES:
        p.append(f"data.dedup: '{d.dedup}' is not allowed{_closest(d.dedup, list(DEDUP_MODES))}")
    _check_range(p, "data.shards", d.shards, 0, 1 << 16)
    _check_range(p, "data.unit_mb", d.unit_mb, 0, 1 << 14, lo_open=True)
    if d.streaming and not d.max_tokens:
        p.append("data.streaming: a streamed corpus needs data.max_tokens (how much of it to read); set it, e.g. "
                 "data.max_tokens=50000000")
    _check_range(p, "train.lr", t.lr, 0, 1, lo_open=True)
    _check_range(p, "train.min_lr_ratio", t.min_lr_ratio, 0, 1)
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(t, name) < 1:
            p.append(f"train.{name}: {getattr(t, name)} is out of range, must be >= 0 and < 1")
    _check_range(p, "train.adam_eps", t.adam_eps, 0, lo_open=True)
    _check_range(p, "train.warmup_steps", t.warmup_steps, 0)
    _check_range(p, "train.peak_tflops", t.peak_tflops, 0)
    _check_range(p, "train.steps", t.steps, 1)
    _check_range(p, "train.tokens", t.tokens, 0)
    if (t.tokens > 0 or "train.tokens" in s.space) and "train.steps" in s.space:
        p.append("search.space.train.steps: the run length is set by train.tokens; sweep train.tokens or "
                 "train.steps, not both (set train.tokens=0 to sweep steps)")
    if t.tokens > 0 and t.global_batch() >= 1 and d.block_size >= 1:
        if t.warmup_steps > t.total_steps(d.block_size):
            p.append(f"train.warmup_steps: {t.warmup_steps} is more than the {t.total_steps(d.block_size)} steps "
                     f"train.tokens={t.tokens} makes; lower train.warmup_steps or raise train.tokens")
    elif t.warmup_steps > t.steps >= 1:
        p.append(f"train.warmup_steps: {t.warmup_steps} is more than train.steps={t.steps}; the learning rate would "
                 "never reach its peak, lower train.warmup_steps")
    if t.schedule not in SCHEDULES:
        p.append(f"train.schedule: '{t.schedule}' is not allowed{_closest(t.schedule, list(SCHEDULES))}")
    if t.decay_shape not in DECAY_SHAPES:
        p.append(f"train.decay_shape: '{t.decay_shape}' is not allowed{_closest(t.decay_shape, list(DECAY_SHAPES))}")
    _check_range(p, "train.decay_fraction", t.decay_fraction, 0, 1, lo_open=True)
    if t.schedule == "wsd" and 0 < t.decay_fraction <= 1 and t.global_batch() >= 1 and d.block_size >= 1:
        total = t.total_steps(d.block_size)
        stable = stable_end(total, t.decay_fraction)
        if t.warmup_steps > stable:
            p.append(f"train.decay_fraction: {t.decay_fraction} of {total} steps leaves {stable} steps before the "
                     f"cool-down, fewer than train.warmup_steps={t.warmup_steps}; lower train.decay_fraction or "
                     "train.warmup_steps, or raise the run's length")
    _check_range(p, "train.batch_size", t.batch_size, 1)
    _check_range(p, "train.grad_accum", t.grad_accum, 1)
    _check_range(p, "train.global_batch_size", t.global_batch_size, 0)
    if t.global_batch() % max(1, r.num_workers):
        p.append(f"train.global_batch_size: {t.global_batch()} blocks per step cannot be split evenly over "
                 f"resources.num_workers={r.num_workers}; use a multiple of the number of workers")
    _check_range(p, "train.weight_decay", t.weight_decay, 0, 1)
    _check_range(p, "train.dropout", t.dropout, 0, 0.9)
    _check_range(p, "train.mix_ratio", t.mix_ratio, 0, 1)
    _check_range(p, "train.distill_weight", t.distill_weight, 0)
    _check_range(p, "train.synthetic_ratio", t.synthetic_ratio, 0, 1)
    _check_range(p, "train.eval_every", t.eval_every, 1)
    _check_range(p, "train.grad_clip", t.grad_clip, 0)
    _check_range(p, "train.early_stopping_patience", t.early_stopping_patience, 0)
    if t.loss_impl not in LOSS_IMPLS:
        p.append(f"train.loss_impl: '{t.loss_impl}' is not allowed{_closest(t.loss_impl, list(LOSS_IMPLS))}")
    if t.precision not in PRECISIONS:
        p.append(f"train.precision: '{t.precision}' is not allowed{_closest(t.precision, list(PRECISIONS))}")
    elif t.precision == "fp16":
        if not r.use_gpu:
            p.append("train.precision: fp16 needs a GPU (float16 autocast is for GPUs without bf16); set "
                     "resources.use_gpu=true, or use fp32 / bf16 on CPU")
        if m.dtype != "float32":
            p.append(f"train.precision: fp16 needs model.dtype float32 (the loss scaler unscales fp32 gradients), "
                     f"got {m.dtype}; set model.dtype=float32")
        if r.strategy == "fsdp":
            p.append("train.precision: fp16 is not supported with resources.strategy=fsdp; use bf16 or "
                     "resources.strategy=ddp")
    if t.method not in METHODS:
        p.append(f"train.method: '{t.method}' is not allowed{_closest(t.method, list(METHODS))}")
    elif r.strategy == "fsdp" and (t.method == "lora" or "train.method" in s.space):
        p.append("train.method: lora is not supported with resources.strategy=fsdp (its frozen weights need no "
                 "sharded optimizer); use resources.strategy=ddp")
    _check_range(p, "train.lora_rank", t.lora_rank, 1)
    _check_range(p, "train.lora_alpha", t.lora_alpha, 0, lo_open=True)
    _check_range(p, "train.lora_dropout", t.lora_dropout, 0, 0.9)
    if cfg.export.adapter and t.method != "lora" and "train.method" not in s.space:
        p.append("export.adapter: only a train.method=lora run has an adapter to export; set train.method=lora or "
                 "export.adapter=false")
    if cfg.export.push_to_hub and not HUB_REPO.fullmatch(cfg.export.push_to_hub):
        p.append(f"export.push_to_hub: '{cfg.export.push_to_hub}' is not a hub repo id; write user/name (or "
                 "org/name), or leave it empty")
    if not d.general and t.mix_ratio < 1 and "train.mix_ratio" not in s.space:
        p.append("train.mix_ratio: below 1 needs general replay data; set data.general or train.mix_ratio=1")
    # swept: _check_space_values checks every value of the space against this rule
    if not d.general and t.distill_weight > 0 and "train.distill_weight" not in s.space:
        p.append("train.distill_weight > 0 needs general replay data; set data.general")
    # swept: _check_space_values checks every value of the space against this rule
    if not d.synthetic and t.synthetic_ratio > 0 and "train.synthetic_ratio" not in s.space:
        p.append("train.synthetic_ratio > 0 needs a synthetic corpus; set data.synthetic (e.g. the texts/ dir "
                 "`raycpt augment` wrote)")
    if e.task:
        _check_range(p, "eval.train_size", e.train_size, 0)
        _check_range(p, "eval.val_size", e.val_size, 2)
        _check_range(p, "eval.test_size", e.test_size, 2)
        _check_range(p, "eval.seeds", e.seeds, 1, 100)
        _check_range(p, "eval.max_length", e.max_length, 1)
    _check_range(p, "search.num_samples", s.num_samples, 1)
    if s.scheduler not in ("asha", "none"):
        p.append(f"search.scheduler: '{s.scheduler}' is not allowed (valid: asha, none)")
    if s.mode not in ("min", "max"):
        p.append(f"search.mode: '{s.mode}' is not allowed (valid: min, max)")
    if s.metric not in metrics.SCHEDULABLE:
        p.append(f"search.metric: '{s.metric}' is not reported during training (use "
                 f"{', '.join(metrics.SCHEDULABLE)})")
    _check_range(p, "search.grace_period", s.grace_period, 1)
    _check_range(p, "search.reduction_factor", s.reduction_factor, 2)
    _check_range(p, "search.max_concurrent_trials", s.max_concurrent_trials, 0)
    _validate_space(s.space, p)
    if s.algorithm not in SEARCH_ALGORITHMS:
        p.append(f"search.algorithm: '{s.algorithm}' is not allowed{_closest(s.algorithm, list(SEARCH_ALGORITHMS))}")
    elif s.algorithm == "optuna":
        p += [f"search.space.{key}: grid is not supported by search.algorithm=optuna (it proposes values itself); "
              "use choice, or search.algorithm=random" for key, spec in s.space.items()
              if isinstance(spec, dict) and "grid" in spec]
        if not s.space:
            p.append("search.algorithm: optuna needs a search.space to search; add one or use "
                     "search.algorithm=random")
    _check_range(p, "law.target_tokens", cfg.law.target_tokens, 0)
    _check_range(p, "law.max_loo_error", cfg.law.max_loo_error, 0)
    _check_range(p, "law.max_extrapolation", cfg.law.max_extrapolation, 1)
    _check_range(p, "law.lr_horizon_exponent", cfg.law.lr_horizon_exponent, 0, 1)
    if cfg.law.fallback not in LAW_FALLBACKS:
        p.append(f"law.fallback: '{cfg.law.fallback}' is not allowed{_closest(cfg.law.fallback, list(LAW_FALLBACKS))}")
    _check_range(p, "select.max_forgetting", cfg.select.max_forgetting, 0)
    e = cfg.eval
    if e.method not in EVAL_METHODS:
        p.append(f"eval.method: '{e.method}' is not allowed{_closest(e.method, list(EVAL_METHODS))}")
    _check_range(p, "eval.shots", e.shots, 0)
    if e.method in ("prompt", "both") and not ("{text}" in e.template and "{label}" in e.template):
        p.append(f"eval.template: {e.template!r} needs a {{text}} and a {{label}} slot, e.g. "
                 "'Review: {text}\nSentiment: {label}'")
    if cfg.select.metric.startswith(metrics.LM_EVAL_PREFIX):
        task = cfg.select.metric.removeprefix(metrics.LM_EVAL_PREFIX).split("/", 1)
        if len(task) < 2 or not task[1] or task[0] not in e.lm_eval_tasks:
            p.append(f"select.metric: '{cfg.select.metric}' names no score of eval.lm_eval_tasks "
                     f"({', '.join(e.lm_eval_tasks) or 'none'}); write lm_eval/<task>/<metric> for one of them, "
                     "e.g. lm_eval/hellaswag/acc_norm")
    elif (pick := cfg.select.metric) not in metrics.DOWNSTREAM:  # the reference lists the forms from the docstring
        p.append(f"select.metric: '{pick}' is not allowed"
                 f"{_closest(cfg.select.metric, list(metrics.DOWNSTREAM))} (or an lm-eval score, "
                 "lm_eval/<task>/<metric>)")
    elif cfg.select.metric == metrics.PROMPT_F1 and e.method == "probe":
        p.append("select.metric: eval/prompt_f1 needs eval.method prompt or both (trials score only the probe now)")
    elif cfg.select.metric == metrics.F1 and e.method == "prompt" and e.task:
        p.append("select.metric: eval/f1 is the probe's, but eval.method is prompt; set select.metric=eval/prompt_f1 "
                 "or eval.method=both")
    if any(not name.strip() for name in e.lm_eval_tasks):
        p.append("eval.lm_eval_tasks: an empty task name; list lm-eval task names, e.g. [hellaswag, arc_easy]")
    _check_range(p, "eval.lm_eval_num_fewshot", e.lm_eval_num_fewshot, -1)
    _check_range(p, "eval.lm_eval_limit", e.lm_eval_limit, 0)
    _check_range(p, "eval.lm_eval_batch_size", e.lm_eval_batch_size, 1)
    _check_range(p, "eval.generate_max_new_tokens", e.generate_max_new_tokens, 1)
    _check_range(p, "eval.generate_limit", e.generate_limit, 0)
    if "" in e.generate_stop:
        p.append("eval.generate_stop: an empty stop string would end every generation before its first token; "
                 "remove it")
    _check_range(p, "resources.num_workers", r.num_workers, 1)
    _check_range(p, "resources.cpus_per_worker", r.cpus_per_worker, 0, lo_open=True)
    _check_range(p, "resources.trial_cpus", r.trial_cpus, 0)
    if r.strategy not in STRATEGIES:
        p.append(f"resources.strategy: '{r.strategy}' is not allowed{_closest(r.strategy, list(STRATEGIES))}")
    elif r.fsdp_cpu_offload and r.strategy != "fsdp":
        p.append("resources.fsdp_cpu_offload: only applies to resources.strategy=fsdp; set it or drop the offload")
    if r.accelerator_type and r.accelerator_type not in ACCELERATOR_TYPES:
        p.append(f"resources.accelerator_type: '{r.accelerator_type}' is not known"
                 f"{_closest(r.accelerator_type, list(ACCELERATOR_TYPES))}; leave it empty to skip the memory check")
    elif r.accelerator_type and not r.use_gpu:
        p.append(f"resources.accelerator_type: {r.accelerator_type} is a GPU but resources.use_gpu is false; set "
                 "resources.use_gpu=true or leave accelerator_type empty")
    if cfg.checkpoint.keep_optimizer not in KEEP_OPTIMIZER:
        p.append(f"checkpoint.keep_optimizer: '{cfg.checkpoint.keep_optimizer}' is not allowed"
                 f"{_closest(cfg.checkpoint.keep_optimizer, list(KEEP_OPTIMIZER))}")
    if cfg.checkpoint.keep_weights not in KEEP_WEIGHTS:
        p.append(f"checkpoint.keep_weights: '{cfg.checkpoint.keep_weights}' is not allowed"
                 f"{_closest(cfg.checkpoint.keep_weights, list(KEEP_WEIGHTS))}")
    if cfg.checkpoint.keep_pre_decay not in KEEP_PRE_DECAY:
        p.append(f"checkpoint.keep_pre_decay: '{cfg.checkpoint.keep_pre_decay}' is not allowed"
                 f"{_closest(cfg.checkpoint.keep_pre_decay, list(KEEP_PRE_DECAY))}")
    _check_range(p, "checkpoint.keep_pre_decay_k", cfg.checkpoint.keep_pre_decay_k, 1)
    if cfg.extend.on_forgetting not in ON_FORGETTING:
        p.append(f"extend.on_forgetting: '{cfg.extend.on_forgetting}' is not allowed"
                 f"{_closest(cfg.extend.on_forgetting, list(ON_FORGETTING))}")
    _check_range(p, "final.tokens", cfg.final.tokens, 0)
    if cfg.final.tokens > 0 and t.schedule != "wsd" and "train.schedule" not in s.space:
        p.append(f"final.tokens: continuing a trial to {cfg.final.tokens} tokens needs wsd trials (only they keep a "
                 f"pre-decay checkpoint); set train.schedule=wsd, or final.tokens=0")
    _validate_augment(cfg.augment, p)
    if not SHARD_SIZE.fullmatch(cfg.export.max_shard_size):
        p.append(f"export.max_shard_size: '{cfg.export.max_shard_size}' is not a size; write e.g. 5GB, 500MB or 2GiB")
    if cfg.export.dtype not in EXPORT_DTYPES:
        p.append(f"export.dtype: '{cfg.export.dtype}' is not allowed{_closest(cfg.export.dtype, list(EXPORT_DTYPES))}")
    unknown_loggers = sorted(set(cfg.report.loggers) - set(LOGGERS))
    if unknown_loggers:
        p.append(f"report.loggers: {unknown_loggers} not allowed (valid: {', '.join(LOGGERS)})")
    for key, value in r.worker_resources.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            p.append(f"resources.worker_resources.{key}: expected a positive number, got {value!r}")
    if "://" in cfg.storage_path:
        p.append(f"storage_path: '{cfg.storage_path}' is a URI; raycpt writes the experiment dir as local files: "
                 "mount the bucket or a shared filesystem and give its path")
    if not cfg.name or "/" in cfg.name or cfg.name.startswith("."):
        p.append(f"name: '{cfg.name}' must be a plain directory name (no '/', not starting with '.')")
    if s.space and not any(problem.startswith("search.space") for problem in p):
        _check_space_values(cfg, p)
    return p


def _space_problem(key: str, dist: str, value: Any, problem: str, other: str = "") -> str:
    """'search.space.train.lr: choice value -0.0001 is out of range, must be > 0 and <= 1' from the problem the
    field's own check found with that value."""
    where, _, message = problem.partition(": ")
    try:
        leads = where == key and float(message.split(" ", 1)[0]) == float(value)
    except (TypeError, ValueError):
        leads = False
    if leads:  # the message starts with the value: say where it came from
        return f"search.space.{key}: {dist} value {message}{other}"
    return f"search.space.{key}: {dist} value {value!r}{other}: {problem}"


def _check_space_values(cfg: ExperimentConfig, problems: list[str]) -> None:
    """Every value the search space can produce (both ends of a uniform/loguniform range, every choice and grid
    value) must pass the checks `validate` applies to the field, alone and with every value of each other swept
    field (so the worst combination is caught, e.g. the largest warmup with the fewest steps). Adds one problem
    per field at most."""
    baseline = set(problems)
    candidates = {}
    for key, spec in cfg.search.space.items():
        (dist, args), = spec.items()
        candidates[key] = (dist, list(args) if dist in ("choice", "grid") else [args[0], args[-1]])

    def found(values: dict[str, Any]) -> str | None:
        raw = to_dict(cfg)
        raw["search"]["space"] = {}
        raw["search"]["algorithm"] = "random"  # the values alone: optuna would object to the empty space
        for key, value in values.items():
            section, name = key.split(".", 1)
            raw[section][name] = value
        sub: list[str] = []
        trial = _build(raw, sub)
        for problem in sub + validate(trial):
            if problem not in baseline or any(key in problem for key in values):
                return problem
        return None

    bad = set()
    for key, (dist, values) in candidates.items():
        for value in values:
            problem = found({key: value})
            if problem:
                problems.append(_space_problem(key, dist, value, problem))
                bad.add(key)
                break
    keys = [key for key in candidates if key not in bad]
    for i, first in enumerate(keys):
        for second in keys[i + 1:]:
            for a, b in [(a, b) for a in candidates[first][1] for b in candidates[second][1]][:1024]:
                problem = found({first: a, second: b})
                if problem:
                    key, value, other, other_value = ((second, b, first, a) if problem.startswith(second + ":")
                                                      else (first, a, second, b))
                    problems.append(_space_problem(key, candidates[key][0], value, problem,
                                                   f" (with search.space.{other} = {other_value!r})"))
                    return


CONFIG_FILE = "raycpt_config.json"
"""The resolved config, saved in every experiment dir and checkpoint."""


def load_saved_config(exp_dir: str | os.PathLike, overrides: list[str] | None = None, *,
                      relocate: bool = False) -> ExperimentConfig:
    """The config an experiment dir was run with, plus `--set` overrides. `relocate` points storage_path/name at
    `exp_dir` itself (a sweep lives where its dir is now, wherever it was started from)."""
    exp_dir = Path(exp_dir)
    path = exp_dir / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{exp_dir}: not a raycpt experiment dir (no {CONFIG_FILE}); pass the "
                          "<storage_path>/<name> dir of a sweep")
    try:
        raw = read_json(path)
    except (ValueError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid JSON ({str(err).splitlines()[0][:120]}); restore it from a "
                          f"checkpoint's {CONFIG_FILE} or re-run the sweep") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of config sections; restore it or re-run the sweep")
    for dotted in REMOVED_FIELDS:  # an experiment run by an earlier version stays readable
        section, _, name = dotted.partition(".")
        if isinstance(raw.get(section), dict):
            raw[section].pop(name, None)
    raw = apply_overrides(raw, dict(parse_override(o) for o in overrides or []))
    if relocate:
        raw["storage_path"], raw["name"] = str(exp_dir.resolve().parent), exp_dir.resolve().name
    return config_from_dict(raw)
