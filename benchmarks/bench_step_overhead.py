"""The fixed per-step cost of raycpt's loop on tiny shapes: the step time that is not model compute (issue 30).

    python benchmarks/bench_step_overhead.py                                  # tiny-gpt2, 8 x 64, CPU, 1 thread
    python benchmarks/bench_step_overhead.py --batch-size 4 --block-size 32 --rounds 8 --steps 30
    python benchmarks/bench_step_overhead.py --device cuda                    # the same on a GPU (fp32)

The packaged tiny GPT-2 (2 layers, 64 wide, GPT-2's 50,257-token vocabulary; fp32, dropout 0) takes optimizer steps
through the loop's own step, `raycpt.core.train.loop.train_step` (forward + backward, clip, fused AdamW, LR schedule,
zero_grad), on random-token blocks in memory-mapped .npy shards read through `raycpt.core.data.blocks.load_blocks` (the
layout `raycpt prepare` writes: a domain corpus in two shards and a general one, mixed 3:1 by the mixture plan).
Three ways to feed it, over the same plan positions in each round:

  before   the batch assembled on the loop's thread, as the loop did before issue 30 (kept only here): per block a
           memory-mapped row, np.stack, torch.from_numpy, on CUDA a fresh pinned buffer, .to(device, long);
  after    `raycpt.core.data.batches.Batches`: a background thread gathers the next chunk of micro-batches into a reused
           (pinned) buffer, one indexed read per corpus, while the steps before run; the loop takes each with next()
           (a slice of the chunk copied to the device);
  compute  one batch already on the device, reused: the model's compute and the optimizer step, no data at all.

Rounds alternate the order (before after compute, then compute after before, ...), so a drift in the machine's
load hits all three alike; the first `--warmup` steps of each run are left out. Both ways of the page cache are
measured (`--cache`): warm, the corpora read just before (a corpus that fits in memory); cold, their pages dropped
before each run (a corpus larger than memory, or a fresh machine: each block read is a disk read). Printed per cache
state: each path's median and mean step, its overhead (median step - compute's median step), after - before with the
range of the per-round differences, and the time the loop's thread spends getting its batch, timed around that call
alone. On a shared machine whole steps vary by more than the batch costs; that column does not. It does not see
the GIL time the thread takes from the loop while it gathers (once per chunk): the step times do. `--items`
(default on) first times each part of the step alone, in the loop's order: the profile behind these numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from raycpt.core.data.batches import Batches
from raycpt.core.data.blocks import load_blocks, mixture_plan, worker_positions
from raycpt.core.model.loading import apply_dropout, load_model, resolve_model_source
from raycpt.core.model.loss import causal_lm_loss
from raycpt.core.train.loop import build_optimizer, build_scheduler, train_step

MIX_RATIO = 0.75
SEED = 0


def write_corpus(scratch: Path, name: str, seed: int, shards: int, blocks_per_shard: int, block_size: int,
                 vocab_size: int) -> tuple[str, list[str]]:
    """Random-token blocks as `raycpt prepare` lays them out: int32 .npy shards and a .json list of them."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(shards):
        path = scratch / f"{name}-{i}.npy"
        np.save(path, rng.integers(0, vocab_size, (blocks_per_shard, block_size), dtype=np.int32))
        paths.append(str(path))
    view = scratch / f"{name}.json"
    view.write_text(json.dumps({"shards": paths, "limit": 0}))
    return str(view), paths


