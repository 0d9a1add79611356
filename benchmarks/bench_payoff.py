"""Does a sweep pay off at equal compute? (issue 26's study). After a wsd sweep (`raycpt sweep CONFIG --set
train.schedule=wsd`, analysed as every sweep is), give every arm the same training tokens C = FACTOR x the sweep's
largest trial, and score each on the sweep's validation and test sets:

  (a1) sweep + continue the winner: the sweep's tokens, then the winner continued from its pre-decay checkpoint
       (`raycpt extend`: same optimizer state and data stream, the trial's lr and mix) to C in all;
  (a2) sweep + the recommendation: the sweep's tokens, then `final.yaml`'s run (the law's pick, or when the law
       cannot carry it the winner's settings with the lr scaled by the horizon rule) from the released weights, for
       the tokens the sweep left of C (its warmup scaled to that length);
  (b)  run_clm / HF Trainer defaults given C: lr 5e-5, no warmup, linear decay to 0 (wsd with decay_fraction 1 and
       a linear shape is exactly that), no weight decay, no dropout, domain data only, HF's AdamW (0.9, 0.999, 1e-8);
  (c)  Ibrahim et al. 2024's recipe given C: re-warm to 3e-4 (their max lr: they re-warm to the pre-training peak,
       which SmolLM2's files do not record) over 1% of the steps, cosine re-decay to 0.1 x that, 5% replay, weight
       decay 0.1, AdamW (0.9, 0.95).

Every arm is compared with (b) and (c) as *paired* differences on the same blocks and texts (95% intervals), and the
sweep's CPT law (its fit, refused or not) predicts every arm's final validation loss: (a1) and (a2) are the runs the
product prints a prediction for when the law passes its checks; (b) and (c) are held-out longer runs at other lrs.
Runs in this process, no Ray; re-running resumes finished arms from their checkpoints (only scoring is repeated).

    RAYCPT_CACHE=... python benchmarks/bench_payoff.py runs/laptop --factor 10 --out benchmarks/study/laptop.json

The protocol (arms, their settings, C = 10x, the two corpora: the laptop demo and benchmarks/study/bundestag.yaml)
was written down before the first run.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raycpt.core import metrics as m
from raycpt.core.config import ExperimentConfig, config_from_dict, load_config, load_saved_config, to_dict
from raycpt.core.extend import extend_local, plan_extension
from raycpt.core.files import read_json
from raycpt.core.forecast import cpt_law
from raycpt.core.model.loading import load_model
from raycpt.core.prepare import Manifest, measure_base, score_model
from raycpt.core.train.checkpoint import keeping_newest_checkpoint
from raycpt.core.train.loop import train
from raycpt.results.compare import paired_lifts
from raycpt.results.suggest import FINAL_FILE
from raycpt.results.summary import SUMMARY_FILE

RUN_CLM = {"lr": 5e-5, "warmup_steps": 0, "schedule": "wsd", "decay_fraction": 1.0, "decay_shape": "linear",
           "min_lr_ratio": 0.0, "weight_decay": 0.0, "dropout": 0.0, "mix_ratio": 1.0, "adam_beta1": 0.9,
           "adam_beta2": 0.999, "adam_eps": 1e-8}
"""transformers' run_clm.py / TrainingArguments defaults in raycpt's train fields."""
IBRAHIM_LR = 3e-4
CONTINUE, RECOMMEND, CLM, IBRAHIM = ("a1 sweep + continue winner", "a2 sweep + recommendation",
                                     "b  run_clm defaults", "c  Ibrahim recipe")
VAL, TEST = m.EVAL_PREFIX, m.TEST_PREFIX
PAIRED = "paired/"


def ibrahim(steps: int) -> dict[str, Any]:
    return {"lr": IBRAHIM_LR, "warmup_steps": max(1, round(0.01 * steps)), "schedule": "cosine",
            "min_lr_ratio": 0.1, "mix_ratio": 0.95, "weight_decay": 0.1, "dropout": 0.0, "adam_beta1": 0.9,
            "adam_beta2": 0.95, "adam_eps": 1e-8}


def arm_config(sweep_cfg: ExperimentConfig, exp: Path, name: str, steps: int, train_fields: dict[str, Any],
               eval_every: int) -> ExperimentConfig:
    """One run of `steps` from the released weights: the sweep's config, no search space, `train_fields` set."""
    raw = to_dict(sweep_cfg)
    raw["search"] = {**raw["search"], "space": {}}
    raw["train"] = {**raw["train"], **train_fields, "steps": steps, "tokens": 0, "eval_every": eval_every,
                    "early_stopping_patience": 0}
    raw["name"], raw["storage_path"] = name, str(exp / "study")
    return config_from_dict(raw)


