"""The continued-pre-training loop, top to bottom: setup, then `train_step` per step, then eval and report. No Ray.

`train(cfg, manifest, report)` loads the released weights, applies dropout, and runs AdamW with a linear re-warm
and a re-decay (`train.schedule`: cosine, or warmup-stable-decay; raycpt.core.schedule) over a deterministic
domain/general mixture (with data.synthetic, train.synthetic_ratio of its domain side drawn from the synthetic
corpus; raycpt.core.data.blocks.synthetic_plan), whose micro-batches a background thread gathers ahead of the step
(raycpt.core.data.batches).
Every `eval_every` steps (and at the last step, and at a wsd run's last stable step) it scores the fixed held-out
blocks, saves a checkpoint (HF `save_pretrained` dir + `TrainState`; sharded DCP under `resources.strategy: fsdp`;
core.train.checkpoint says what one holds) and calls `report(metrics, checkpoint_dir)`. The Ray edge calls it from
`raycpt.edge.worker`; `raycpt train CONFIG --no-ray` (`run_local`) runs one trial on a machine without Ray; tests
call it directly. `train_step` is one optimizer step, what benchmarks and the memory test run too.
`train.method: lora` trains PEFT adapters on the frozen weights (`raycpt.core.model.adapters`); `train.precision: fp16`
adds a GradScaler. `train.distill_weight > 0` adds a KL term to the base model's next-token distributions on the
general replay rows (`Distill`, `distill_teacher`; docs/distill.md).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from raycpt.core import metrics as m
from raycpt.core.config import ExperimentConfig
from raycpt.core.data.batches import Batches
from raycpt.core.data.blocks import load_blocks, mixture_seed, synthetic_plan
from raycpt.core.errors import InputError
from raycpt.core.eval.evaluate import autocast_dtype, f1_metrics, heldout_block_losses, ppl_metrics
from raycpt.core.eval.prompting import prompt_spec, scores_without_task
from raycpt.core.model.adapters import apply_lora, peft_model_of, shadowed_params, unwrap
from raycpt.core.model.loading import apply_dropout, load_model
from raycpt.core.model.loss import (
    causal_lm_loss,
    causal_lm_loss_and_logits,
    compile_for_loss,
    distill_kl,
    resolve_loss_impl,
    select_rows,
)
from raycpt.core.model.parallel import fsdp_root, no_gradient_sync, root_unsharded
from raycpt.core.prepare import Manifest, prepare_experiment
from raycpt.core.schedule import lr_factor, stable_end
from raycpt.core.train.checkpoint import (
    TrainState,
    checkpoint_name,
    is_adapter_checkpoint,
    is_sharded_checkpoint,
    keeping_newest_checkpoint,
    load_adapter_weights,
    load_train_state,
    save_checkpoint,
)

Report = Callable[[dict[str, Any], "str | None"], None]
ADAMW_BETAS = (0.9, 0.95)
"""Defaults of build_optimizer (the loop passes train.adam_beta1/2 and adam_eps, which default to these)."""
ADAMW_EPS = 1e-8


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, device: torch.device,
                    betas: tuple[float, float] = ADAMW_BETAS, eps: float = ADAMW_EPS) -> torch.optim.Optimizer:
    """AdamW; no decay on biases and norm weights (1-D params); fused kernels on CUDA and CPU (on CPU the fused
    step is faster than the default kernel; `benchmarks/bench_loop.py` times the two side by side, no figure kept)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=device.type in ("cuda", "cpu"))


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, steps: int, min_lr_ratio: float, *,
                    schedule: str = "cosine", decay_fraction: float = 0.2, decay_shape: str = "1-sqrt"):
    """A LambdaLR over `raycpt.core.schedule.lr_factor`: linear re-warm to lr, then `schedule` over `steps`.
    cosine is transformers' own schedule (get_cosine_with_min_lr_schedule_with_warmup, which lr_factor equals to
    the last bit), so cosine runs keep their numbers. The scheduler's state is its step count alone: a resumed or
    extended run rebuilds the schedule from its config (raycpt.core.train.checkpoint.load_train_state)."""
    if schedule == "cosine":
        from transformers import get_cosine_with_min_lr_schedule_with_warmup

        return get_cosine_with_min_lr_schedule_with_warmup(optimizer, num_warmup_steps=warmup_steps,
                                                           num_training_steps=steps, min_lr_rate=min_lr_ratio)
    factor = functools.partial(lr_factor, warmup_steps=warmup_steps, total_steps=steps, schedule=schedule,
                               decay_fraction=decay_fraction, decay_shape=decay_shape, min_lr_ratio=min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0), ("L40S", 362.0),
                    ("L4", 121.0))