def evict(paths: list[str]) -> None:
    """Drop the files' pages from the OS page cache (they are clean: nothing is lost), as for a corpus larger than
    memory or on a fresh machine: every block read is then a disk read."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def batch_before(domain, general, is_domain, index, step: int, micro: int, layout: dict, device: torch.device
                 ) -> tuple[torch.Tensor, int]:
    """The loop's batch assembly before issue 30, on the loop's thread (raycpt.core.train.loop at 50523ab)."""
    pos = worker_positions(step, micro, **layout)
    n_domain = int(is_domain[pos].sum())
    batch = torch.from_numpy(np.stack([(domain if from_domain else general)[i]
                                       for from_domain, i in zip(is_domain[pos], index[pos], strict=True)]))
    if device.type == "cuda":
        batch = batch.pin_memory()
    return batch.to(device, dtype=torch.long, non_blocking=True), n_domain


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Setup:
    """The model, its optimizer state and the data, shared by every path (same shapes, same kernels)."""

    def __init__(self, args: argparse.Namespace, scratch: Path) -> None:
        self.device = torch.device(args.device)
        self.args = args
        model = load_model(resolve_model_source("packaged:tiny-gpt2"))
        apply_dropout(model, 0.0)
        model.config.use_cache = False
        self.model = model.to(self.device).train()
        self.optimizer = build_optimizer(self.model, 3e-4, 0.01, self.device)
        total = (len(args.cache) * args.rounds * 3 + 1) * (args.steps + args.warmup)  # + --items' steps
        self.scheduler = build_scheduler(self.optimizer, 2, 10 * total, 0.1)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=False)
        vocab = model.config.vocab_size
        blocks = args.batch_size * args.grad_accum * total
        # corpora of --corpus-mb each (at least the run's blocks): the blocks a run draws lie far apart in them
        per_corpus = max(blocks, int(args.corpus_mb * 2**20) // (4 * args.block_size))
        self.views, self.shard_paths = {}, []
        for name, seed, shards in (("domain", 1, 2), ("general", 2, 1)):
            view, paths = write_corpus(scratch, name, seed, shards, per_corpus // shards, args.block_size, vocab)
            self.views[name] = view
            self.shard_paths += paths
        self.domain, self.general = self.open_corpora(cold=False)
        self.is_domain, self.index = mixture_plan(blocks, MIX_RATIO, len(self.domain), len(self.general), seed=SEED,
                                                  window=args.batch_size * args.grad_accum)
        self.layout = dict(rank=0, world_size=1, batch_size=args.batch_size, grad_accum=args.grad_accum)
        generator = torch.Generator().manual_seed(SEED)
        self.fixed = [torch.randint(0, vocab, (args.batch_size, args.block_size), generator=generator)
                      .to(self.device) for _ in range(args.grad_accum)]

    def open_corpora(self, cold: bool) -> tuple:
        """The corpora memory-mapped afresh: read once before (warm), or evicted from the page cache (cold)."""
        self.domain = self.general = None  # unmapped, so that eviction can drop their pages
        if cold:
            evict(self.shard_paths)
        else:
            for path in self.shard_paths:
                with open(path, "rb") as fh:
                    while fh.read(1 << 24):
                        pass
        return load_blocks(self.views["domain"]), load_blocks(self.views["general"])

    def step(self, micro_batches: list[torch.Tensor]) -> None:
        train_step(self.model, micro_batches, self.optimizer, self.scheduler, self.scaler, grad_clip=1.0)

    def run(self, path: str, start: int, cold: bool) -> tuple[list[float], list[float]]:
        """`--warmup` + `--steps` steps fed by `path` from plan step `start`: the timed steps' wall seconds and
        the seconds the loop's thread spent getting their batches. `cold`: the corpora start out of the page
        cache."""
        a = self.args
        steps, batch_s = [], []
        self.domain, self.general = self.open_corpora(cold)
        batches = None
        if path == "after":
            batches = Batches(self.domain, self.general, self.is_domain, self.index, start_step=start,
                              steps=start + a.warmup + a.steps, device=self.device, micro_batch=a.batch_size,
                              grad_accum=a.grad_accum, rank=0, world_size=1)
        try:
            sync(self.device)
            last = time.perf_counter()
            for step in range(start, start + a.warmup + a.steps):
                fetch = time.perf_counter()
                if path == "before":
                    micro_batches = [batch_before(self.domain, self.general, self.is_domain, self.index, step, micro,
                                                  self.layout, self.device)[0] for micro in range(a.grad_accum)]
                elif path == "after":
                    micro_batches = [next(batches) for _ in range(a.grad_accum)]
                else:
                    micro_batches = self.fixed
                fetched = time.perf_counter()
                self.step(micro_batches)
                sync(self.device)
                now = time.perf_counter()
                if step - start >= a.warmup:
                    steps.append(now - last)
                    batch_s.append(fetched - fetch)
                last = now
        finally:
            if batches is not None:
                batches.close()
        return steps, batch_s


def time_items(setup: Setup, reps: int) -> dict[str, list[float]]:
    """Each part of one step timed alone, in the loop's order (the device synchronised around each part)."""
    a, s, device = setup.args, setup, setup.device
    times: dict[str, list[float]] = {}

    def timed(name: str, fn, *args, **kwargs):
        sync(device)
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        sync(device)
        times.setdefault(name, []).append(time.perf_counter() - start)
        return out

    def forward(input_ids: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=None, enabled=False):
            return causal_lm_loss(s.model, input_ids, "hf")

    def scaler_calls() -> None:  # train.precision fp32 / bf16: a disabled GradScaler, each call a pass-through
        s.scaler.unscale_(s.optimizer)
        s.scaler.update()

    batches = Batches(s.domain, s.general, s.is_domain, s.index, start_step=0, steps=reps + 1, device=device,
                      micro_batch=a.batch_size, grad_accum=1, rank=0, world_size=1)
    try:
        next(batches)  # the thread's first batch: not timed
        for rep in range(1, reps + 1):
            pos = timed("batch before: worker_positions", worker_positions, rep, 0, **s.layout)
            timed("batch before: int(is_domain[pos].sum())", lambda p: int(s.is_domain[p].sum()), pos)
            timed("batch before: whole (positions, count, np.stack, to long)", batch_before, s.domain, s.general,
                  s.is_domain, s.index, rep, 0, s.layout, device)
            time.sleep(0.002)  # let the thread gather the next batch, as it does while a step runs
            input_ids = timed("batch after: next(Batches) (slice + copy; queue once a chunk)", next, batches)
            loss = timed("model: forward", forward, input_ids)
            timed("model: backward", lambda value: s.scaler.scale(value).backward(), loss)
            timed("loss_sum += loss.detach()", torch.zeros((), device=device).add_, loss.detach())
            timed("GradScaler (disabled): unscale_ + update", scaler_calls)
            timed("clip_grad_norm_", torch.nn.utils.clip_grad_norm_, s.model.parameters(), 1.0)
            timed("optimizer.step (fused AdamW)", s.scaler.step, s.optimizer)
            timed("scheduler.step", s.scheduler.step)
            timed("zero_grad(set_to_none=True)", s.optimizer.zero_grad, True)
    finally:
        batches.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per path per round")
    parser.add_argument("--warmup", type=int, default=3, help="steps per run left out of the timing")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--scratch", default=None, help="where the corpora are written (a disk, not tmpfs, for cold)")
    parser.add_argument("--corpus-mb", type=float, default=64, help="size of each of the two corpora")
    parser.add_argument("--cache", nargs="+", default=["warm", "cold"], choices=["warm", "cold"],
                        help="warm: the corpora in the page cache (a small corpus, read before); cold: dropped from "
                             "it before each run (a corpus larger than memory, or a fresh machine)")
    parser.add_argument("--items", action=argparse.BooleanOptionalAction, default=True,
                        help="first time each part of the step alone")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(f"torch {torch.__version__}, device {args.device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if args.device == 'cuda' else ''}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs; tiny-gpt2 {args.batch_size} x {args.block_size}"
          f"{f' x {args.grad_accum} micro-batches' if args.grad_accum > 1 else ''}, fp32")
    with tempfile.TemporaryDirectory(prefix="raycpt-bench-overhead-", dir=args.scratch) as scratch:
        setup = Setup(args, Path(scratch))
        if args.items:
            items = time_items(setup, max(10, args.steps))
            print(f"\nper item, timed alone (median of {len(next(iter(items.values())))}, ms):")
            for name, values in items.items():
                print(f"  {name:60s} {1e3 * np.median(values):8.3f}")
        start = 0
        for cache in args.cache:
            start = compare(setup, args, cache == "cold", start)


