"""raycpt's core loop (`raycpt.core.train.loop.train`) vs `transformers.Trainer`: same model, data, batch, steps and
lr schedule.

CPU (this machine; packaged models on the packed Rotten Tomatoes + news blocks that `prepare_experiment` caches):
    RAYCPT_CACHE=/tmp/rc python benchmarks/bench_loop.py                        # tiny-gpt2, then SmolLM2-135M
    RAYCPT_CACHE=/tmp/rc python benchmarks/bench_loop.py --model tiny-gpt2 --steps 40 --rounds 2
    python benchmarks/bench_loop.py --device cpu --model gpt2-124m --tiny --steps 2   # checks the GPU path on CPU
GPU (no Ray, no datasets needed; random-init models on random tokens, bf16 autocast, MFU against --peak-tflops):
    python benchmarks/bench_loop.py --device cuda --model gpt2-124m llama-1.1b llama-3.2-1b
    python benchmarks/bench_loop.py --device cuda --model gpt2-124m --compile --loss-impl chunked
`--loss-impl` sets raycpt's `train.loss_impl` (the Trainer always computes HF's loss over full logits);
llama-3.2-1b is Llama-3.2-1B's shape (128,256-token vocabulary, tied embeddings), random init.

What is timed, identically on both sides: a global `torch.optim` step post-hook stamps the end of every optimizer
step; the window runs from the end of step `--warmup` to the end of the last step, so it holds exactly
`steps - warmup` whole steps (data fetch, forward, backward, clip, optimizer, scheduler, zero_grad) and no model
load, no warm-up, no final eval or checkpoint. With `--warmup 0` the window starts at the model's first forward.
Printed per run: mean, median and fastest step (wall), process CPU seconds per step, and the 1-minute load average
at the run's end. The ratio uses each side's median step in its best round: a burst of load from another process
moves the mean, not the median, and the best round is the least disturbed. Read a row whose load1 is well above
the thread count as contaminated, and rerun. Cross-checks: raycpt's own `perf/tokens_per_s` (its window includes
the warm-up steps) and the Trainer's `on_step_end` window.

Same work on both sides: fp32 weights (bf16 autocast on CUDA), AdamW(0.9, 0.95, eps 1e-8, wd 0.01), linear warmup
+ cosine to 0.1 x lr, grad clip 1.0, the same blocks in the same order, `--threads` torch threads, back to back in
one process (`--rounds` repeats them, alternating the order). The Trainer keeps its default optimizer
(adamw_torch_fused for torch >= 2.8, also on CPU); raycpt uses its own (fused on CUDA and CPU). On CPU a third side,
"unfused", runs raycpt's step (`raycpt.core.train.loop.train_step`) on the loop's batches with torch's default AdamW
kernel (raycpt's CPU optimizer before 2026-11-26), and `optimizer.step()` alone is timed fused vs unfused,
interleaved: whole steps on a shared machine are too noisy to resolve that difference. Losses are a sanity check
only: the Trainer may normalise its training_loss differently (num_items_in_batch counts every label; the model
predicts T-1 per block).
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import tempfile
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from raycpt.core.data.blocks import PreparedCorpus
from raycpt.core.prepare import Manifest

PACKAGED = {"tiny-gpt2": "packaged:tiny-gpt2", "smollm2-135m": "packaged:smollm2-135m"}
SYNTHETIC = ("gpt2-124m", "llama-1.1b", "llama-3.2-1b")
# Per model: (steps, warmup, batch_size, block_size, lr). Packaged ones follow smoke.yaml / laptop.yaml; the GPU
# ones follow nanoGPT's GPT-2 124M (batch 16 x 1024) and TinyLlama 1.1B (batch 8 x 2048).
DEFAULTS = {"tiny-gpt2": (30, 5, 4, 128, 3e-3), "smollm2-135m": (8, 2, 4, 128, 2e-4),
            "gpt2-124m": (30, 10, 16, 1024, 6e-4), "llama-1.1b": (20, 5, 8, 2048, 4e-4),
            "llama-3.2-1b": (20, 5, 8, 2048, 4e-4)}
TINY_SHAPE = (4, 64)  # --tiny: batch x block for the synthetic models, so the GPU path runs on a CPU in seconds
H100_BF16_PEAK_TFLOPS = 989.0  # dense bf16, H100 SXM


def synthetic_config(name: str, tiny: bool):
    """Random-init model configs for the GPU benchmark; `tiny` shrinks them to run on a CPU in seconds."""
    from transformers import GPT2Config, LlamaConfig

    if name == "gpt2-124m":
        size = dict(n_layer=2, n_embd=64, n_head=2) if tiny else dict(n_layer=12, n_embd=768, n_head=12)
        return GPT2Config(vocab_size=50304, n_positions=1024, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                          tie_word_embeddings=True, **size)
    tiny_size = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=128)
    if name == "llama-3.2-1b":  # Llama-3.2-1B's shape: the 128k vocabulary is the point, so --tiny keeps it
        size = tiny_size if tiny else dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                                           num_key_value_heads=8, intermediate_size=8192)
        return LlamaConfig(vocab_size=128256, max_position_embeddings=8192, tie_word_embeddings=True,
                           rope_theta=500000.0, **size)
    size = tiny_size if tiny else dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32,
                                       num_key_value_heads=4, intermediate_size=5632)
    return LlamaConfig(vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False, **size)

class TimingDone(Exception):
    """Raised after the last timed step to skip raycpt's final eval and checkpoint (GBs for a 1.1B model)."""


