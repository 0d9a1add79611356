"""Does the mixing law (raycpt.core.law) fitted on short runs predict long runs, and pick a better mix than the best
short run? A grid over train.mix_ratio x train.steps on the smoke model (tiny-gpt2, Rotten Tomatoes + news replay),
each run in this process through the core loop (`raycpt.core.train.train`, no Ray).

    RAYCPT_CACHE=/tmp/rc python benchmarks/bench_law.py --quick           # sanity check, ~2-3 min on 2 cores
    RAYCPT_CACHE=/tmp/rc python benchmarks/bench_law.py                   # the study, ~30 min on 2 cores
    python benchmarks/bench_law.py --mixes 0.1 0.3 0.5 0.7 0.9 1.0 --short-steps 24 48 --long-steps 384

What it does:
1. measures the base model once (held-out domain and general loss on the blocks every run uses);
2. runs every mix at every short length and at the long length (cosine schedule over each run's own length, as a
   sweep's trials do), keeping every evaluation report;
3. fits the law on the short runs' reports only (every report, like `raycpt analyze`), then predicts, at the long
   runs' token count, the domain and general ppl of every long run and the best mix under select.max_forgetting;
4. compares with the long runs actually observed: ppl errors per mix, and the mix each rule picks, the law's r*
   (taken at the nearest grid mix) against "the best short run's mix" (best domain ppl among the longest short runs
   within the forgetting bound), each scored by the observed long-run domain ppl and its regret against the best
   long run within the bound.

Read it as a check of the law's extrapolation on this machine's model and data, not as a general result: the
smoke model is a 2-layer GPT-2 with a seeded *random* init (its base ppl is ~51k), so its runs are training from
scratch, where losses fall far faster than the law's continued-pre-training forms allow; a pretrained model
(`--set model.source=packaged:smollm2-135m`, slower) is the meaningful study. With --quick the lengths are too short
for anything but a check that the script works end to end (a 216-step version of it took 5.4 min on 2 loaded
cores, and its law was off by ~3x on the long runs' ppl while still picking the right mix).
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from raycpt.core import law, metrics
from raycpt.core.config import load_config, with_overrides
from raycpt.core.prepare import measure_base, prepare_experiment
from raycpt.core.train import train

ROOT = Path(__file__).resolve().parents[1]
FULL = {"mixes": [0.2, 0.4, 0.6, 0.8, 0.9, 1.0], "short": [24, 48], "long": 384, "evals": 4}
QUICK = {"mixes": [0.3, 0.7, 1.0], "short": [6, 12], "long": 24, "evals": 3}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "experiments" / "smoke.yaml"))
    p.add_argument("--quick", action="store_true", help="3 mixes, short runs of 6 and 12 steps, long runs of 24")
    p.add_argument("--mixes", type=float, nargs="+", help="train.mix_ratio values")
    p.add_argument("--short-steps", type=int, nargs="+", help="lengths the law is fitted on")
    p.add_argument("--long-steps", type=int, help="held-out length the law predicts")
    p.add_argument("--evals", type=int, help="evaluation reports per run")
    p.add_argument("--lr", type=float, help="train.lr (default: the config's)")
    p.add_argument("--bootstrap", type=int, default=100, help="resamples for the interval on r*")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    args = p.parse_args(argv)
    preset = QUICK if args.quick else FULL
    args.mixes = args.mixes or preset["mixes"]
    args.short_steps = sorted(args.short_steps or preset["short"])
    args.long_steps = args.long_steps or preset["long"]
    args.evals = args.evals or preset["evals"]
    if args.long_steps <= max(args.short_steps):
        p.error("--long-steps must be longer than every --short-steps")
    return args


def run_one(cfg, manifest, out: Path, mix: float, steps: int, evals: int) -> list[dict[str, Any]]:
    """One run; every report's metrics (the loop evaluates every eval_every steps and at the last step)."""
    warmup = max(1, round(cfg.train.warmup_steps * steps / cfg.train.steps))
    run_cfg = with_overrides(cfg, {"train.mix_ratio": mix, "train.steps": steps, "train.warmup_steps": warmup,
                                   "train.eval_every": max(1, steps // evals)})
    reports: list[dict[str, Any]] = []

    def report(metrics_: dict[str, Any], checkpoint: str | None) -> None:
        reports.append(dict(metrics_))
        if checkpoint:  # the core loop keeps every checkpoint (Tune's manager prunes them in a sweep): ~1.5 GB each
            shutil.rmtree(checkpoint, ignore_errors=True)

    train(run_cfg, manifest, report, checkpoint_root=out / f"mix{mix:g}_steps{steps}")
    return reports


def feasible_best(results: dict[float, dict[str, Any]], bound: float) -> float:
    """The mix with the lowest domain loss among those within the general-loss bound (else the least forgetting)."""
    ok = {r: v for r, v in results.items() if v[metrics.GENERAL_LOSS] <= bound}
    if ok:
        return min(ok, key=lambda r: (ok[r][metrics.DOMAIN_LOSS], r))
    return min(results, key=lambda r: results[r][metrics.GENERAL_LOSS])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-law-") as tmp:
        overrides = [*args.set, f"storage_path={tmp}", "name=bench-law", "eval.task=", "search.space={}"]
        if args.lr:
            overrides.append(f"train.lr={args.lr}")
        cfg = load_config(args.config, overrides)
        if not cfg.data.general:
            raise SystemExit("the benchmark needs data.general (the law trades domain against general data)")
        manifest = prepare_experiment(cfg)
        exp_dir = cfg.experiment_dir()
        exp_dir.mkdir(parents=True, exist_ok=True)
        manifest.save(exp_dir)
        base = measure_base(cfg, manifest, exp_dir)
        base_general = base[metrics.base_name(metrics.GENERAL_LOSS)]
        bound = base_general + math.log1p(cfg.select.max_forgetting)
        tokens_per_step = cfg.train.global_batch() * cfg.data.block_size
        lengths = [*args.short_steps, args.long_steps]
        print(f"base model: domain ppl {math.exp(base[metrics.base_name(metrics.DOMAIN_LOSS)]):.1f}, general ppl "
              f"{math.exp(base_general):.1f}; bound general ppl {math.exp(bound):.1f} "
              f"(+{100 * cfg.select.max_forgetting:.0f}%); {tokens_per_step} tokens/step; lr {cfg.train.lr:g}")
        print(f"grid: mixes {args.mixes} x steps {lengths} ({len(args.mixes) * len(lengths)} runs, "
              f"{len(args.mixes) * sum(lengths)} steps)")

        runs: dict[tuple[float, int], list[dict[str, Any]]] = {}
        for steps in lengths:
            for mix in args.mixes:
                t0 = time.perf_counter()
                runs[mix, steps] = run_one(cfg, manifest, Path(tmp) / "runs", mix, steps, args.evals)
                last = runs[mix, steps][-1]
                print(f"  mix {mix:.2f} steps {steps:4d}: domain ppl {last[metrics.DOMAIN_PPL]:9.2f} general ppl "
                      f"{last[metrics.GENERAL_PPL]:9.2f}  ({time.perf_counter() - t0:.0f} s)", flush=True)

    observations = [law.Observation(f"mix{mix:g}_steps{steps}", mix, float(rep[metrics.TOKENS]),
                                    float(rep[metrics.DOMAIN_LOSS]), float(rep[metrics.GENERAL_LOSS]))
                    for (mix, steps), reports in runs.items() if steps != args.long_steps for rep in reports]
    long_tokens = float(args.long_steps * tokens_per_step)
    short_tokens = float(max(args.short_steps) * tokens_per_step)
    domain_fit, general_fit = law.fit_law(observations, "domain"), law.fit_law(observations, "general")
    summary = law.summarize_law(observations, sweep_tokens=short_tokens, target_tokens=long_tokens,
                                base_general_loss=base_general, max_forgetting=cfg.select.max_forgetting,
                                bootstrap=args.bootstrap)
    print(f"\nlaw fitted on {len(observations)} short-run reports: {summary.describe()}")
    print(f"domain law {domain_fit.form} {fmt_params(domain_fit.params)}; general law {general_fit.form} "
          f"{fmt_params(general_fit.params)}")

    print(f"\npredicted vs observed at the long runs' {long_tokens:,.0f} tokens ({args.long_steps} steps):")
    print(f"{'mix':>5} {'domain ppl pred':>15} {'obs':>9} {'err':>7}   {'general ppl pred':>15} {'obs':>9} {'err':>7}")
    long_final = {mix: runs[mix, args.long_steps][-1] for mix in args.mixes}
    errors = {"domain": [], "general": []}
    for mix in args.mixes:
        row = []
        for name, fit, metric in (("domain", domain_fit, metrics.DOMAIN_LOSS),
                                  ("general", general_fit, metrics.GENERAL_LOSS)):
            predicted, observed = math.exp(float(fit.predict(long_tokens, mix))), math.exp(long_final[mix][metric])
            errors[name].append(abs(predicted / observed - 1))
            row.append(f"{predicted:15.2f} {observed:9.2f} {100 * (predicted / observed - 1):+6.1f}%")
        print(f"{mix:5.2f} {row[0]}   {row[1]}")
    for name, errs in errors.items():
        print(f"{name} ppl: mean absolute error {100 * sum(errs) / len(errs):.1f}%, worst {100 * max(errs):.1f}%")

    long_best = feasible_best(long_final, bound)
    short_best = feasible_best({mix: runs[mix, max(args.short_steps)][-1] for mix in args.mixes}, bound)
    law_pick = min(args.mixes, key=lambda r: abs(r - summary.best_mix_ratio))
    oracle = math.exp(long_final[long_best][metrics.DOMAIN_LOSS])
    print(f"\nbest mix: observed at the long length {long_best:.2f} (domain ppl {oracle:.2f}, within the bound)")
    for label, pick in ((f"law r* {summary.best_mix_ratio:.2f} -> grid {law_pick:.2f}", law_pick),
                        (f"best short run ({max(args.short_steps)} steps)", short_best)):
        observed = long_final[pick]
        within = "within" if observed[metrics.GENERAL_LOSS] <= bound else "OVER"
        print(f"  {label:<34} mix {pick:.2f}: long-run domain ppl {math.exp(observed[metrics.DOMAIN_LOSS]):.2f} "
              f"(regret {100 * (math.exp(observed[metrics.DOMAIN_LOSS]) / oracle - 1):+.1f}%), general ppl "
              f"{math.exp(observed[metrics.GENERAL_LOSS]):.2f} ({within} the bound)")
    predicted_best = law.best_mix_ratio(domain_fit, general_fit, long_tokens, bound)
    print(f"  law's predicted domain ppl at r*: {math.exp(predicted_best.domain_loss):.2f}"
          f"{'' if predicted_best.feasible else ' (no mix meets the bound)'}")
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    return 0


def fmt_params(params: dict[str, float]) -> str:
    return "(" + ", ".join(f"{k}={v:.3g}" for k, v in params.items()) + ")"


if __name__ == "__main__":
    raise SystemExit(main())
