"""Probe F1 and prompted F1 side by side, for the base model and a sweep's winner, and what each costs a trial
(issue 27).

Every finished trial scores its downstream task once, at its end, on the validation texts: `eval.method probe`
(frozen features of probe-train and validation texts, a logistic-regression probe), `prompt` (each label word's
log-likelihood after `eval.shots` demonstrations and the text) or `both`. This script times the two on the same
model and texts, in this process (one thread by default, like a laptop trial), alternating which goes first each
round, and reports the median; then scores both methods once more on validation and test (untimed) for each model,
so a reader sees which score moved between the base model and the winner.

    python benchmarks/bench_downstream_cost.py experiments/laptop.yaml --models packaged:smollm2-135m runs/laptop/export
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch

from raycpt.core import metrics as m
from raycpt.core.config import load_config
from raycpt.core.eval.evaluate import f1_metrics
from raycpt.core.eval.prompting import prompt_spec
from raycpt.core.model.loading import load_model
from raycpt.core.prepare import prepare_experiment


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", type=Path)
    p.add_argument("--models", nargs="+", required=True, help="model sources: the base first, then exports")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--set", action="append", default=[], help="config overrides, as for raycpt")
    p.add_argument("--out", type=Path, help="write the numbers here as JSON")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.set)
    manifest = prepare_experiment(cfg)
    task = manifest.task
    if task is None:
        raise SystemExit(f"{args.config}: no eval.task to score")
    e = cfg.eval
    spec = prompt_spec(dataclasses.replace(e, method="prompt"))
    common = dict(seeds=e.seeds, seed=e.seed, max_length=e.max_length, device="cpu",
                  trust_remote_code=cfg.model.trust_remote_code)
    print(f"{len(task.train_texts)} probe-train, {len(task.val_texts)} validation, {len(task.test_texts)} test texts; "
          f"prompt: {e.shots} shots, template {e.template!r}; {args.threads} thread(s), {args.rounds} rounds",
          flush=True)
    results = {}
    for source in args.models:
        model = load_model(source, cfg.model.dtype, cfg.model.trust_remote_code).eval()
        seconds: dict[str, list[float]] = {"probe": [], "prompt": []}
        for r in range(args.rounds):
            for method in (("probe", "prompt") if r % 2 == 0 else ("prompt", "probe")):
                start = time.perf_counter()
                f1_metrics(model, cfg.model.source, task, method=method, prompt=spec, **common)
                seconds[method].append(time.perf_counter() - start)
        scores = f1_metrics(model, cfg.model.source, task, method="both", prompt=spec,
                            prefixes={"val": m.EVAL_PREFIX, "test": m.TEST_PREFIX}, **common)
        row = {"seconds": seconds, "median_s": {k: statistics.median(v) for k, v in seconds.items()}}
        for prefix in (m.EVAL_PREFIX, m.TEST_PREFIX):
            for metric in (m.F1, m.PROMPT_F1):
                name = prefix + metric.removeprefix(m.EVAL_PREFIX)
                row[name] = [scores[name], scores[name + m.CI_LOW], scores[name + m.CI_HIGH]]
        results[source] = row
        timing = {k: f"{row['median_s'][k]:.1f} s (rounds {', '.join(f'{s:.1f}' for s in v)})"
                  for k, v in seconds.items()}
        print(f"\n{source}: probe {timing['probe']}, prompt {timing['prompt']}")
        for prefix in (m.EVAL_PREFIX, m.TEST_PREFIX):
            cells = []
            for metric in (m.F1, m.PROMPT_F1):
                v, lo, hi = row[prefix + metric.removeprefix(m.EVAL_PREFIX)]
                cells.append(f"{metric.removeprefix(m.EVAL_PREFIX)} {v:.3f} [{lo:.3f}, {hi:.3f}]")
            print(f"  {prefix.rstrip('/'):5s} " + "   ".join(cells), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