@dataclass
class StepClock:
    """Timestamps of every optimizer step's end (global torch.optim hook) and of the first forward."""

    stop_after: int = 0
    """Raise TimingDone after this many steps (0 = never)."""
    step_ends: list[float] = field(default_factory=list)
    step_cpu_ends: list[float] = field(default_factory=list)
    """Process CPU time (all threads) at each step's end: less moved by other processes than wall time."""
    first_forward: float | None = None
    first_forward_cpu: float | None = None

    def __post_init__(self) -> None:
        self._handle = register_optimizer_step_post_hook(self._on_step)

    def _on_step(self, optimizer, args, kwargs) -> None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()  # sync point: the GPU must finish the step before it is stamped
        self.step_ends.append(time.perf_counter())
        self.step_cpu_ends.append(time.process_time())
        if len(self.step_ends) == self.stop_after:
            raise TimingDone

    def watch_forward(self, model: torch.nn.Module) -> torch.nn.Module:
        """Stamp the first forward; needed only with no warm-up (a hook can cost graph breaks under compile)."""

        def stamp(module, inputs):
            if self.first_forward is None:
                self.first_forward, self.first_forward_cpu = time.perf_counter(), time.process_time()

        model.register_forward_pre_hook(stamp)
        return model

    def window(self, warmup: int) -> dict[str, float]:
        """Timed steps, their seconds, and the median and fastest step, from the end of step `warmup` (or the first
        forward) to the last step's end."""
        start = self.step_ends[warmup - 1] if warmup else self.first_forward
        start_cpu = self.step_cpu_ends[warmup - 1] if warmup else self.first_forward_cpu
        step_seconds = np.diff([start, *self.step_ends[warmup:]])
        return {"steps": len(step_seconds), "seconds": self.step_ends[-1] - start,
                "cpu_seconds": self.step_cpu_ends[-1] - start_cpu,
                "median_step": float(np.median(step_seconds)), "min_step": float(step_seconds.min()),
                "load": os.getloadavg()[0]}

    def close(self) -> None:
        self._handle.remove()


@dataclass
class Workload:
    name: str
    source: str  # model dir or packaged source
    corpora: tuple[str, str] | None  # (domain, general) packaged corpora, or None for random tokens
    data: Any  # raycpt's data manifest (raycpt.core.prepare.Manifest)
    steps: int
    warmup: int
    batch_size: int
    block_size: int
    lr: float
    device: str
    precision: str
    compile: bool
    seq_len: int
    scratch: Path
    skip_final_eval: bool
    loss_impl: str = "hf"

    def raycpt_config(self):
        from raycpt.core.config import config_from_dict

        domain, general = self.corpora or ("random-tokens", "")
        return config_from_dict({
            "name": "bench-loop", "storage_path": str(self.scratch / "runs"),
            "model": {"source": self.source},
            "data": {"domain": domain, "general": general, "block_size": self.block_size,
                     "heldout_blocks": 2, "max_tokens": 400_000},
            # eval_every = steps: the only eval and checkpoint come after the last step, outside the timed window
            "train": {"lr": self.lr, "warmup_steps": min(2, self.steps), "steps": self.steps,
                      "batch_size": self.batch_size, "eval_every": self.steps, "mix_ratio": 0.8 if general else 1.0,
                      "precision": self.precision, "compile": self.compile, "dropout": 0.0,
                      "loss_impl": self.loss_impl},
            "resources": {"num_workers": 1, "cpus_per_worker": 1, "use_gpu": self.device == "cuda"},
        })


