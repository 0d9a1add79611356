"""`raycpt plan CONFIG`: memory per worker before anything runs, and whether it fits the named accelerator.

Pure arithmetic on the model's architecture, read from its Hugging Face config alone (the module tree is built on
the meta device for exact parameter counts: no weights are loaded or downloaded, so an 8B hub config plans in
seconds). No Ray, no GPU. `raycpt sweep` and `raycpt train` run `check_fits` first and refuse a config that cannot
fit its `resources.accelerator_type`.

Per worker, P parameters in `model.dtype` (p bytes each), shard = num_workers under fsdp (else 1):
- weights P*p/shard; gradients P*p/shard (+ V*h*p for tied embeddings: the input embedding's gradient is
  accumulated into the head's); AdamW exp_avg + exp_avg_sq 2*P*p/shard (torch keeps them in the params' dtype:
  fp32 params are the fp32 master weights; 16-bit params get 16-bit state and no master copy).
- ddp with several workers: DDP's reducer buckets, one more copy of the gradients (P*p).
- fsdp with several workers: the all-gathered root unit (embeddings, head, final norm) and two decoder layers
  (current + prefetch), in bf16 under mixed precision, plus one layer's unsharded gradients in fp32.
- activations per decoder layer, Korthikanti et al. 2022 ("Reducing Activation Recomputation", no tensor or
  sequence parallelism: s*b*h*(34 + 5*a*s/h) bytes at 2-byte precision, with a 4h GeLU MLP and dropout), adapted:
  per token, h*(2*r + e*(3 + 2*kv/a + 1 + m*f/h)) bytes: two norm inputs in the residual stream's dtype r, the
  attention's input, Q, K, V (K and V shrink with grouped-query heads kv/a) and output, the MLP's input and m
  ffn-wide tensors (m = 4 for gated SwiGLU/GeGLU MLPs: gate, up, act, product; 2 for plain ones); e = 2 under
  bf16 autocast, else p. The a*s*s score matrix is stored only by eager attention (SDPA and flash attention keep
  a log-sum-exp per row); dropout masks (1 byte) only when train.dropout > 0. With activation checkpointing:
  each layer's input (s*b*h*r) plus one layer recomputed in backward. Outside the layers: 3*s*b*h*r.
- logits (N = micro-batch x block tokens, vocabulary V): the hf loss holds three fp32 [N, V] buffers at the start
  of backward (log-probs, their gradient, the logits' gradient), plus the 16-bit logits under autocast; the
  chunked loss (and liger) one fp32 [min(N, 1024), V] chunk, the head's fp32 weight gradient and the hidden
  gradient.
- CUDA context, cuBLAS workspace and NCCL buffers: ~1.5 GiB per GPU.
- train.method lora: the weights gain the adapter (rank x (in + out) per adapted linear layer, + out for DoRA's
  magnitudes; + a trained copy of the embeddings, and of an untied head, with lora_train_embeddings), and the
  gradients, AdamW state, DDP buckets and checkpoint shrink to those trained params. Activations stay those of full
  training: backward still runs through the frozen layers to reach the adapters below them.
- train.distill_weight > 0: method full adds the frozen teacher's weights (P*p, never sharded: every worker holds
  a whole copy; lora has none, its teacher is the model with the adapters disabled), and both methods the logits
  of the general rows of a micro-batch, G rows (at most min(micro-batch, the step's general blocks)) x s x V: the
  teacher's and the student's in the compute dtype e, and the KL's fp32 buffers (log-softmax of each, the
  teacher's probabilities and the gradient of the student's logits); under the hf loss the student's logits are
  counted in `logits` already. Time: one extra forward (no backward) on each general row.
The components are summed as if all were alive at once (a small over-estimate: activations are freed while
gradients are allocated). Measured against the peak RSS of the loop's own step on CPU: see
docs/big-corpora.md#memory-plan.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from raycpt.core.config import ACCELERATOR_TYPES, ExperimentConfig, TrainConfig, with_overrides
from raycpt.core.errors import ConfigError, InputError
from raycpt.core.model.loss import chunked_supported, resolve_loss_impl
from raycpt.core.model.parallel import decoder_layers
from raycpt.core.prepare import check_model

GiB = 2**30
ACCELERATOR_MEMORY_MIB = {"H100": 81559, "H200": 143771, "A100-80G": 81920, "A100-40G": 40960, "L40S": 46068,
                          "L4": 23034, "A10G": 23028}
"""Memory per GPU as nvidia-smi reports it (MiB), for each name resources.accelerator_type accepts."""
HEADROOM = 0.10
"""Share of the accelerator (or host RAM) left free: allocator fragmentation, kernels' workspaces, what the
estimate leaves out."""
CUDA_RUNTIME_BYTES = int(1.5 * GiB)
"""CUDA context, cuBLAS workspace and NCCL buffers per GPU (approximate)."""
LOSS_CHUNK_ROWS = 1024
"""Rows of logits the chunked loss holds at once (raycpt.core.model.loss.causal_lm_loss's chunk_size)."""
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GATE_NAMES = ("gate_proj", "gate_up_proj", "w3", "wi_0")
"""Submodule names of gated (SwiGLU/GeGLU) MLPs: Llama, Mistral, Qwen, Gemma, Phi-3, T5-style."""


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of the architecture, from its HF config (no weights)."""

    source: str
    model_type: str
    params: int
    """Unique parameters (tied embeddings counted once)."""
    layers: int
    layer_params: int
    """Parameters of one decoder layer (the FSDP unit)."""
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    tied: bool
    gated: bool
    attention: str
    """The attention implementation transformers picks: sdpa | eager | flash_attention_2 ..."""
    chunked_loss: bool
    """Whether the chunked/liger losses can compute this model's loss (else the loop falls back to hf)."""
    linears: tuple[tuple[str, int, int], ...] = ()
    """(qualified name, in features, out features) of every linear layer but the LM head: what LoRA can adapt."""


@dataclass
class Fix:
    """One change (cumulative with the ones before it) and the plan's total with it."""

    overrides: dict[str, Any]
    total: int
    fits: bool


@dataclass
class Plan:
    shape: ModelShape
    strategy: str
    world_size: int
    device: str
    micro_batch: int
    grad_accum: int
    global_batch: int
    block_size: int
    precision: str
    """What the step computes in: bf16 autocast or the weights' dtype."""
    loss_impl: str
    checkpointing: bool
    rows: dict[str, int]
    """Component -> bytes per worker on the device (GPU, or host RAM on CPU)."""
    notes: dict[str, str]
    host_rows: dict[str, int] = field(default_factory=dict)
    """Components kept in host memory instead (fsdp_cpu_offload)."""
    activations_other: int = 0
    """Activations with gradient checkpointing flipped (the row counts the configured one)."""
    checkpoint_weights: int = 0
    checkpoint_optimizer: int = 0
    accelerator: str = ""
    capacity: int | None = None
    """Bytes one worker may use: the accelerator's memory, or the host's RAM on CPU (shared by the workers)."""
    fits: bool | None = None
    fixes: list[Fix] = field(default_factory=list)
    steps: int = 0
    """Optimizer steps of the run (`TrainConfig.total_steps`: train.steps or the token budget)."""

    @property
    def total(self) -> int:
        return sum(self.rows.values())

    @property
    def usable(self) -> int | None:
        return None if self.capacity is None else int(self.capacity * (1 - HEADROOM))

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.block_size

    @property
    def checkpoint_bytes(self) -> int:
        return self.checkpoint_weights + self.checkpoint_optimizer


def _dims(config) -> tuple[int, int, int, int, int]:
    """hidden, heads, kv heads, ffn width, vocab from an HF config (GPT-2's n_embd/n_head/n_inner included)."""
    hidden = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    ffn = int(getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
              or getattr(config, "ffn_dim", None) or 4 * hidden)
    return hidden, heads, kv, ffn, int(config.vocab_size)


def model_shape(cfg: ExperimentConfig) -> ModelShape:
    """The architecture of cfg.model.source, from its config only: InputError (one line) when the source cannot
    be resolved, e.g. a hub id offline."""
    from transformers import AutoModelForCausalLM

    config = check_model(cfg)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.model.trust_remote_code)
    except (ValueError, KeyError) as err:
        raise InputError(f"model.source '{cfg.model.source}': not a causal LM transformers can build "
                         f"({str(err).splitlines()[0][:160]})") from None
    layers = decoder_layers(model)
    hidden, heads, kv, ffn, vocab = _dims(model.config)
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    first = layers[0] if layers else None
    return ModelShape(
        source=cfg.model.source, model_type=getattr(model.config, "model_type", "?"),
        params=sum(p.numel() for p in model.parameters()), layers=len(layers) or int(config.num_hidden_layers),
        layer_params=sum(p.numel() for p in first.parameters()) if first is not None else 0,
        hidden=hidden, heads=heads, kv_heads=kv, ffn=ffn, vocab=vocab,
        tied=head is not None and embed is not None and head.weight is embed.weight,
        gated=first is not None and any(n.rsplit(".", 1)[-1] in GATE_NAMES for n, _ in first.named_modules()),
        attention=str(getattr(model.config, "_attn_implementation", None) or "eager"),
        chunked_loss=chunked_supported(model) is None,
        linears=tuple((name, *_fans(module)) for name, module in model.named_modules()
                      if _fans(module) and module is not head),
    )