"""Dense bf16 peak per GPU, by device-name substring (first match wins: H100 PCIe before H100, L40S before L4)."""


def peak_tflops(configured: float, device: torch.device) -> float:
    """`train.peak_tflops` when set, else the table's value for this GPU; 0 (no MFU) on CPU or an unknown GPU."""
    if configured > 0 or device.type != "cuda":
        return configured
    name = torch.cuda.get_device_name(device)
    return next((tflops for key, tflops in PEAK_BF16_TFLOPS if key in name), 0.0)


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs per token, as nanoGPT/PaLM count them: 6 x the parameters that take part in matmuls, plus
    12 x layers x hidden x seq_len for attention scores and weighted values. Embedding tables are lookups and
    are left out, except one tied to the output head (that matmul is real). A frozen parameter (LoRA's base
    weights) counts 4, not 6: forward, and backward to its input, but no weight gradient."""
    hf = unwrap(model)
    head = hf.get_output_embeddings()
    params = {id(p): (6 if p.requires_grad else 4) * p.numel() for p in hf.parameters()}
    for module in hf.modules():
        if isinstance(module, nn.Embedding) and (head is None or module.weight is not head.weight):
            params.pop(id(module.weight), None)
    for shadowed in shadowed_params(hf):  # PEFT's frozen originals of the embeddings it trains: never computed
        params.pop(shadowed, None)
    layers, hidden = hf.config.num_hidden_layers, hf.config.hidden_size
    return float(sum(params.values())) + 12.0 * layers * hidden * seq_len


@dataclass
class Distill:
    """What `train_step` needs for the distillation term (train.distill_weight): `teacher(ids [G, T])` -> the
    frozen base model's logits [G, T, V] (`distill_teacher`; called under torch.no_grad and the step's autocast),
    the weight, and `kl`: a running [2] float32 tensor on the device, (sum of the micro-batches' KLs, number of
    micro-batches with general rows), added to in place (the loop's, over a report window; no host sync)."""

    teacher: Callable[[torch.Tensor], torch.Tensor]
    weight: float
    kl: torch.Tensor


def distill_teacher(cfg: ExperimentConfig, model: nn.Module, device: torch.device
                    ) -> Callable[[torch.Tensor], torch.Tensor]:
    """The frozen base model as a function ids [G, T] -> logits [G, T, V], in eval mode (no dropout), for
    `Distill`. train.method full: a second copy of cfg.model.source's weights, loaded as the trial's model is (same
    dtype), frozen, on `device`; under DDP / FSDP every worker holds a whole copy (it is not sharded). lora: no second
    copy: `model` itself with its adapters disabled (PEFT's `disable_adapter()`; a trained copy of the embeddings
    under lora_train_embeddings is switched back to the original too), in eval mode for that forward only."""
    if cfg.train.method == "lora":
        peft_model = peft_model_of(model)  # under DDP / compile: the PeftModel inside, run without their wrappers

        def adapters_off(input_ids: torch.Tensor) -> torch.Tensor:
            was_training = peft_model.training
            peft_model.eval()
            try:
                with peft_model.disable_adapter():
                    return peft_model(input_ids=input_ids, use_cache=False).logits
            finally:
                peft_model.train(was_training)

        return adapters_off
    teacher = load_model(cfg.model.source, cfg.model.dtype, cfg.model.trust_remote_code)
    teacher.config.use_cache = False
    teacher.requires_grad_(False).eval().to(device)
    return lambda input_ids: teacher(input_ids=input_ids, use_cache=False).logits


def train_step(model: nn.Module, micro_batches: Sequence[torch.Tensor], optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler, *, loss_impl: str = "hf",
               amp_dtype: torch.dtype | None = None, grad_clip: float = 0.0, distributed: bool = False,
               loss_sum: torch.Tensor | None = None, general: Sequence[torch.Tensor] | None = None,
               distill: Distill | None = None) -> torch.Tensor:
    """One optimizer step over `micro_batches` (token ids [B, T] on the model's device; the step's gradient is
    their mean): forward under autocast and backward for each, then unscale + clip, the optimizer step, the
    scaler's and the scheduler's updates, zero_grad. `distributed` (DDP / FSDP over several workers): gradients
    are all-reduced (reduce-scattered) on the last micro-batch only. Returns the micro-batches' losses, each
    divided by their number, summed: detached and on the device (no host sync). `loss_sum`: a running sum (the
    loop's, over a report window) to add them to in place, one by one, and return instead.

    `distill` (with `general`, one bool [B] CPU tensor per micro-batch, True for a general replay row): a
    micro-batch with general rows G trains on CE + distill.weight x KL, the KL(p_teacher || p_model) per token
    averaged over positions 0..T-2 of the G rows (`raycpt.core.model.loss.distill_kl`; the positions the CE scores), the
    teacher's logits from one extra no-grad forward on those rows; one without adds nothing. The returned losses
    stay the CE; the KLs go to `distill.kl`."""
    grad_accum = len(micro_batches)
    device_type = micro_batches[0].device.type
    if loss_sum is None:
        loss_sum = torch.zeros((), device=micro_batches[0].device)
    for micro, input_ids in enumerate(micro_batches):
        skip_sync = distributed and micro < grad_accum - 1
        # the general rows, from flags on the host: selected by slicing, no index copied to the device (no sync)
        rows = general[micro].nonzero().flatten().tolist() if distill is not None else []
        with no_gradient_sync(model) if skip_sync else contextlib.nullcontext():
            with torch.autocast(device_type, dtype=amp_dtype, enabled=amp_dtype is not None):
                if not rows:
                    loss = total = causal_lm_loss(model, input_ids, loss_impl) / grad_accum
                else:
                    with torch.no_grad():
                        teacher_logits = distill.teacher(select_rows(input_ids, rows))
                    ce, student_logits = causal_lm_loss_and_logits(model, input_ids, rows, loss_impl)
                    # position t predicts token t + 1: the last position predicts nothing, as in the CE
                    kl = distill_kl(student_logits[:, :-1], teacher_logits[:, :-1])
                    loss = ce / grad_accum
                    total = loss + distill.weight * kl / grad_accum
                    distill.kl += torch.stack([kl.detach(), torch.ones_like(kl)])
            scaler.scale(total).backward()
        loss_sum += loss.detach()
    if grad_clip > 0:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)  # skipped (and the scale lowered) when fp16 gradients overflowed
    scaler.update()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum


def load_trial_model(cfg: ExperimentConfig, resume_dir: str | None, world_size: int) -> nn.Module:
    """The model a trial starts from, on the CPU: the released weights (init), or a checkpoint's (resume), with
    dropout, gradient checkpointing and LoRA adapters applied. A sharded (fsdp) checkpoint is loaded after wrapping,
    with the optimizer (load_train_state): its trial starts from the released weights' architecture (HF weights + a
    whole optimizer cannot be spread over FSDP shards). LoRA: a checkpoint holds the adapter alone; the base is the
    released weights."""
    t = cfg.train
    resume_sharded = bool(resume_dir) and is_sharded_checkpoint(resume_dir)
    if resume_dir and not resume_sharded and cfg.resources.strategy == "fsdp" and world_size > 1:
        raise InputError(f"resources.strategy=fsdp: checkpoint {resume_dir} was saved under ddp; resume it with "
                         "--set resources.strategy=ddp, or start a new run with --set name=<new name>")
    lora = t.method == "lora"
    if resume_dir and not resume_sharded and lora != is_adapter_checkpoint(resume_dir):
        raise InputError(f"train.method={t.method}: checkpoint {resume_dir} was saved by a "
                         f"{'full' if lora else 'lora'} run; resume it with that train.method, or start a new run "
                         "with --set name=<new name>")
    weights = cfg.model.source if resume_sharded or not resume_dir or lora else resume_dir
    model = load_model(weights, cfg.model.dtype, cfg.model.trust_remote_code)
    apply_dropout(model, t.dropout)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.config.use_cache = False
    if lora:  # after dropout (the adapter has its own) and before DDP / compile wrap it
        model = apply_lora(model, t)
        if resume_dir:
            load_adapter_weights(model, resume_dir)
    return model