def prepare_workload(name: str, args: argparse.Namespace, scratch: Path) -> Workload:
    steps, warmup, batch_size, block_size, lr = DEFAULTS[name]
    if args.tiny and name in SYNTHETIC:
        batch_size, block_size = TINY_SHAPE
    steps, warmup = args.steps or steps, args.warmup if args.warmup is not None else warmup
    batch_size, block_size = args.batch_size or batch_size, args.block_size or block_size
    warmup = min(warmup, steps - 1)
    precision = "bf16" if args.device == "cuda" else "fp32"
    common = dict(steps=steps, warmup=warmup, batch_size=batch_size, block_size=block_size, lr=lr,
                  device=args.device, precision=precision, compile=args.compile, seq_len=block_size, scratch=scratch,
                  skip_final_eval=args.skip_final_eval if args.skip_final_eval is not None else args.device == "cuda",
                  loss_impl=args.loss_impl)
    if name in PACKAGED:
        from raycpt.core.prepare import prepare_experiment

        workload = Workload(name=name, source=PACKAGED[name], corpora=("packaged:rotten-tomatoes", "packaged:news"),
                            data={}, **common)
        # The real data path: packed Rotten Tomatoes (domain) + news (general) blocks, cached after the first run.
        workload.data = prepare_experiment(workload.raycpt_config())
        return workload
    # Synthetic: a random-init model saved where train() can load it, random tokens as the packed blocks.
    from transformers import AutoModelForCausalLM

    config = synthetic_config(name, args.tiny)
    torch.manual_seed(0)
    model_dir = scratch / name
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    rng = np.random.default_rng(0)
    paths = {}
    for part, n_blocks in (("train", steps * batch_size), ("heldout", batch_size), ("test", batch_size)):
        paths[part] = str(scratch / f"{name}-{part}.npy")
        np.save(paths[part], rng.integers(0, config.vocab_size, (n_blocks, block_size), dtype=np.int32))
    corpus = PreparedCorpus(train=paths["train"], heldout=paths["heldout"], test=paths["test"], documents=0,
                            removed_for_leakage=0, train_tokens=steps * batch_size * block_size,
                            heldout_tokens=batch_size * block_size, test_tokens=batch_size * block_size)
    data = Manifest(str(model_dir), "random", block_size, corpus, None, None)
    return Workload(name=name, source=str(model_dir), corpora=None, data=data, **common)


def loop_batches(workload: Workload, device: str):
    """The micro-batches raycpt's loop takes, in its order (one worker, one micro-batch per step): its own batch
    source, raycpt.core.data.batches.Batches, over the plan `train` builds from the config."""
    from raycpt.core.data.batches import Batches
    from raycpt.core.data.blocks import load_blocks, mixture_seed, synthetic_plan

    cfg = workload.raycpt_config()
    t, data = cfg.train, workload.data
    domain = load_blocks(data.domain.train)
    general = load_blocks(data.general.train) if data.general else domain[:0]
    synthetic = load_blocks(data.synthetic.train) if data.synthetic else domain[:0]
    is_domain, is_synthetic, index = synthetic_plan(
        t.steps * t.global_batch(), t.mix_ratio, len(domain), len(general), seed=mixture_seed(cfg.data.seed, t.seed),
        window=t.global_batch(), synthetic_ratio=t.synthetic_ratio, n_synthetic=len(synthetic))
    return Batches(domain, general, is_domain, index, start_step=0, steps=t.steps, rank=0, world_size=1,
                   micro_batch=t.batch_size, grad_accum=1, device=device,
                   synthetic=synthetic if data.synthetic else None,
                   is_synthetic=is_synthetic if data.synthetic else None)


def planned_blocks(workload: Workload) -> np.ndarray:
    """The blocks raycpt's loop draws, in its order, so the Trainer sees exactly the same data."""
    with loop_batches(workload, "cpu") as batches:
        return torch.cat(list(batches)).numpy()