def compare(setup: Setup, args: argparse.Namespace, cold: bool, start: int) -> int:
    """The three paths in alternating rounds from plan step `start`; prints their table, returns the next step."""
    paths = ["before", "after", "compute"]
    step_s: dict[str, list[float]] = {p: [] for p in paths}
    batch_s: dict[str, list[float]] = {p: [] for p in paths}
    round_medians: dict[str, list[float]] = {p: [] for p in paths}
    for round_index in range(args.rounds):
        for path in paths if round_index % 2 == 0 else reversed(paths):
            steps, fetch = setup.run(path, start, cold)
            start += args.warmup + args.steps
            step_s[path] += steps
            batch_s[path] += fetch
            round_medians[path].append(float(np.median(steps)))
    median = {p: 1e3 * float(np.median(step_s[p])) for p in paths}
    print(f"\n{'cold' if cold else 'warm'} page cache: {args.rounds} rounds x {args.steps} timed steps per path "
          f"(load1 at the end {os.getloadavg()[0]:.1f})")
    print(f"  {'path':8s} {'step ms: median':>15s} {'mean':>8s} {'overhead':>9s}   "
          f"{'batch on the loop thread ms: median':>35s} {'mean':>7s} {'max':>7s}")
    for p in paths:
        fetch = 1e3 * np.array(batch_s[p])
        print(f"  {p:8s} {median[p]:15.3f} {1e3 * np.mean(step_s[p]):8.3f} {median[p] - median['compute']:9.3f}   "
              f"{np.median(fetch):35.4f} {fetch.mean():7.4f} {fetch.max():7.3f}")
    diffs = 1e3 * (np.array(round_medians["after"]) - np.array(round_medians["before"]))
    saved = {stat: 1e3 * (stat_fn(batch_s["before"]) - stat_fn(batch_s["after"]))
             for stat, stat_fn in (("median", np.median), ("mean", np.mean))}
    print(f"  after - before: {median['after'] - median['before']:+.3f} ms per step (median steps; per-round "
          f"differences {diffs.min():+.3f} to {diffs.max():+.3f} ms); the loop's thread spends {saved['median']:.4f} "
          f"ms (median) / {saved['mean']:.4f} ms (mean) less per step getting its batch")
    return start


if __name__ == "__main__":
    main()