def train(cfg: ExperimentConfig, manifest: Manifest, report: Report, *, checkpoint_root: str | os.PathLike,
          resume_dir: str | None = None, rank: int = 0, world_size: int = 1,
          device: torch.device | str | None = None, wrap_model: Callable[[nn.Module], nn.Module] = lambda model: model,
          forgetting_bound: float | None = None, on_forgetting: str = "warn") -> dict[str, Any]:
    """Run one CPT trial on the prepared data; returns the last metrics. `forgetting_bound`: a validation general
    ppl the run must stay within (raycpt.core.extend: (1 + select.max_forgetting) x the base model's); a report
    above it says so at once (metrics.FORGETTING) and, with on_forgetting stop, ends the run there without a
    checkpoint, so the last one written is the last within the bound."""
    t, d = cfg.train, cfg.data
    device = torch.device(device or ("cuda" if torch.cuda.is_available() and cfg.resources.use_gpu else "cpu"))
    amp_dtype = autocast_dtype(t.precision, device)
    torch.manual_seed(t.seed + rank)
    random.seed(t.seed + rank)

    # --- model, optimizer, schedule ------------------------------------------------------------------------------
    model = load_trial_model(cfg, resume_dir, world_size)
    model_flops_per_token = flops_per_token(model, d.block_size)
    peak = peak_tflops(t.peak_tflops, device) * 1e12 * world_size  # MFU is of every worker's accelerator
    model.to(device)
    model = wrap_model(model)  # DDP, FSDP2 (raycpt.core.model.parallel.apply_fsdp) or nothing
    sharded = fsdp_root(model) is not None  # every rank runs every forward: the layers all-gather their params
    loss_impl, loss_note = resolve_loss_impl(t.loss_impl, device, unwrap(model))
    if rank == 0:  # once per trial: which loss runs, and why (a fallback is a warning)
        fell_back = loss_impl != t.loss_impl and (t.loss_impl != "auto" or "fails to import" in loss_note)
        logging.getLogger("raycpt").log(logging.WARNING if fell_back else logging.INFO,
                                        "train.loss_impl=%s: running %s (%s)", t.loss_impl, loss_impl, loss_note)
    if t.compile:
        model = compile_for_loss(model, loss_impl)
    optimizer = build_optimizer(model, t.lr, t.weight_decay, device, betas=(t.adam_beta1, t.adam_beta2),
                                eps=t.adam_eps)
    steps = t.total_steps(d.block_size)  # train.steps, or the token budget in steps
    scheduler = build_scheduler(optimizer, t.warmup_steps, steps, t.min_lr_ratio, schedule=t.schedule,
                                decay_fraction=t.decay_fraction, decay_shape=t.decay_shape)
    # fp16: a dynamic loss scale keeps small gradients from underflowing; disabled, each call is a pass-through
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    # --- data: the mixture plan is a pure function of the config, so resume needs only the step ----------------
    domain_train, domain_heldout = load_blocks(manifest.domain.train), load_blocks(manifest.domain.heldout)
    general = manifest.general
    general_train = load_blocks(general.train) if general else domain_train[:0]
    general_heldout = load_blocks(general.heldout) if general else None
    micro_batch, grad_accum = t.micro_batching(world_size)  # the global batch is fixed; accumulation adapts
    blocks_per_step = t.global_batch()
    # data.synthetic (the rewrites of raycpt augment): train.synthetic_ratio of the domain side; ratio 0 is the
    # two-corpus plan, bit for bit
    synthetic_train = load_blocks(manifest.synthetic.train) if manifest.synthetic else domain_train[:0]
    is_domain, is_synthetic, index = synthetic_plan(
        steps * blocks_per_step, t.mix_ratio, len(domain_train), len(general_train), seed=mixture_seed(d.seed, t.seed),
        window=blocks_per_step, synthetic_ratio=t.synthetic_ratio, n_synthetic=len(synthetic_train))

    # --- distillation: the frozen base model's next-token distributions on the general rows (train.distill_weight);
    # loaded before the state is restored, so a resumed run's RNG is the uninterrupted run's
    distill = None
    if t.distill_weight > 0 and not is_domain.all():
        distill = Distill(distill_teacher(cfg, model, device), t.distill_weight,
                          torch.zeros(2, dtype=torch.float32, device=device))

    # --- state: everything a resume needs, saved and restored as one unit ---------------------------------------
    state = TrainState()
    if resume_dir:
        state = load_train_state(Path(resume_dir), model, optimizer, scheduler, scaler)
        state.restore_rng()
        state.restarts += 1
    resumed_from_step = state.step
    # wsd: the last stable step also evaluates and checkpoints (marked pre_decay), eval step or not: the state a
    # longer run continues from (raycpt.core.extend)
    pre_decay_step = stable_end(steps, t.decay_fraction) if t.schedule == "wsd" else 0

    def evaluate() -> dict[str, Any]:
        """Loss, ppl with its bootstrap interval, and per-block losses on the validation blocks of each corpus."""
        kwargs = dict(batch_size=micro_batch, device=device, rank=rank, world_size=world_size,
                      autocast_dtype=amp_dtype)
        scores = ppl_metrics(heldout_block_losses(model, domain_heldout, **kwargs), d.block_size, m.DOMAIN_LOSS,
                             m.DOMAIN_PPL, seed=d.seed)
        if general:
            scores.update(ppl_metrics(heldout_block_losses(model, general_heldout, **kwargs), d.block_size,
                                      m.GENERAL_LOSS, m.GENERAL_PPL, seed=d.seed))
        else:
            scores.update({m.GENERAL_LOSS: None, m.GENERAL_PPL: None})
        return scores

    # --- loop: this worker's micro-batches are gathered in the background (raycpt.core.data.batches) ------------------
    model.train()
    loss_acc = torch.zeros((), device=device)
    steps_in_window, window_start = 0, time.perf_counter()
    metrics: dict[str, Any] = {}
    with Batches(domain_train, general_train, is_domain, index, start_step=state.step, steps=steps, rank=rank,
                 world_size=world_size, micro_batch=micro_batch, grad_accum=grad_accum, device=device,
                 with_general=distill is not None, synthetic=synthetic_train if manifest.synthetic else None,
                 is_synthetic=is_synthetic if manifest.synthetic else None) as batches:
        for step in range(state.step, steps):
            micro_batches, general_rows = [next(batches) for _ in range(grad_accum)], None
            if distill is not None:  # (ids, is_general) pairs
                micro_batches, general_rows = [ids for ids, _ in micro_batches], [g for _, g in micro_batches]
            train_step(model, micro_batches, optimizer, scheduler, scaler, loss_impl=loss_impl, amp_dtype=amp_dtype,
                       grad_clip=t.grad_clip, distributed=world_size > 1, loss_sum=loss_acc,  # adds to the window's
                       general=general_rows, distill=distill)
            steps_in_window += 1
            done = step + 1
            if done % t.eval_every and done != steps and done != pre_decay_step:
                continue

            # --- eval, report, checkpoint: the only host syncs in the loop ---------------------------------------
            if device.type == "cuda":
                torch.cuda.synchronize()
            window_time = time.perf_counter() - window_start
            state.train_time_s += window_time
            train_loss = loss_acc / steps_in_window
            drawn = torch.tensor([batches.domain_blocks, (done - resumed_from_step) * blocks_per_step // world_size,
                                  batches.synthetic_blocks], dtype=torch.float64, device=device)
            if world_size > 1 and torch.distributed.is_initialized():
                torch.distributed.all_reduce(train_loss)  # sync point: mean train loss across workers
                train_loss /= world_size
                torch.distributed.all_reduce(drawn)  # sync point: blocks drawn by every worker
                if distill is not None:
                    torch.distributed.all_reduce(distill.kl)  # sync point: KL sums and counts of every worker
            distill_kl_mean = None
            if distill is not None and distill.kl[1] > 0:
                distill_kl_mean = float(distill.kl[0] / distill.kl[1])
            heldout = evaluate()
            tokens = done * blocks_per_step * d.block_size
            tokens_per_s = steps_in_window * blocks_per_step * d.block_size / window_time
            metrics = {
                m.STEP: done, m.TOKENS: tokens, m.TRAIN_LOSS: float(train_loss), m.DISTILL_KL: distill_kl_mean,
                **heldout,
                # what the loop consumed since this run (re)started, not the plan: a resumed run counts its own
                m.DOMAIN_FRACTION: float(drawn[0] / drawn[1]),
                m.SYNTHETIC_FRACTION: float(drawn[2] / drawn[0]) if manifest.synthetic and drawn[0] > 0 else None,
                m.TOKENS_PER_S: tokens_per_s,
                m.MFU: tokens_per_s * model_flops_per_token / peak if peak else None,
                m.LR: scheduler.get_last_lr()[0], m.TRAIN_TIME_S: state.train_time_s,
                m.RESTARTS: state.restarts, m.RESUMED_FROM_STEP: resumed_from_step, m.LOSS_IMPL: loss_impl,
            }
            if metrics[m.DOMAIN_PPL] < state.best_domain_ppl:
                state.best_domain_ppl, state.evals_since_best = metrics[m.DOMAIN_PPL], 0
            else:
                state.evals_since_best += 1
            state.step = done
            stop_early = bool(t.early_stopping_patience) and state.evals_since_best >= t.early_stopping_patience
            general_ppl = metrics[m.GENERAL_PPL]
            metrics[m.FORGETTING] = None
            if forgetting_bound is not None and general_ppl is not None and not general_ppl <= forgetting_bound:
                metrics[m.FORGETTING] = (f"general ppl {general_ppl:.2f} crossed the forgetting bound "
                                         f"{forgetting_bound:.2f} at step {done}")
                if rank == 0:
                    logging.getLogger("raycpt").warning("%s%s", metrics[m.FORGETTING], "; stopping"
                                                        if on_forgetting == "stop" else "")
            stop_forgetting = metrics[m.FORGETTING] is not None and on_forgetting == "stop"
            if ((done == steps or stop_early) and not stop_forgetting and (rank == 0 or sharded)
                    and (manifest.task or scores_without_task(cfg.eval))):
                # Downstream F1 once, at the trial's end, inside the trial (code after fit() never runs for
                # trials Tune stops, and this keeps the probe on the trial's own resources). Under FSDP every rank
                # runs it on the same texts (each forward all-gathers; no rank ever holds the whole model idle)
                # and gets the same scores; root_unsharded: the probe calls the decoder without the root's hooks.
                e = cfg.eval
                with root_unsharded(model):
                    metrics.update(f1_metrics(unwrap(model), cfg.model.source, manifest.task, seeds=e.seeds,
                                              seed=e.seed, max_length=e.max_length, device=device,
                                              trust_remote_code=cfg.model.trust_remote_code,
                                              method=e.method, prompt=prompt_spec(e)))
            metrics[m.FINISHED] = (done == steps or stop_early) and not stop_forgetting
            metrics[m.PRE_DECAY] = done == pre_decay_step
            # Ray keeps the best-ranked checkpoint besides the latest (raycpt.edge.policy): the pre-decay one first
            metrics[m.CHECKPOINT_SCORE] = 0.0 if metrics[m.PRE_DECAY] else metrics[m.DOMAIN_PPL]
            checkpoint_dir = None
            # fsdp: every rank writes its shard. Stopped by the forgetting bound: no checkpoint past it
            if (rank == 0 or cfg.resources.strategy == "fsdp") and not stop_forgetting:
                checkpoint_dir = Path(checkpoint_root) / checkpoint_name(done)
                save_checkpoint(checkpoint_dir, model, state, optimizer, scheduler, cfg, metrics, rank=rank,
                                scaler=scaler)
            report(metrics, str(checkpoint_dir) if checkpoint_dir else None)
            loss_acc.zero_()
            if distill is not None:
                distill.kl.zero_()
            steps_in_window, window_start = 0, time.perf_counter()
            if stop_early or stop_forgetting:
                break
    return metrics