def build_optimizer_unfused(model: torch.nn.Module, lr: float, weight_decay: float, device: torch.device
                            ) -> torch.optim.Optimizer:
    """raycpt.core.train.loop.build_optimizer as it was before fused AdamW on CPU: torch's default kernel there."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")


def compare_optimizer_step(workload: Workload, reps: int = 8) -> dict[str, float]:
    """optimizer.step() alone, raycpt's AdamW vs the unfused one on the same parameters and gradients,
    interleaved `reps` times: a whole step is too noisy on a shared machine to resolve a ~0.5 s difference."""
    from raycpt.core.model.loading import load_model
    from raycpt.core.train.loop import build_optimizer

    model = load_model(workload.source)
    generator = torch.Generator().manual_seed(0)
    for param in model.parameters():
        param.grad = torch.randn(param.shape, generator=generator) * 1e-3
    device = torch.device(workload.device)
    optimizers = {"raycpt": build_optimizer(model, workload.lr, 0.01, device),
                  "unfused": build_optimizer_unfused(model, workload.lr, 0.01, device)}
    for optimizer in optimizers.values():
        optimizer.step()  # allocates the state; not timed
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for _ in range(reps):
        for name, optimizer in optimizers.items():
            start = time.perf_counter()
            optimizer.step()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def run_raycpt(workload: Workload) -> dict[str, float]:
    from raycpt.core.train.loop import train

    cfg = workload.raycpt_config()
    clock = StepClock(stop_after=workload.steps if workload.skip_final_eval else 0)
    reports: list[dict[str, Any]] = [{}]
    try:
        with tempfile.TemporaryDirectory(dir=workload.scratch) as checkpoints:
            train(cfg, workload.data, lambda metrics, checkpoint: reports.append(metrics),
                  checkpoint_root=checkpoints, device=workload.device,
                  wrap_model=clock.watch_forward if workload.warmup == 0 else (lambda m: m))
    except TimingDone:
        pass
    finally:
        clock.close()
    last = reports[-1]
    return {**clock.window(workload.warmup), "own_tokens_per_s": last.get("perf/tokens_per_s", float("nan")),
            "own_train_s": last.get("time/train_s", float("nan")), "loss": last.get("train/loss", float("nan"))}


def run_unfused(workload: Workload) -> dict[str, float]:
    """raycpt's step (raycpt.core.train.loop.train_step) on the loop's batches, as `train` runs them, with torch's
    default AdamW kernel: the work of the raycpt side's timed window, the optimizer aside (CPU, fp32)."""
    from raycpt.core.model.loading import apply_dropout, load_model
    from raycpt.core.model.loss import resolve_loss_impl
    from raycpt.core.train.loop import build_scheduler, train_step

    t = workload.raycpt_config().train
    device = torch.device(workload.device)
    torch.manual_seed(t.seed)
    model = load_model(workload.source)
    apply_dropout(model, t.dropout)
    model.config.use_cache = False
    model.to(device).train()
    loss_impl, _ = resolve_loss_impl(t.loss_impl, device, model)  # what train() runs
    optimizer = build_optimizer_unfused(model, t.lr, t.weight_decay, device)
    scheduler = build_scheduler(optimizer, t.warmup_steps, t.steps, t.min_lr_ratio)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    clock = StepClock()
    if workload.warmup == 0:
        clock.watch_forward(model)
    loss_sum = torch.zeros((), device=device)
    try:
        with loop_batches(workload, workload.device) as batches:
            for input_ids in batches:
                train_step(model, [input_ids], optimizer, scheduler, scaler, loss_impl=loss_impl,
                           grad_clip=t.grad_clip, loss_sum=loss_sum)
    finally:
        clock.close()
    return {**clock.window(workload.warmup), "own_tokens_per_s": float("nan"), "own_train_s": float("nan"),
            "loss": float(loss_sum) / t.steps}