def run_schedule(cfg: ExperimentConfig) -> cpt_law.RunSchedule:
    t = cfg.train
    return cpt_law.RunSchedule(t.lr, t.total_steps(cfg.data.block_size), t.warmup_steps, t.schedule,
                               t.decay_fraction, t.decay_shape, t.min_lr_ratio)


def train_arm(cfg: ExperimentConfig, manifest: Manifest) -> tuple[str, list[dict[str, Any]]]:
    """Train (or find trained) one arm: its last checkpoint and its eval reports."""
    out = cfg.experiment_dir() / "run"
    done = sorted(out.glob("checkpoint_*")) if out.exists() else []
    log = cfg.experiment_dir() / "reports.jsonl"
    if done and log.is_file():
        reports = [json.loads(line) for line in log.read_text().splitlines()]
        if reports and reports[-1][m.STEP] == cfg.train.total_steps(cfg.data.block_size):
            return str(done[-1]), reports
    reports, holder = [], {}

    def report(metrics: dict[str, Any], checkpoint: str | None) -> None:
        reports.append({k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) or v is None})
        holder["checkpoint"] = checkpoint
        print(f"    step {metrics[m.STEP]}: domain ppl {metrics[m.DOMAIN_PPL]:.2f}, general ppl "
              f"{metrics[m.GENERAL_PPL]:.2f}, lr {metrics[m.LR]:.3g}", flush=True)

    out.mkdir(parents=True, exist_ok=True)
    train(cfg, manifest, keeping_newest_checkpoint(report), checkpoint_root=out)
    log.write_text("".join(json.dumps(r) + "\n" for r in reports))
    return holder["checkpoint"], reports


def law_on(fits: dict[str, cpt_law.CptLawFit], run: cpt_law.RunSchedule, mix: float, cfg: ExperimentConfig,
           reports: list[dict[str, Any]], final: dict[str, Any]) -> dict[str, Any]:
    """The sweep's law on one arm: its final validation losses predicted (whether or not the product would print
    them: `verdict` says), the errors against the observed, and the mean error over the arm's evals."""
    _, verdict = cpt_law.predict_run(fits, run, mix, max_loo_error=cfg.law.max_loo_error,
                                     max_extrapolation=cfg.law.max_extrapolation)
    s1, _ = cpt_law.areas(run.lrs())
    out: dict[str, Any] = {"verdict": verdict, "reach": float(s1[-1]) / fits["domain"].max_s1}
    for name, fit in fits.items():
        curve = fit.curve(run, mix)
        observed = final[VAL + f"{name}_loss"]
        out[name] = {"predicted": float(curve[-1]), "observed": observed,
                     "error": float(curve[-1] / observed - 1), "loo_error": fit.loo_error}
        along = [(float(curve[r[m.STEP]]), r[VAL + f"{name}_loss"]) for r in reports if r.get(VAL + f"{name}_loss")]
        if along:
            out[name]["curve_error"] = float(np.mean([abs(p / o - 1) for p, o in along]))
    return out


def cell(row: dict[str, Any], name: str, digits: int = 2) -> str:
    value = row.get(name)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    low, high = row.get(name + m.CI_LOW), row.get(name + m.CI_HIGH)
    return f"{value:.{digits}f}" + (f" [{low:.{digits}f}, {high:.{digits}f}]" if low is not None else "")


