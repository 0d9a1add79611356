"""Does a sweep pay off at equal compute? After `raycpt sweep CONFIG` and `raycpt analyze DIR --suggest`, compare:

- sweep + final: the sweep's exported winner and the `final.yaml` run (the law's best mix and the best lr region's
  lr at law.target_tokens), i.e. the sweep's tokens plus the final run's;
- run_clm defaults given the same total compute: one run with lr 5e-5, no warmup, decay to 0, no weight decay, no
  dropout, domain data only (mix 1.0) and HF's AdamW (betas (0.9, 0.999), eps 1e-8; raycpt's loop uses (0.9, 0.95)),
  for as many tokens as the sweep and the final run trained together;

each scored on the sweep's validation and test sets (domain and general ppl with 95% bootstrap intervals, probe F1
with its interval), beside the base model and the sweep's exported winner; then every arm against the run_clm arm
as *paired* differences on the same blocks and texts (`raycpt.results.compare.paired_lifts`: ppl ratio - 1 and F1
difference with 95% intervals; two overlapping unpaired intervals say nothing about the difference). Runs in this
process (no Ray).

    RAYCPT_CACHE=/tmp/rc python benchmarks/bench_payoff.py runs/laptop        # after the sweep and --suggest

Differences from run_clm kept on purpose: raycpt's loop schedules a cosine (to 0 here) where run_clm's default is a
linear decay, and both sides see the same packed blocks and batch size.

The run_clm arm gets HF's AdamW through the config (`train.adam_beta2=0.999`, `train.adam_eps=1e-8`).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

from raycpt.core import metrics
from raycpt.core.checkpoint import keeping_newest_checkpoint
from raycpt.core.config import load_config, load_saved_config, with_overrides
from raycpt.core.files import read_json
from raycpt.core.models import load_model
from raycpt.core.prepare import Manifest, measure_base, score_model
from raycpt.core.train import train
from raycpt.results.compare import paired_lifts
from raycpt.results.export import EXPORT_DIR
from raycpt.results.suggest import FINAL_FILE
from raycpt.results.summary import SUMMARY_FILE, Summary

RUN_CLM = {"train.lr": 5e-5, "train.warmup_steps": 0, "train.min_lr_ratio": 0.0, "train.weight_decay": 0.0,
           "train.dropout": 0.0, "train.mix_ratio": 1.0, "train.schedule": "cosine", "train.adam_beta1": 0.9,
           "train.adam_beta2": 0.999, "train.adam_eps": 1e-8}
"""transformers' run_clm.py / TrainingArguments defaults, in raycpt's fields (AdamW betas and eps included)."""
PAIRED_PREFIX = "paired/"
CLM_ARM = "run_clm defaults, same compute"


def run_and_score(cfg, manifest: Manifest, out: Path) -> tuple[dict[str, Any], float]:
    """Train `cfg` in this process, then score the final weights on validation and test."""
    start = time.perf_counter()
    holder: dict[str, Any] = {}
    train(cfg, manifest, keeping_newest_checkpoint(lambda _metrics, ckpt: holder.update(checkpoint=ckpt)),
          checkpoint_root=out)
    seconds = time.perf_counter() - start
    model = load_model(holder["checkpoint"], cfg.model.dtype)
    return score(model, cfg, manifest), seconds


def score(model, cfg, manifest: Manifest) -> dict[str, Any]:
    prefixes = {"val": metrics.EVAL_PREFIX, "test": metrics.TEST_PREFIX}
    return score_model(model.eval(), cfg, manifest, prefixes=prefixes)


def cell(row: dict[str, Any], name: str, digits: int = 2) -> str:
    value = row.get(name)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    low, high = row.get(name + metrics.CI_LOW), row.get(name + metrics.CI_HIGH)
    interval = f" [{low:.{digits}f}, {high:.{digits}f}]" if low is not None and high is not None else ""
    return f"{value:.{digits}f}{interval}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("experiment_dir", type=Path)
    args = p.parse_args(argv)
    exp = args.experiment_dir
    sweep_cfg = load_saved_config(exp)
    summary = Summary.from_dict(read_json(exp / SUMMARY_FILE))
    manifest = Manifest.load(exp)
    final_cfg = load_config(exp / FINAL_FILE, [f"storage_path={exp / 'payoff'}"])
    tokens_per_step = final_cfg.train.global_batch() * final_cfg.data.block_size
    sweep_tokens = int(summary.compute["compute.tokens_trained"])
    final_tokens = final_cfg.train.total_steps(final_cfg.data.block_size) * tokens_per_step
    clm_steps = math.ceil((sweep_tokens + final_tokens) / tokens_per_step)
    clm_cfg = with_overrides(final_cfg, {**RUN_CLM, "train.steps": clm_steps, "train.tokens": 0,
                                         "train.eval_every": clm_steps, "name": final_cfg.name + "-run-clm"})
    print(f"budget: sweep {sweep_tokens:,} tokens + final {final_tokens:,} = {sweep_tokens + final_tokens:,}; "
          f"run_clm defaults: {clm_steps} steps x {tokens_per_step} tokens = {clm_steps * tokens_per_step:,}")
    print(f"final.yaml: lr {final_cfg.train.lr:.3g}, mix {final_cfg.train.mix_ratio:.3f}, "
          f"{final_cfg.train.total_steps(final_cfg.data.block_size)} steps", flush=True)

    rows: dict[str, dict[str, Any]] = {}
    base = measure_base(sweep_cfg, manifest, exp)
    rows["base model"] = {k.replace(metrics.BASE_PREFIX, metrics.EVAL_PREFIX, 1).replace(
        metrics.EVAL_PREFIX + metrics.TEST_PREFIX, metrics.TEST_PREFIX, 1): v for k, v in base.items()}
    rows["sweep winner (export)"] = score(load_model(str(exp / EXPORT_DIR), sweep_cfg.model.dtype), sweep_cfg,
                                          manifest)
    times = {}
    for name, cfg in (("sweep + final.yaml", final_cfg), (CLM_ARM, clm_cfg)):
        rows[name], times[name] = run_and_score(cfg, manifest, exp / "payoff" / cfg.name)
        print(f"  {name}: trained and scored in {times[name]:.0f} s", flush=True)

    print(f"\n{'':32s} {'split':5s} {'domain ppl':>24s} {'general ppl':>24s} {'F1':>24s}")
    for split, prefix in (("val", metrics.EVAL_PREFIX), ("test", metrics.TEST_PREFIX)):
        for name, row in rows.items():
            names = [prefix + n.removeprefix(metrics.EVAL_PREFIX) for n in (metrics.DOMAIN_PPL, metrics.GENERAL_PPL,
                                                                              metrics.F1)]
            print(f"{name:32s} {split:5s} {cell(row, names[0]):>24s} {cell(row, names[1]):>24s} "
                  f"{cell(row, names[2], 3):>24s}")
    print_paired(rows, manifest)
    return 0


def print_paired(rows: dict[str, dict[str, Any]], manifest: Manifest) -> None:
    """Every other arm against the run_clm arm on the same blocks and texts: ppl(arm) / ppl(run_clm) - 1 and
    F1(arm) - F1(run_clm), each with its paired 95% bootstrap interval."""
    task = manifest.task
    print(f"\npaired vs {CLM_ARM!r} (same blocks and texts; * = the 95% interval excludes 0)")
    print(f"{'':32s} {'split':5s} {'domain ppl':>26s} {'general ppl':>26s} {'F1':>26s}")
    for split, prefix, labels in (("val", metrics.EVAL_PREFIX, task.val_labels if task else None),
                                  ("test", metrics.TEST_PREFIX, task.test_labels if task else None)):
        for name, row in rows.items():
            if name == CLM_ARM:
                continue
            lifts = paired_lifts(row, rows[CLM_ARM], row_prefix=prefix, reference_prefix=prefix,
                                 out_prefix=PAIRED_PREFIX, labels=labels, classes=task.classes if task else None,
                                 block_size=manifest.block_size)
            cells = []
            for metric, relative in ((metrics.DOMAIN_PPL, True), (metrics.GENERAL_PPL, True), (metrics.F1, False)):
                key = PAIRED_PREFIX + metric.removeprefix(metrics.EVAL_PREFIX)
                if key not in lifts:
                    cells.append("-")
                    continue
                value, low, high = lifts[key], lifts[key + metrics.CI_LOW], lifts[key + metrics.CI_HIGH]
                star = "*" if low > 0 or high < 0 else " "
                cells.append(f"{value:+.1%} [{low:+.1%}, {high:+.1%}]{star}" if relative
                             else f"{value:+.3f} [{low:+.3f}, {high:+.3f}]{star}")
            print(f"{name:32s} {split:5s} " + " ".join(f"{c:>26s}" for c in cells))


if __name__ == "__main__":
    raise SystemExit(main())