def run_trainer(workload: Workload) -> dict[str, float]:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from raycpt.core.model.loading import apply_dropout, load_model

    blocks = torch.from_numpy(planned_blocks(workload))

    class Blocks(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(blocks)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": blocks[i], "labels": blocks[i]}

    class StepEnds(TrainerCallback):
        """The Trainer's own view: on_step_end stamps (after optimizer, scheduler and zero_grad)."""

        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            if workload.device == "cuda":
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())

    model = load_model(workload.source)
    apply_dropout(model, 0.0)
    model.config.use_cache = False
    clock = StepClock()
    if workload.warmup == 0:
        clock.watch_forward(model)
    step_ends = StepEnds()
    # The same block order as raycpt's; older transformers (the GPU machine's 5.17) may lack the switch.
    sequential = ({"train_sampling_strategy": "sequential"}
                  if "train_sampling_strategy" in {f.name for f in fields(TrainingArguments)} else {})
    args = TrainingArguments(
        output_dir=str(workload.scratch / "trainer"), report_to="none", save_strategy="no", eval_strategy="no",
        logging_steps=10**6, disable_tqdm=True, dataloader_num_workers=0, use_cpu=workload.device == "cpu",
        per_device_train_batch_size=workload.batch_size, max_steps=workload.steps, learning_rate=workload.lr,
        lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1},
        warmup_steps=min(2, workload.steps), adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8,
        weight_decay=0.01, max_grad_norm=1.0, bf16=workload.precision == "bf16", torch_compile=workload.compile,
        seed=0, **sequential)
    # The Trainer's default optimizer (adamw_torch_fused for torch >= 2.8): what its users get.
    trainer = Trainer(model=model, args=args, train_dataset=Blocks(), callbacks=[step_ends])
    try:
        output = trainer.train()
    finally:
        clock.close()
    ends = step_ends.ends
    callback_s = ends[-1] - ends[workload.warmup - 1] if workload.warmup else float("nan")
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps the torch optimizer
    return {**clock.window(workload.warmup), "callback_s": callback_s, "loss": output.training_loss,
            "optimizer": f"{type(inner).__name__} fused={inner.defaults.get('fused')}"}