def paired(rows: dict[str, dict[str, Any]], arm: str, reference: str, manifest: Manifest) -> dict[str, Any]:
    """arm vs reference on the same blocks and texts, per split: ppl ratio - 1 and F1 difference, 95% intervals."""
    task, out = manifest.task, {}
    for split, prefix, labels in (("val", VAL, task.val_labels if task else None),
                                  ("test", TEST, task.test_labels if task else None)):
        lifts = paired_lifts(rows[arm], rows[reference], row_prefix=prefix, reference_prefix=prefix,
                             out_prefix=PAIRED, labels=labels, classes=task.classes if task else None,
                             block_size=manifest.block_size)
        out[split] = {k.removeprefix(PAIRED): v for k, v in lifts.items()}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("experiment_dir", type=Path)
    p.add_argument("--factor", type=float, default=10.0, help="C = factor x the sweep's largest trial's tokens")
    p.add_argument("--evals", type=int, default=8, help="evals along each arm (the law's curve check)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", type=Path, help="write the study's numbers here as JSON")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    exp = args.experiment_dir.resolve()
    started = time.perf_counter()
    sweep_cfg = load_saved_config(exp, relocate=True)
    summary = read_json(exp / SUMMARY_FILE)
    manifest = Manifest.load(exp)
    per_step = sweep_cfg.train.global_batch() * sweep_cfg.data.block_size
    sweep_tokens = int(summary["compute"]["compute.tokens_trained"])
    largest = max(int(t.get(m.TOKENS) or 0) for t in summary["trials"])
    steps = math.ceil(args.factor * largest / per_step)
    budget = steps * per_step
    eval_every = max(1, steps // args.evals)
    fits = {name: cpt_law.CptLawFit.from_dict(raw)
            for name, raw in ((summary.get("recommendation") or {}).get("fits") or {}).items()}

    ext_tokens = budget - sweep_tokens
    winner_row = next(t for t in summary["trials"] if t["trial_id"] == summary["winner"])
    plan = plan_extension(exp, budget)  # to learn the winner's pre-decay point
    ext = plan_extension(exp, ext_tokens + plan.tokens_at_checkpoint, None, [f"train.eval_every={eval_every}"])
    final_cfg = load_config(exp / FINAL_FILE, [f"storage_path={exp / 'study'}"])
    rec_steps = (budget - sweep_tokens) // per_step
    print(f"C = {args.factor:g} x {largest:,} tokens = {steps} steps x {per_step} = {budget:,} tokens; the sweep "
          f"trained {sweep_tokens:,} (winner {summary['winner']}, {winner_row[m.TOKENS]:,} tokens)", flush=True)
    arms = {
        CONTINUE: (ext.cfg, ext.tokens - ext.tokens_at_checkpoint + sweep_tokens),
        RECOMMEND: (arm_config(final_cfg, exp, "study-recommendation", rec_steps,
                               {"warmup_steps": round(final_cfg.train.warmup_steps * rec_steps
                                                      / final_cfg.train.total_steps(final_cfg.data.block_size))},
                               max(1, rec_steps // args.evals)), sweep_tokens + rec_steps * per_step),
        CLM: (arm_config(sweep_cfg, exp, "study-run-clm", steps, RUN_CLM, eval_every), budget),
        IBRAHIM: (arm_config(sweep_cfg, exp, "study-ibrahim", steps, ibrahim(steps), eval_every), budget),
    }
    base = measure_base(sweep_cfg, manifest, exp)
    rows: dict[str, dict[str, Any]] = {"base model": {
        k.replace(m.BASE_PREFIX, VAL, 1).replace(VAL + TEST, TEST, 1): v for k, v in base.items()}}
    study: dict[str, Any] = {"experiment_dir": str(exp), "budget_tokens": budget, "sweep_tokens": sweep_tokens,
                             "largest_trial_tokens": largest, "factor": args.factor, "arms": {}}
    for name, (cfg, tokens) in arms.items():
        t = cfg.train
        print(f"\n{name}: lr {t.lr:.3g}, {t.schedule}, mix {t.mix_ratio:.3f}, {t.total_steps(cfg.data.block_size)} "
              f"steps; {tokens:,} training tokens in all", flush=True)
        arm_start = time.perf_counter()
        if name == CONTINUE:
            result = extend_local(ext, lambda line: print("    " + line, flush=True))
            checkpoint, reports = result.checkpoint, []
        else:
            checkpoint, reports = train_arm(cfg, manifest)
        rows[name] = score_model(load_model(checkpoint, cfg.model.dtype).eval(), cfg, manifest,
                                 prefixes={"val": VAL, "test": TEST})
        seconds = time.perf_counter() - arm_start
        law = law_on(fits, run_schedule(cfg), t.mix_ratio, cfg, reports, rows[name]) if fits else None
        study["arms"][name] = {"tokens": tokens, "seconds": seconds, "lr": t.lr, "schedule": t.schedule,
                               "mix_ratio": t.mix_ratio, "steps": t.total_steps(cfg.data.block_size), "law": law,
                               "scores": {k: v for k, v in rows[name].items() if isinstance(v, (int, float))}}
        print(f"  trained and scored in {seconds:.0f} s", flush=True)

    print(f"\n{'':28s} {'split':5s} {'domain ppl':>24s} {'general ppl':>24s} {'F1':>24s}")
    for split, prefix in (("val", VAL), ("test", TEST)):
        for name, row in rows.items():
            print(f"{name:28s} {split:5s} {cell(row, prefix + 'domain_ppl'):>24s} "
                  f"{cell(row, prefix + 'general_ppl'):>24s} {cell(row, prefix + 'f1', 3):>24s}")
    base_general = rows["base model"].get(TEST + "general_ppl")
    bound = 1 + sweep_cfg.select.max_forgetting
    print(f"\nforgetting bound: test general ppl <= {bound:.2f} x base ({base_general:.2f} -> "
          f"{bound * base_general:.2f})")
    for reference in (CLM, IBRAHIM):
        print(f"\npaired vs {reference.strip()!r} (same blocks and texts; * = the 95% interval excludes 0)")
        for name in (n for n in arms if n != reference):
            pairs = paired(rows, name, reference, manifest)
            study["arms"][name][f"vs {reference}"] = pairs
            for split, got in pairs.items():
                print(f"  {name:28s} {split:5s} {paired_cells(got)}")
    if fits:
        print("\nthe sweep's CPT law on each arm (final validation loss, nats; error = predicted / observed - 1)")
        for name, arm in study["arms"].items():
            law = arm["law"]
            print(f"  {name:28s} reach {law['reach']:.1f}x: " + "; ".join(
                f"{target} {law[target]['predicted']:.3f} vs {law[target]['observed']:.3f} "
                f"({law[target]['error']:+.1%}" + (f", along the curve {law[target]['curve_error']:.1%}"
                                                    if "curve_error" in law[target] else "") + ")"
                for target in ("domain", "general") if target in law) + f"  [product: {law['verdict']}]")
    write_study(study, rows, started, args.out)
    return 0


def paired_cells(got: dict[str, float]) -> str:
    """Paired differences (domain ppl, general ppl relative; F1 absolute) with their 95% intervals, one line;
    * marks an interval that excludes 0."""
    cells = []
    for metric, relative in (("domain_ppl", True), ("general_ppl", True), ("f1", False)):
        if metric not in got:
            cells.append("-")
            continue
        v, lo, hi = got[metric], got[metric + m.CI_LOW], got[metric + m.CI_HIGH]
        star = "*" if lo > 0 or hi < 0 else " "
        cells.append(f"{v:+.1%} [{lo:+.1%}, {hi:+.1%}]{star}" if relative else f"{v:+.3f} [{lo:+.3f}, {hi:+.3f}]{star}")
    return " ".join(f"{c:>26s}" for c in cells)


def write_study(study: dict[str, Any], rows: dict[str, dict[str, Any]], started: float, out: Path | None) -> None:
    """The study's numbers (every arm's scores, the wall time) as JSON at `out`, when given."""
    study["rows"] = {name: {k: v for k, v in row.items() if isinstance(v, (int, float))} for name, row in rows.items()}
    study["seconds"] = time.perf_counter() - started
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(study, indent=1, default=str))


if __name__ == "__main__":
    raise SystemExit(main())
