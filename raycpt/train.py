"""The continued-pre-training loop: one function, top to bottom. No Ray here.

`train(cfg, data, report)` loads the released weights, applies dropout, and runs AdamW with a linear re-warm and
cosine re-decay over a deterministic domain/general mixture. Every `eval_every` steps (and at the last step) it
scores the fixed held-out blocks, saves a checkpoint (HF `save_pretrained` dir + optimizer/scheduler/data
position) and calls `report(metrics, checkpoint_dir)`. Ray Train calls it from `distributed.py`; tests and the
GPU box call it directly.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from raycpt.config import ExperimentConfig, to_dict
from raycpt.data import load_blocks, mixture_plan, worker_positions
from raycpt.evaluate import downstream_f1, heldout_loss, perplexity
from raycpt.files import write_json
from raycpt.models import apply_dropout, load_model, load_tokenizer

Report = Callable[[dict[str, Any], "str | None"], None]
STATE_FILE = "trainer_state.pt"


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, device: torch.device
                    ) -> torch.optim.Optimizer:
    """AdamW; no decay on biases and norm weights (1-D params); fused kernels on CUDA and CPU (on CPU the fused
    step measured ~5x faster per optimizer step than the default for SmolLM2-135M: benchmarks/RESULTS.md)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type in ("cuda", "cpu"))


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, steps: int, min_lr_ratio: float):
    """Linear re-warm to lr, cosine re-decay to lr * min_lr_ratio at the last step (transformers' schedule)."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    return get_cosine_with_min_lr_schedule_with_warmup(optimizer, num_warmup_steps=warmup_steps,
                                                       num_training_steps=steps, min_lr_rate=min_lr_ratio)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


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
    are left out, except one tied to the output head (that matmul is real)."""
    hf = unwrap(model)
    head = hf.get_output_embeddings()
    params = {id(p): p.numel() for p in hf.parameters()}
    for module in hf.modules():
        if isinstance(module, nn.Embedding) and (head is None or module.weight is not head.weight):
            params.pop(id(module.weight), None)
    layers, hidden = hf.config.num_hidden_layers, hf.config.hidden_size
    return 6.0 * sum(params.values()) + 12.0 * layers * hidden * seq_len