def _fans(module: torch.nn.Module) -> tuple[int, int] | None:
    """(in, out) features of a linear layer: nn.Linear, or transformers' Conv1D (GPT-2: weight [in, out])."""
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
        return tuple(module.weight.shape)
    return None


def lora_params(shape: ModelShape, t: TrainConfig) -> int:
    """Params `train.method: lora` trains: the adapters of the targeted linear layers (names match as PEFT's do:
    the whole name or its last components; empty targets = all), DoRA's magnitudes, the trained embeddings."""
    targets = [x for x in t.lora_target_modules if x != "all-linear"]
    hit = [(i, o) for name, i, o in shape.linears
           if not targets or any(name == x or name.endswith("." + x) for x in targets)]
    adapters = sum(t.lora_rank * (i + o) + (o if t.lora_dora else 0) for i, o in hit)
    embeddings = shape.vocab * shape.hidden * (1 if shape.tied else 2) if t.lora_train_embeddings else 0
    return adapters + embeddings


def host_memory_bytes() -> int | None:
    """Total RAM of this machine."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _activations(shape: ModelShape, tokens: int, seq: int, e: int, r: int, dropout: bool, checkpointing: bool
                 ) -> int:
    h, a = shape.hidden, shape.heads
    per_token = h * (2 * r + e * (3 + 2 * shape.kv_heads / a + 1 + (4 if shape.gated else 2) * shape.ffn / h))
    if shape.attention == "eager":
        per_token += a * seq * (4 + (e if e < 4 else 0))  # the fp32 softmax (HF upcasts it), cast back
    if dropout:
        per_token += 2 * h + (a * seq if shape.attention == "eager" else 0)  # 1-byte masks
    layer = per_token * tokens
    body = shape.layers * tokens * h * r + layer if checkpointing else shape.layers * layer
    return int(body + 3 * tokens * h * r)


def estimate(cfg: ExperimentConfig, shape: ModelShape) -> Plan:
    """The plan of `cfg` for a model of `shape` (pure arithmetic; `plan` adds the fit and the fixes)."""
    r, t, m = cfg.resources, cfg.train, cfg.model
    world, cuda = r.num_workers, r.use_gpu
    sharded = r.strategy == "fsdp" and world > 1
    shard = world if sharded else 1
    p = DTYPE_BYTES[m.dtype]
    autocast = t.precision in ("bf16", "fp16") or (t.precision == "auto" and cuda)
    mixed_fsdp = sharded and cuda and autocast  # FSDP's MixedPrecisionPolicy: bf16 params in compute
    e = 2 if autocast else p
    res = 2 if mixed_fsdp else p  # the residual stream keeps the weights' dtype under autocast
    micro, accum = t.micro_batching(world)
    tokens, seq = micro * cfg.data.block_size, cfg.data.block_size
    loss_impl, _ = resolve_loss_impl(t.loss_impl, "cuda" if cuda else "cpu")
    if loss_impl != "hf" and not shape.chunked_loss:
        loss_impl = "hf"
    P, V, h = shape.params, shape.vocab, shape.hidden
    tied_buffer = V * h * p if shape.tied and not sharded else 0
    lora = t.method == "lora"
    trained = lora_params(shape, t) if lora else P  # fsdp (shard > 1) is never LoRA: validate refuses it
    state = {"weights": (P + (trained if lora else 0)) * p // shard,
             "gradients": trained * p // shard + (0 if lora else tied_buffer), "AdamW state": 2 * trained * p // shard}
    rows: dict[str, int] = {}
    notes = {"weights": f"{P:,} params x {p} B ({m.dtype})" + (f" / {shard} workers" if sharded else ""),
             "gradients": f"{m.dtype}" + (", + one V x h buffer (tied embeddings)" if tied_buffer else ""),
             "AdamW state": f"exp_avg + exp_avg_sq in {m.dtype}"
             + (" (no fp32 master copy: model.dtype float32 + train.precision bf16 keeps one)" if p < 4 else "")}
    if lora:
        notes["weights"] += f" + LoRA's {trained:,} trained params"
        notes["gradients"] = notes["AdamW state"] = (f"LoRA: the {trained:,} trained params only ({m.dtype}; "
                                                     f"{trained / P:.2%} of the model)")
    host_rows: dict[str, int] = {}
    if sharded and r.fsdp_cpu_offload:
        host_rows = state
        for key in state:
            notes[key] += "; in host RAM (fsdp_cpu_offload)"
    else:
        rows.update(state)
    if r.strategy == "ddp" and world > 1:
        rows["DDP buckets"] = trained * p
        notes["DDP buckets"] = "DDP's reducer: a second copy of the gradients"
    if sharded:
        gathered = 2 if mixed_fsdp else p
        root = max(P - shape.layers * shape.layer_params, 0)
        rows["FSDP gathers"] = (root + 2 * shape.layer_params) * gathered + shape.layer_params * (4 if mixed_fsdp
                                                                                                  else p)
        notes["FSDP gathers"] = ("unsharded root (embeddings, head) + 2 layers"
                                 + (" in bf16" if mixed_fsdp else "") + ", one layer's gradients")
    dropout = t.dropout > 0
    rows["activations"] = _activations(shape, tokens, seq, e, res, dropout, m.gradient_checkpointing)
    other = _activations(shape, tokens, seq, e, res, dropout, not m.gradient_checkpointing)
    notes["activations"] = (f"{shape.layers} layers x {micro} x {seq} tokens, "
                            f"checkpointing {'on' if m.gradient_checkpointing else 'off'} "
                            f"({'off' if m.gradient_checkpointing else 'on'}: {size(other)})"
                            + ("" if shape.attention == "eager" else f"; {shape.attention}: no s x s scores"))
    if loss_impl == "hf":
        rows["logits"] = tokens * V * (12 + (2 if autocast else 0))
        notes["logits"] = f"hf loss: 3 fp32 [{tokens:,} x {V:,}] buffers" + (" + bf16 logits" if autocast else "")
    else:
        rows["logits"] = (min(tokens, LOSS_CHUNK_ROWS) * V * 4 + V * h * (8 if p < 4 or mixed_fsdp else 4)
                          + tokens * h * e)
        notes["logits"] = (f"{loss_impl} loss: one fp32 [{min(tokens, LOSS_CHUNK_ROWS):,} x {V:,}] chunk + the "
                           "head's fp32 gradient")
    if t.distill_weight > 0:
        if not lora:
            rows["distill teacher"] = P * p
            notes["distill teacher"] = (f"frozen base model: {P:,} params x {p} B ({m.dtype}), a whole copy per "
                                        "worker; + one forward per general row")
        general = min(micro, math.ceil(round(1 - t.mix_ratio, 12) * t.global_batch()))
        per_row = seq * V * ((e if loss_impl == "hf" else 2 * e) + 16)
        rows["distill logits"] = general * per_row
        notes["distill logits"] = (f"{general} general row(s) x {seq} x {V:,}: teacher"
                                   + ("" if loss_impl == "hf" else " + student") + " logits, KL fp32 buffers"
                                   + ("; lora: the teacher is the model with adapters off" if lora else ""))
    if cuda:
        rows["CUDA runtime"] = CUDA_RUNTIME_BYTES
        notes["CUDA runtime"] = "context, cuBLAS workspace, NCCL (approximate)"
    return Plan(shape=shape, strategy=r.strategy, world_size=world, device="cuda" if cuda else "cpu",
                micro_batch=micro, grad_accum=accum, global_batch=t.global_batch(), block_size=seq,
                precision=f"{'fp16' if t.precision == 'fp16' else 'bf16'} autocast" if autocast else m.dtype,
                loss_impl=loss_impl,
                checkpointing=m.gradient_checkpointing, rows=rows, notes=notes, host_rows=host_rows,
                activations_other=other, checkpoint_weights=trained * p, checkpoint_optimizer=2 * trained * p,
                accelerator=r.accelerator_type, steps=t.total_steps(seq))


def _fit(plan: Plan, cfg: ExperimentConfig) -> Plan:
    if plan.device == "cuda":
        if cfg.resources.accelerator_type:
            plan.capacity = ACCELERATOR_MEMORY_MIB[cfg.resources.accelerator_type] * 2**20
    else:
        host = host_memory_bytes()
        # every worker of a trial runs on this host when Ray is local: they share its RAM
        plan.capacity = host // plan.world_size if host else None
    if plan.capacity is not None:
        plan.fits = plan.total <= plan.usable
    return plan


def _fix_steps(cfg: ExperimentConfig, plan: Plan) -> list[dict[str, Any]]:
    """The changes to try, in order: fsdp, activation checkpointing, the chunked loss, a smaller micro-batch
    (the global batch kept: accumulation grows), then fsdp's CPU offload."""
    r, t = cfg.resources, cfg.train
    steps: list[dict[str, Any]] = []
    if r.strategy == "ddp" and r.num_workers > 1:
        steps.append({"resources.strategy": "fsdp"})
    if not cfg.model.gradient_checkpointing:
        steps.append({"model.gradient_checkpointing": True})
    if plan.loss_impl == "hf" and plan.shape.chunked_loss:
        steps.append({"train.loss_impl": "chunked"})
    micro = plan.micro_batch
    while micro > 1:
        micro //= 2
        steps.append({"train.batch_size": micro, "train.global_batch_size": t.global_batch()})
    if r.num_workers > 1 and not r.fsdp_cpu_offload:
        steps.append({"resources.strategy": "fsdp", "resources.fsdp_cpu_offload": True})
    return steps