def report(workload: Workload, results: dict[str, list[dict[str, float]]], peak_tflops: float,
           optimizer_step: dict[str, float] | None = None) -> float:
    """Print one model's table; returns raycpt's tokens/s over the Trainer's (median step, best round of each)."""
    tokens_per_step = workload.batch_size * workload.block_size
    print(f"\n{workload.name}: {workload.steps} steps of {workload.batch_size}x{workload.block_size} tokens, "
          f"{workload.warmup} warm-up step(s) excluded, {workload.device} {workload.precision}, "
          f"{torch.get_num_threads()} threads{', torch.compile' if workload.compile else ''}")
    header = (f"{'side':9s} {'round':>5s} {'steps':>5s} {'mean s':>7s} {'median s':>8s} {'min s':>7s} "
              f"{'cpu s':>6s} {'tok/s mean':>10s} {'tok/s min':>9s} {'load1':>5s}  cross-check")
    print(header)
    print("-" * (len(header) + 50))
    best: dict[str, float] = {}
    for side, runs in results.items():
        for i, r in enumerate(runs):
            mean_step = r["seconds"] / r["steps"]
            best[side] = max(best.get(side, 0.0), tokens_per_step / r["median_step"])
            if side == "raycpt":
                check = (f"own perf/tokens_per_s {r['own_tokens_per_s']:.0f} over all {workload.steps} steps "
                         f"(time/train_s {r['own_train_s']:.1f})")
            elif side == "unfused":
                check = "train_step on the loop's batches"
            else:
                check = f"on_step_end window {r['callback_s']:.2f} s, {r['optimizer']}"
            print(f"{side:9s} {i + 1:5d} {r['steps']:5d} {mean_step:7.3f} {r['median_step']:8.3f} {r['min_step']:7.3f} "
                  f"{r['cpu_seconds'] / r['steps']:6.2f} {tokens_per_step / mean_step:10.0f} "
                  f"{tokens_per_step / r['min_step']:9.0f} {r['load']:5.1f}  "
                  f"{check}; loss {r['loss']:.3f}")
    ratio = best["raycpt"] / best["trainer"]
    print(f"ratio {workload.name}: raycpt {ratio:.2f}x Trainer tokens/s (median step, best round each; "
          "target >= 1.0x)")
    if "unfused" in best:
        print(f"ratio {workload.name}: raycpt {best['raycpt'] / best['unfused']:.2f}x raycpt with unfused AdamW "
              f"(whole steps; see the optimizer.step line for the resolved difference)")
    if optimizer_step:
        saved = optimizer_step["unfused"] - optimizer_step["raycpt"]
        median = float(np.median([r["median_step"] for r in results["raycpt"]]))
        speedup = optimizer_step["unfused"] / optimizer_step["raycpt"]
        print(f"optimizer.step alone (median, interleaved): raycpt (fused) {optimizer_step['raycpt']:.3f} s, "
              f"unfused {optimizer_step['unfused']:.3f} s ({speedup:.1f}x): fused saves {saved:.3f} s per step = "
              f"{100 * saved / median:.1f}% of raycpt's median step")
    if workload.device == "cuda":
        from transformers import AutoConfig, AutoModelForCausalLM

        from raycpt.core.train.loop import flops_per_token  # the formula raycpt logs as perf/mfu

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(workload.source))
        flops = flops_per_token(model, workload.seq_len)
        for side, tokens_per_s in best.items():
            peak_gib = min(r["peak_gib"] for r in results[side])
            print(f"MFU {side}: {100 * tokens_per_s * flops / (peak_tflops * 1e12):.1f}% "
                  f"({flops / 1e9:.2f} GFLOP/token, peak {peak_tflops:g} TFLOP/s); peak memory {peak_gib:.1f} GiB")
        memory = {side: min(r["peak_gib"] for r in results[side]) for side in best}
        print(f"peak memory {workload.name}: raycpt {memory['raycpt']:.1f} GiB vs Trainer {memory['trainer']:.1f} GiB "
              f"({100 * (1 - memory['raycpt'] / memory['trainer']):+.0f}% less)")
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=["tiny-gpt2", "smollm2-135m"],
                        choices=[*PACKAGED, *SYNTHETIC])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=0, help="optimizer steps (0 = the model's default)")
    parser.add_argument("--warmup", type=int, default=None, help="steps left out of the timing window")
    parser.add_argument("--batch-size", type=int, default=0)
    parser.add_argument("--block-size", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=1, help="alternate raycpt / Trainer this many times")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads for both sides")
    parser.add_argument("--compile", action="store_true", help="torch.compile on both sides")
    parser.add_argument("--tiny", action="store_true", help="shrink gpt2-124m / llama-1.1b to run on a CPU")
    parser.add_argument("--skip-final-eval", action=argparse.BooleanOptionalAction, default=None,
                        help="stop raycpt after the last timed step, before its eval + checkpoint (default: on CUDA)")
    parser.add_argument("--unfused", action=argparse.BooleanOptionalAction, default=True,
                        help="also run raycpt with torch's default (unfused) AdamW kernel (CPU only)")
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_PEAK_TFLOPS)
    parser.add_argument("--loss-impl", default="hf", choices=["auto", "hf", "chunked", "liger"],
                        help="raycpt's train.loss_impl (the Trainer always uses HF's loss)")
    args = parser.parse_args()
    if args.device == "cuda" and any(m in PACKAGED for m in args.model):
        parser.error("--device cuda takes the synthetic models (gpt2-124m, llama-1.1b): the packaged ones need "
                     "datasets to pack their corpora")

    import transformers

    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, device {args.device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if args.device == 'cuda' else ''}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    ratios = {}
    with tempfile.TemporaryDirectory(prefix="raycpt-bench-loop-") as scratch:
        for name in args.model:
            workload = prepare_workload(name, args, Path(scratch))
            sides = {"raycpt": run_raycpt, "trainer": run_trainer}
            if args.unfused and args.device == "cpu":  # on CUDA raycpt has always used fused AdamW
                sides["unfused"] = run_unfused
            results: dict[str, list[dict[str, float]]] = {side: [] for side in sides}
            for round_index in range(args.rounds):
                # A B C, then C B A: a drift in the machine's load hits every side alike
                order = list(sides) if round_index % 2 == 0 else list(reversed(sides))
                for side in order:
                    if args.device == "cuda":
                        torch.cuda.empty_cache()
                        torch.cuda.reset_peak_memory_stats()
                    run = sides[side](workload)
                    run["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else math.nan
                    results[side].append(run)
                    gc.collect()
            optimizer_step = compare_optimizer_step(workload) if "unfused" in sides else None
            ratios[name] = report(workload, results, args.peak_tflops, optimizer_step)
    print("\n" + ", ".join(f"{name}: raycpt {ratio:.2f}x Trainer" for name, ratio in ratios.items()))


if __name__ == "__main__":
    main()