def run_local(cfg: ExperimentConfig, log: Callable[[str], None]) -> dict[str, Any]:
    """Prepare and run one trial in-process (no Ray); each report is logged as one line. Returns the last
    metrics."""
    manifest = prepare_experiment(cfg)
    out = cfg.experiment_dir() / "local"
    out.mkdir(parents=True, exist_ok=True)
    manifest.save(cfg.experiment_dir())

    def report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        general = metrics.get(m.GENERAL_PPL)
        log(f"step {metrics[m.STEP]}: train loss {metrics[m.TRAIN_LOSS]:.4f}, domain ppl {metrics[m.DOMAIN_PPL]:.2f}"
            + (f", general ppl {general:.2f}" if general is not None else "")
            + (f", distill KL {metrics[m.DISTILL_KL]:.4f}" if metrics.get(m.DISTILL_KL) is not None else "")
            + (f", synthetic {metrics[m.SYNTHETIC_FRACTION]:.2f} of the domain side"
               if metrics.get(m.SYNTHETIC_FRACTION) is not None else "")
            + (f", F1 {metrics[m.F1]:.4f}" if metrics.get(m.F1) is not None else "")
            + f", {metrics[m.TOKENS_PER_S]:.0f} tok/s; checkpoint {checkpoint_dir}")

    return train(cfg, manifest, keeping_newest_checkpoint(report), checkpoint_root=out)