def plan(cfg: ExperimentConfig, shape: ModelShape | None = None) -> Plan:
    """The memory plan of `cfg`, whether it fits, and when it does not the changes that make it fit."""
    shape = shape or model_shape(cfg)
    result = _fit(estimate(cfg, shape), cfg)
    if result.fits is False:
        overrides: dict[str, Any] = {}
        for step in _fix_steps(cfg, result):
            overrides = {**overrides, **step}
            try:
                changed = with_overrides(cfg, overrides)
            except ConfigError:
                continue
            tried = _fit(estimate(changed, shape), changed)
            result.fixes.append(Fix(dict(overrides), tried.total, bool(tried.fits)))
            if tried.fits:
                break
    return result


def size(n: float | None) -> str:
    if n is None:
        return "?"
    return f"{n / GiB:.1f} GiB" if abs(n) >= GiB else f"{n / 2**20:.0f} MiB"


def fix_text(overrides: dict[str, Any]) -> str:
    return " ".join(f"--set {k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in overrides.items())


def verdict(result: Plan) -> str:
    """One line: fits or not, against what, and the fix."""
    if result.fits is None:
        return ("no resources.accelerator_type named: set it (" + ", ".join(ACCELERATOR_TYPES) + ") to check the "
                "fit" if result.device == "cuda" else "host RAM unknown: not checked")
    has = (f"an {result.accelerator} has {size(result.capacity)}" if result.device == "cuda" else
           f"this host's RAM has {size(result.capacity)}"
           + (f" for each of {result.world_size} workers" if result.world_size > 1 else ""))
    need = (f"needs {size(result.total)} per worker ({result.strategy} x {result.world_size}), {has} "
            f"({size(result.usable)} with {HEADROOM:.0%} headroom)")
    if result.fits:
        return f"fits: {need}"
    largest = max(result.rows, key=result.rows.get)
    why = f"does not fit: {need}; largest: {largest} {size(result.rows[largest])}"
    fitting = next((f for f in result.fixes if f.fits), None)
    if fitting:
        return f"{why}; fix: {fix_text(fitting.overrides)} ({size(fitting.total)})"
    best = result.fixes[-1].total if result.fixes else result.total
    return (f"{why}; even with every change it needs {size(best)}: add workers (resources.num_workers) or use a "
            "larger accelerator")


def check_fits(cfg: ExperimentConfig) -> Plan | None:
    """`raycpt sweep` / `train`: with a resources.accelerator_type, refuse (InputError, one line) a config whose
    plan does not fit it. Without one nothing is checked (None): CPU runs are not gated on an estimate."""
    if not (cfg.resources.use_gpu and cfg.resources.accelerator_type):
        return None
    result = plan(cfg)
    if result.fits is False:
        raise InputError(f"resources.accelerator_type={cfg.resources.accelerator_type}: {verdict(result)}; "
                         "`raycpt plan CONFIG` shows the breakdown")
    return result


def render(console, result: Plan) -> None:
    """The plan as a rich table, with the model, the batch, the checkpoint size and the verdict."""
    from rich.table import Table

    s = result.shape
    console.print(f"[bold]Model[/]: {s.source} ({s.model_type}): {s.params / 1e6:,.1f}M params, {s.layers} layers, "
                  f"hidden {s.hidden}, {s.heads} heads ({s.kv_heads} kv), ffn {s.ffn}"
                  f"{' gated' if s.gated else ''}, vocab {s.vocab:,}{', tied' if s.tied else ''}, "
                  f"attention {s.attention}")
    console.print(f"[bold]Step[/]: {result.strategy} x {result.world_size} worker(s) on {result.device}, "
                  f"micro-batch {result.micro_batch} x {result.grad_accum} accumulation = {result.global_batch} "
                  f"blocks of {result.block_size} = {result.tokens_per_step:,} tokens per step, {result.steps:,} steps "
                  f"({result.steps * result.tokens_per_step:,} tokens); "
                  f"{result.precision}, loss {result.loss_impl}")
    table = Table(title="Memory per worker")
    table.add_column("component")
    table.add_column("memory", justify="right")
    table.add_column("how")
    for name, value in result.rows.items():
        table.add_row(name, size(value), result.notes.get(name, ""))
    for name, value in result.host_rows.items():
        table.add_row(f"[dim]{name}[/]", f"[dim]{size(value)}[/]", result.notes.get(name, ""))
    table.add_row("[bold]total[/]", f"[bold]{size(result.total)}[/]",
                  f"{result.accelerator or ('host RAM' if result.device == 'cpu' else 'GPU')}: "
                  f"{size(result.capacity)}" + (f", {size(result.usable)} usable" if result.usable else ""))
    console.print(table)
    console.print(f"[bold]Checkpoint[/]: {size(result.checkpoint_bytes)} on disk (weights "
                  f"{size(result.checkpoint_weights)} + optimizer {size(result.checkpoint_optimizer)}; "
                  "checkpoint.keep_optimizer=latest keeps the optimizer in each running trial's newest one only)")
    for fix in result.fixes:
        console.print(f"  {'[green]fits[/]' if fix.fits else 'still over'} with {fix_text(fix.overrides)}: "
                      f"{size(fix.total)}")
    style = "green" if result.fits else "red" if result.fits is False else "yellow"
    console.print(f"[{style}]{verdict(result)}[/]")

