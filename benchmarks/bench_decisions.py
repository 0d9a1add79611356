"""How often do ASHA's stop decisions and the pick flip when the validation blocks are resampled? (issue 28)

Re-runs the trials of an analysed sweep (their sampled hyperparameters, each to its own train.steps, no scheduler)
in this process, evaluating at the sweep's eval steps on `--blocks` validation blocks per corpus
(`data.heldout_blocks`), with every block's loss kept. Then, for each size n in `--sizes`, `--resamples` times: draw
n of those blocks with replacement (the same draw for every trial: trials are scored on the same blocks) and decide
again, from the resampled domain ppl,
- ASHA's stops, emulated synchronously: at the first rung (the first eval, grace_period 1) a trial goes on only if
  its value is in the best 1/reduction_factor of the trials (Tune's ASHA is asynchronous; with the sweep's
  concurrency it compares against the trials that reached the rung first, so this is its decision with hindsight);
- the pick: the lowest final domain ppl among the trials that went on (search.metric; the rule's F1 and forgetting
  bound are left out so that the held-out blocks are the only noise).
A flip is a resample whose decision differs from the decision on all `--blocks` blocks. Also reported: the same
decisions from the smoothed training loss (train/loss: the mean over the steps since the previous eval) and what
each size costs per eval (measured on this machine, one thread).

    python benchmarks/bench_decisions.py runs/laptop --blocks 128 --sizes 8 32 128
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raycpt.core import metrics as m
from raycpt.core.config import config_from_dict, load_saved_config, to_dict
from raycpt.core.files import read_json
from raycpt.core.prepare import prepare_experiment
from raycpt.core.train.checkpoint import keeping_newest_checkpoint
from raycpt.core.train.loop import train
from raycpt.results.collect import HP_PREFIX
from raycpt.results.summary import SUMMARY_FILE


def run_trials(exp: Path, blocks: int, out: Path) -> tuple[dict[str, list[dict[str, Any]]], float]:
    """Each trial of the sweep re-run with `blocks` validation blocks: its reports, and seconds per eval."""
    cfg = load_saved_config(exp, relocate=True)
    summary = read_json(exp / SUMMARY_FILE)
    reports: dict[str, list[dict[str, Any]]] = {}
    eval_seconds: list[float] = []
    for trial in summary["trials"]:
        tid = trial["trial_id"]
        raw = to_dict(cfg)
        for key, value in trial.items():
            if key.startswith(HP_PREFIX):
                section, name = key.removeprefix(HP_PREFIX).split(".", 1)
                raw[section][name] = value
        raw["search"] = {**raw["search"], "space": {}}
        raw["data"] = {**raw["data"], "heldout_blocks": blocks}
        raw["name"], raw["storage_path"] = f"decisions-{tid}", str(out)
        trial_cfg = config_from_dict(raw)
        cache = out / f"{tid}.jsonl"
        if cache.is_file():
            reports[tid] = [json.loads(line) for line in cache.read_text().splitlines()]
            continue
        # the sweep's data (the task's texts kept out of the corpus as in the sweep), without the probe at the end
        manifest = dataclasses.replace(prepare_experiment(trial_cfg), task=None)
        got: list[dict[str, Any]] = []

        def report(metrics: dict[str, Any], _checkpoint: str | None, got: list[dict[str, Any]] = got) -> None:
            got.append({k: metrics.get(k) for k in (m.STEP, m.TRAIN_LOSS, m.DOMAIN_BLOCK_LOSSES,
                                                  m.GENERAL_BLOCK_LOSSES)})

        print(f"trial {tid}: {trial_cfg.train.total_steps(trial_cfg.data.block_size)} steps, "
              f"{blocks} validation blocks", flush=True)
        train(trial_cfg, manifest, keeping_newest_checkpoint(report), checkpoint_root=out / tid)
        shutil.rmtree(out / tid, ignore_errors=True)  # only the reports are needed
        cache.write_text("".join(json.dumps(r) + "\n" for r in got))
        reports[tid] = got
    # cost of one eval per block: score the base model's blocks once, timed
    from raycpt.core.data.blocks import load_blocks
    from raycpt.core.eval.evaluate import heldout_block_losses
    from raycpt.core.model.loading import load_model

    manifest = prepare_experiment(config_from_dict({**to_dict(cfg), "data": {**to_dict(cfg)["data"],
                                                                               "heldout_blocks": blocks}}))
    model = load_model(cfg.model.source, cfg.model.dtype).eval()
    held = load_blocks(manifest.domain.heldout)
    for _ in range(2):  # the second is timed
        start = time.perf_counter()
        heldout_block_losses(model, held, batch_size=cfg.train.batch_size, device=torch.device("cpu"))
        eval_seconds.append(time.perf_counter() - start)
    return reports, eval_seconds[-1] / len(held)


def decisions(values: dict[str, list[float]], keep_fraction: float) -> tuple[frozenset[str], str | None]:
    """ASHA's stops at the first rung (values[tid][0]) and the pick (lowest last value among the rest)."""
    first = {tid: v[0] for tid, v in values.items()}
    keep = max(1, math.floor(len(first) * keep_fraction))
    cutoff = sorted(first.values())[keep - 1]
    stopped = frozenset(tid for tid, v in first.items() if v > cutoff)
    alive = {tid: v[-1] for tid, v in values.items() if tid not in stopped}
    return stopped, min(alive, key=alive.get) if alive else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("experiment_dir", type=Path)
    p.add_argument("--blocks", type=int, default=128)
    p.add_argument("--sizes", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--resamples", type=int, default=2000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, help="where the re-runs and their reports go (default: EXP/decisions)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    exp = args.experiment_dir.resolve()
    out = (args.out or exp / "decisions").resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_saved_config(exp, relocate=True)
    reports, per_block_s = run_trials(exp, args.blocks, out)
    keep_fraction = 1 / cfg.search.reduction_factor
    losses = {tid: np.array([r[m.DOMAIN_BLOCK_LOSSES] for r in got], dtype=float) for tid, got in reports.items()}
    full = decisions({tid: list(np.exp(v.mean(axis=1))) for tid, v in losses.items()}, keep_fraction)
    print(f"\non all {args.blocks} blocks: ASHA stops {sorted(full[0]) or 'none'} at the first rung; pick {full[1]}")
    rng = np.random.default_rng(0)
    rows = []
    for n in args.sizes:
        stop_flips = pick_flips = 0
        for _ in range(args.resamples):
            idx = rng.integers(0, args.blocks, size=n)
            got = decisions({tid: list(np.exp(v[:, idx].mean(axis=1))) for tid, v in losses.items()}, keep_fraction)
            stop_flips += got[0] != full[0]
            pick_flips += got[1] != full[1]
        cost = n * per_block_s * (2 if cfg.data.general else 1)
        rows.append({"blocks": n, "stop_flip_rate": stop_flips / args.resamples,
                     "pick_flip_rate": pick_flips / args.resamples, "eval_seconds": cost})
        print(f"{n:4d} blocks: ASHA's stops differ in {stop_flips / args.resamples:6.1%} of resamples, the pick in "
              f"{pick_flips / args.resamples:6.1%}; one eval of both corpora ~{cost:.1f} s (one thread)")
    train_loss = decisions({tid: [r[m.TRAIN_LOSS] for r in got] for tid, got in reports.items()}, keep_fraction)
    print(f"smoothed train loss (train/loss) as the rung metric: stops {sorted(train_loss[0]) or 'none'}, pick "
          f"{train_loss[1]} ({'same' if train_loss == full else 'not the same'} decisions as {args.blocks} blocks; "
          "it mixes domain and general blocks in each trial's own mix, so it ranks mixes, not domain fit)")
    (out / "decisions.json").write_text(json.dumps({"blocks": args.blocks, "rows": rows, "full": [sorted(full[0]),
                                                   full[1]], "train_loss": [sorted(train_loss[0]), train_loss[1]],
                                                   "seconds_per_block": per_block_s}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
