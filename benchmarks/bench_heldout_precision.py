"""How precise is a held-out perplexity on the laptop demo? The base model's per-block loss sd on the validation
blocks (domain and general), and the 95% interval on ppl it implies for n blocks.

The blocks come from the project's own data step (`raycpt.core.prepare.prepare_experiment`) on the config, with
`data.heldout_blocks` raised to `--blocks` so the sd is estimated on more blocks than a demo eval scores: the
validation blocks are the first blocks of each corpus's held-out stream, so the demo's 8 are the first 8 of these
(checked). The base model scores every block in fp32 on CPU (mean next-token loss per block, as every eval does).

An eval's ppl is exp(mean block loss), so with a per-block loss sd of `sd` nats over n blocks its normal 95% interval
is ppl x exp(+-1.96 sd / sqrt(n)): relative to the ppl, exp(-1.96 sd / sqrt(n)) - 1 below and exp(+1.96 sd /
sqrt(n)) - 1 above (asymmetric). The blocks for +-T are the n that bring the wider (upper) side to T:
n = ceil((1.96 sd / ln(1 + T))^2). The percentile bootstrap the sweep reports (raycpt.core.eval.stats.ppl_interval) is
printed beside it on the first n of the scored blocks as a cross-check. This is an *unpaired* ppl; a trial-vs-base
change on the same blocks (what the forgetting bound uses) is much tighter.

    RAYCPT_CACHE=~/.cache/raycpt python benchmarks/bench_heldout_precision.py            # 128 blocks, ~2-4 min
    python benchmarks/bench_heldout_precision.py --blocks 48 --sizes 8 16 48
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch

from raycpt.core.config import load_config
from raycpt.core.data.blocks import load_blocks
from raycpt.core.eval.evaluate import heldout_block_losses
from raycpt.core.eval.stats import ppl_interval
from raycpt.core.model.loading import load_model
from raycpt.core.prepare import prepare_experiment

Z95 = 1.96
ROOT = Path(__file__).resolve().parents[1]


def relative_interval(sd: float, n: int) -> tuple[float, float]:
    """(low, high) of the normal 95% interval on ppl relative to the ppl, for n blocks of per-block loss sd."""
    half = Z95 * sd / math.sqrt(n)
    return math.exp(-half) - 1, math.exp(half) - 1


def blocks_for(sd: float, target: float) -> int:
    """Blocks that bring the upper (wider) side of the interval to `target` (0.03 = +3%)."""
    return math.ceil((Z95 * sd / math.log1p(target)) ** 2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "experiments" / "laptop.yaml"))
    p.add_argument("--blocks", type=int, default=128, help="validation blocks per corpus to score (default 128)")
    p.add_argument("--sizes", type=int, nargs="+", default=[8, 32, 128], help="n blocks to state the interval for")
    p.add_argument("--target", type=float, default=0.03, help="relative half-width to size the eval for")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    demo_cfg = load_config(args.config)
    cfg = load_config(args.config, [f"data.heldout_blocks={args.blocks}"])
    demo, manifest = prepare_experiment(demo_cfg), prepare_experiment(cfg)
    model = load_model(cfg.model.source, cfg.model.dtype, cfg.model.trust_remote_code).eval()
    print(f"config {args.config}: block {manifest.block_size}, the demo's validation: {demo_cfg.data.heldout_blocks} "
          f"blocks per corpus; scored here: up to {args.blocks}; base model {cfg.model.source} ({cfg.model.dtype}, "
          f"{torch.get_num_threads()} thread(s))")
    scored_tokens = manifest.block_size - 1
    for name, corpus, demo_corpus in (("domain", manifest.domain, demo.domain),
                                      ("general", manifest.general, demo.general)):
        if corpus is None:
            continue
        blocks, demo_blocks = np.asarray(load_blocks(corpus.heldout)), np.asarray(load_blocks(demo_corpus.heldout))
        same = np.array_equal(blocks[:len(demo_blocks)], demo_blocks)
        start = time.perf_counter()
        losses = heldout_block_losses(model, blocks, batch_size=args.batch_size)
        seconds = time.perf_counter() - start
        n_all, sd = len(losses), float(np.std(losses, ddof=1))
        sd_demo = float(np.std(losses[:len(demo_blocks)], ddof=1))
        print(f"\n{name}: {n_all} blocks scored in {seconds:.0f} s (the demo's {len(demo_blocks)} are the first "
              f"{len(demo_blocks)}: {'yes' if same else 'NO'}); mean loss {losses.mean():.4f} nats, ppl "
              f"{math.exp(losses.mean()):.2f}; per-block loss sd {sd:.3f} nats (ddof 1; on the demo's "
              f"{len(demo_blocks)} alone: {sd_demo:.3f})")
        print(f"  {'n':>5s} {'normal 95%: exp(+-1.96 sd/sqrt n) - 1':>40s} {'bootstrap on the first n':>26s}")
        for n in args.sizes:
            low, high = relative_interval(sd, n)
            boot = "-"
            if n <= n_all:
                part = losses[:n]
                iv = ppl_interval(part * scored_tokens, np.full(n, scored_tokens, dtype=np.float64))
                boot = f"{iv.low / iv.value - 1:+.1%} / {iv.high / iv.value - 1:+.1%}"
            print(f"  {n:>5d} {f'{low:+.1%} / {high:+.1%}':>40s} {boot:>26s}")
        need = blocks_for(sd, args.target)
        print(f"  +-{args.target:.0%} needs n = ceil((1.96 x {sd:.3f} / ln(1 + {args.target:g}))^2) = {need:,} blocks "
              f"({need * manifest.block_size:,} tokens) per corpus")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