def unwrap(model: nn.Module) -> nn.Module:
    """The HF model inside DDP / torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def save_checkpoint(path: Path, model: nn.Module, state: dict[str, Any], cfg: ExperimentConfig,
                    metrics: dict[str, Any]) -> None:
    """One unit: weights (safetensors), optimizer/scheduler/position state, the config and the metrics."""
    path.mkdir(parents=True, exist_ok=True)
    unwrap(model).save_pretrained(path, safe_serialization=True)
    torch.save(state, path / STATE_FILE)
    write_json(path / "raycpt_config.json", to_dict(cfg))
    write_json(path / "metrics.json", metrics)


def f1_metrics(model: nn.Module, cfg: ExperimentConfig, task: dict[str, Any], device: torch.device | str,
               prefix: str = "eval") -> dict[str, float]:
    """The linear probe's scores as flat metrics: `eval/f1` (macro), `eval/f1_sd`, `eval/accuracy`,
    `eval/f1_class/<label>`."""
    tokenizer = load_tokenizer(cfg.model.source, cfg.model.trust_remote_code)
    scores = downstream_f1(model, tokenizer, task, seeds=cfg.eval.seeds, seed=cfg.eval.seed,
                           max_length=cfg.eval.max_length, device=device)
    flat = {f"{prefix}/f1": scores["f1"], f"{prefix}/f1_sd": scores["f1_sd"], f"{prefix}/accuracy": scores["accuracy"]}
    flat.update({f"{prefix}/f1_class/{label}": v for label, v in scores["per_class_f1"].items()})
    return flat


def train(cfg: ExperimentConfig, data: dict[str, Any], report: Report, *, checkpoint_root: str | os.PathLike,
          resume_dir: str | None = None, rank: int = 0, world_size: int = 1,
          device: torch.device | str | None = None, wrap_model: Callable[[nn.Module], nn.Module] = lambda m: m
          ) -> dict[str, Any]:
    """Run one CPT trial. `data` is the manifest from `data.prepare_data`; returns the last metrics."""
    t, d = cfg.train, cfg.data
    device = torch.device(device or ("cuda" if torch.cuda.is_available() and cfg.resources.use_gpu else "cpu"))
    amp_dtype = autocast_dtype(t.precision, device)
    torch.manual_seed(t.seed + rank)
    random.seed(t.seed + rank)

    # --- model: released weights (init) or a checkpoint (resume) -------------------------------------------------
    model = load_model(resume_dir or cfg.model.source, cfg.model.dtype, cfg.model.trust_remote_code)
    apply_dropout(model, t.dropout)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.config.use_cache = False
    model_flops_per_token = flops_per_token(model, d.block_size)
    peak = peak_tflops(t.peak_tflops, device) * 1e12 * world_size  # MFU is of every worker's accelerator
    model.to(device)
    model = wrap_model(model)
    if t.compile:
        model = torch.compile(model)
    optimizer = build_optimizer(model, t.lr, t.weight_decay, device)
    scheduler = build_scheduler(optimizer, t.warmup_steps, t.steps, t.min_lr_ratio)

    # --- data: the mixture plan is a pure function of the config, so resume needs only the step ----------------
    domain_train, domain_heldout = load_blocks(data["domain"]["train"]), load_blocks(data["domain"]["heldout"])
    general = data.get("general")
    general_train = load_blocks(general["train"]) if general else domain_train[:0]
    general_heldout = load_blocks(general["heldout"]) if general else None
    blocks_per_step = t.batch_size * t.grad_accum * world_size
    is_domain, index = mixture_plan(t.steps * blocks_per_step, t.mix_ratio, len(domain_train), len(general_train),
                                    seed=d.seed * 1_000_003 + t.seed, window=blocks_per_step)

    # --- state: everything a resume needs, saved and restored as one unit ---------------------------------------
    state: dict[str, Any] = {"step": 0, "train_time_s": 0.0, "best_domain_ppl": math.inf, "evals_since_best": 0,
                             "restarts": 0}
    if resume_dir:
        saved = torch.load(Path(resume_dir) / STATE_FILE, map_location="cpu", weights_only=True)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"])
        state.update({k: saved[k] for k in ("step", "train_time_s", "best_domain_ppl", "evals_since_best")})
        state["restarts"] = saved.get("restarts", 0) + 1
    resumed_from_step = state["step"]

    def evaluate() -> tuple[float, float | None]:
        kwargs = dict(batch_size=t.batch_size, device=device, rank=rank, world_size=world_size,
                      autocast_dtype=amp_dtype)
        domain = heldout_loss(model, domain_heldout, **kwargs)
        general_loss = heldout_loss(model, general_heldout, **kwargs) if general else None
        return domain, general_loss

    # --- loop ----------------------------------------------------------------------------------------------------
    model.train()
    loss_acc = torch.zeros((), device=device)
    steps_in_window, window_start = 0, time.perf_counter()
    metrics: dict[str, Any] = {}
    for step in range(state["step"], t.steps):
        for micro in range(t.grad_accum):
            pos = worker_positions(step, micro, rank=rank, world_size=world_size, batch_size=t.batch_size,
                                   grad_accum=t.grad_accum)
            batch = torch.from_numpy(np.stack([(domain_train if from_domain else general_train)[i]
                                               for from_domain, i in zip(is_domain[pos], index[pos], strict=True)]))
            if device.type == "cuda":  # pinned host memory: the copy runs async, the loop never waits on it
                batch = batch.pin_memory()
            input_ids = batch.to(device, dtype=torch.long, non_blocking=True)
            last_micro = micro == t.grad_accum - 1
            # DDP: all-reduce gradients only on the last micro-batch of a step
            skip_sync = world_size > 1 and not last_micro and hasattr(model, "no_sync")
            with model.no_sync() if skip_sync else contextlib.nullcontext():
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    loss = model(input_ids=input_ids, labels=input_ids).loss / t.grad_accum
                loss.backward()
            loss_acc += loss.detach()
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        steps_in_window += 1
        done = step + 1

        if done % t.eval_every and done != t.steps:
            continue
        # --- eval, report, checkpoint: the only host syncs in the loop -------------------------------------------
        if device.type == "cuda":
            torch.cuda.synchronize()
        window_time = time.perf_counter() - window_start
        state["train_time_s"] += window_time
        train_loss = loss_acc / steps_in_window
        if world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.all_reduce(train_loss)  # sync point: mean train loss across workers
            train_loss /= world_size
        domain_loss, general_loss = evaluate()
        tokens = done * blocks_per_step * d.block_size
        tokens_per_s = steps_in_window * blocks_per_step * d.block_size / window_time
        metrics = {
            "step": done, "tokens": tokens, "train/loss": float(train_loss),
            "eval/domain_loss": domain_loss, "eval/domain_ppl": perplexity(domain_loss),
            "eval/general_loss": general_loss, "eval/general_ppl": perplexity(general_loss) if general else None,
            "data/domain_fraction": float(is_domain[: done * blocks_per_step].mean()),
            "perf/tokens_per_s": tokens_per_s,
            "perf/mfu": tokens_per_s * model_flops_per_token / peak if peak else None,
            "lr": scheduler.get_last_lr()[0], "time/train_s": state["train_time_s"],
            "restarts": state["restarts"], "resumed_from_step": resumed_from_step,
        }
        if metrics["eval/domain_ppl"] < state["best_domain_ppl"]:
            state["best_domain_ppl"], state["evals_since_best"] = metrics["eval/domain_ppl"], 0
        else:
            state["evals_since_best"] += 1
        state["step"] = done
        stop_early = bool(t.early_stopping_patience) and state["evals_since_best"] >= t.early_stopping_patience
        if (done == t.steps or stop_early) and data.get("task") and rank == 0:
            # Downstream F1 once, at the trial's end, inside the trial (code after fit() never runs for
            # trials Tune stops, and this keeps the probe on the trial's own resources).
            metrics.update(f1_metrics(unwrap(model), cfg, data["task"], device))
        metrics["finished"] = done == t.steps or stop_early
        checkpoint_dir = None
        if rank == 0:
            checkpoint_dir = Path(checkpoint_root) / f"checkpoint_step{done:06d}"
            save_checkpoint(checkpoint_dir, model, {**state, "optimizer": optimizer.state_dict(),
                                                    "scheduler": scheduler.state_dict(),
                                                    "rng": torch.get_rng_state()}, cfg, metrics)
        report(metrics, str(checkpoint_dir) if checkpoint_dir else None)
        loss_acc.zero_()
        steps_in_window, window_start = 0, time.perf_counter()
        if stop_early:
            break
    return metrics
