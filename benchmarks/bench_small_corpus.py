"""Small domain corpora (issue 29's study): does synthetic rewriting (`raycpt augment`, `train.synthetic_ratio`)
help domain perplexity and the downstream score, and does distillation from the base model
(`train.distill_weight`) hold general perplexity, at equal training tokens?

A small domain corpus is cut from a config's domain source (`--docs` documents, a seeded sample; held-out and
downstream validation / test texts are dropped by the data step as always), rewritten once by the generator
(augment: `--styles`, one copy each, `--new-tokens` at most; its wall time and generated tokens are the cost), and
then trained on in three arms with the same steps, batch and mix ratio, each from the released weights:

  (real)       the small corpus alone on the domain side (synthetic_ratio 0, distill_weight 0): the reference;
  (synthetic)  half of the domain side drawn from the rewrites (synthetic_ratio 0.5);
  (distill)    the real corpus, with distill_weight `--distill` on the general replay rows.

Each arm's last checkpoint is scored on the validation and test sets (domain ppl, general ppl, downstream F1) and
compared with (real) as paired differences on the same blocks and texts (95% intervals). Runs in this process, no
Ray; a rerun resumes the augment job per unit and skips arms already trained (only scoring is repeated).

    python benchmarks/bench_small_corpus.py experiments/laptop.yaml --out benchmarks/study/small_corpus.json
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

import torch
from bench_payoff import PAIRED, TEST, VAL, cell, paired_cells, train_arm, write_study

from raycpt.core import metrics as m
from raycpt.core.augment import augment_corpus
from raycpt.core.config import ExperimentConfig, config_from_dict, load_config, to_dict
from raycpt.core.data.sources import load_documents
from raycpt.core.model.loading import load_model
from raycpt.core.prepare import Manifest, measure_base, prepare_experiment, score_model
from raycpt.results.compare import paired_lifts

REAL, SYNTHETIC, DISTILL = "real", "synthetic", "distill"


def small_corpus(cfg: ExperimentConfig, docs: int, seed: int, path: Path) -> int:
    """`docs` documents of the config's domain source, a seeded sample, as a jsonl file; returns how many."""
    d = cfg.data
    texts = [t for t in load_documents(d.domain, d.text_field, "data.domain", txt_unit=d.txt_unit)[d.text_field]
             if t and t.strip()]
    chosen = random.Random(seed).sample(texts, min(docs, len(texts)))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in chosen))
    return len(chosen)


def arm_cfg(raw: dict[str, Any], name: str, train: dict[str, Any], data: dict[str, Any] | None = None
            ) -> ExperimentConfig:
    raw = json.loads(json.dumps(raw))
    raw["name"] = name
    raw["train"].update(train)
    raw["data"].update(data or {})
    return config_from_dict(raw)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", type=Path)
    p.add_argument("--storage", type=Path, default=Path("runs/small-corpus"))
    p.add_argument("--docs", type=int, default=600, help="documents in the small domain corpus")
    p.add_argument("--steps", type=int, default=48, help="training steps of every arm")
    p.add_argument("--styles", nargs="+", default=["paraphrase"])
    p.add_argument("--new-tokens", type=int, default=64, help="augment.max_new_tokens")
    p.add_argument("--distill", type=float, default=1.0, help="the distill arm's train.distill_weight")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", type=Path, help="write the study's numbers here as JSON")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    storage = args.storage.resolve()
    cfg = load_config(args.config, [f"storage_path={storage}"])
    corpus = storage / "small-domain.jsonl"
    n_docs = small_corpus(cfg, args.docs, args.seed, corpus)

    raw = to_dict(cfg)
    raw["search"] = {**raw["search"], "space": {}}
    # a small corpus: a larger held-out share so the validation and test blocks exist; small read units so the
    # augment job resumes in pieces
    raw["data"].update({"domain": str(corpus), "heldout_fraction": 0.25, "unit_mb": 0.02, "max_tokens": 0})
    raw["train"].update({"steps": args.steps, "tokens": 0, "eval_every": max(1, args.steps // 4),
                         "early_stopping_patience": 0})
    raw["augment"] = {**raw.get("augment", {}), "styles": args.styles, "copies": 1,
                      "max_new_tokens": args.new_tokens, "seed": args.seed}
    real_cfg = arm_cfg(raw, "small-real", {"synthetic_ratio": 0.0, "distill_weight": 0.0})
    manifest = prepare_experiment(real_cfg)
    exp = real_cfg.experiment_dir()
    exp.mkdir(parents=True, exist_ok=True)
    manifest.save(exp)
    print(f"small corpus: {n_docs} documents, {manifest.domain.train_tokens:,} training tokens "
          f"({manifest.domain.train_tokens // real_cfg.data.block_size} blocks)", flush=True)

    aug_start = time.perf_counter()
    augmented = augment_corpus(real_cfg, manifest=manifest)
    aug_seconds = time.perf_counter() - aug_start
    texts_dir = str(exp / "augment" / "texts")
    aug = augmented.to_dict()
    print(f"augment: {augmented.texts} rewrites, {augmented.tokens} generated tokens, {aug_seconds:.0f} s this run "
          f"({augmented.resumed_units} unit(s) done by an earlier run)", flush=True)

    arms = {
        REAL: real_cfg,
        SYNTHETIC: arm_cfg(raw, "small-synthetic", {"synthetic_ratio": 0.5, "distill_weight": 0.0},
                           {"synthetic": texts_dir}),
        DISTILL: arm_cfg(raw, "small-distill", {"synthetic_ratio": 0.0, "distill_weight": args.distill}),
    }
    base = measure_base(real_cfg, manifest, exp)
    rows: dict[str, dict[str, Any]] = {"base model": {
        k.replace(m.BASE_PREFIX, VAL, 1).replace(VAL + TEST, TEST, 1): v for k, v in base.items()}}
    manifests: dict[str, Manifest] = {}
    study: dict[str, Any] = {"docs": n_docs, "domain_train_tokens": manifest.domain.train_tokens,
                             "steps": args.steps, "augment": aug, "augment_seconds_this_run": aug_seconds,
                             "arms": {}}
    for name, arm in arms.items():
        t = arm.train
        print(f"\n{name}: synthetic_ratio {t.synthetic_ratio}, distill_weight {t.distill_weight}, lr {t.lr:.3g}, "
              f"mix {t.mix_ratio}, {args.steps} steps", flush=True)
        arm_start = time.perf_counter()
        manifests[name] = prepare_experiment(arm)
        checkpoint, reports = train_arm(arm, manifests[name])
        rows[name] = score_model(load_model(checkpoint, arm.model.dtype).eval(), arm, manifests[name],
                                 prefixes={"val": VAL, "test": TEST})
        last = reports[-1] if reports else {}
        study["arms"][name] = {"seconds": time.perf_counter() - arm_start,
                               "synthetic_fraction": last.get("data/synthetic_fraction"),
                               "domain_fraction": last.get(m.DOMAIN_FRACTION),
                               "distill_kl": last.get(m.DISTILL_KL),
                               "scores": {k: v for k, v in rows[name].items() if isinstance(v, (int, float))}}

    print(f"\n{'':12s} {'split':5s} {'domain ppl':>24s} {'general ppl':>24s} {'F1':>24s}")
    for split, prefix in (("val", VAL), ("test", TEST)):
        for name, row in rows.items():
            print(f"{name:12s} {split:5s} {cell(row, prefix + 'domain_ppl'):>24s} "
                  f"{cell(row, prefix + 'general_ppl'):>24s} {cell(row, prefix + 'f1', 3):>24s}")
    task = manifest.task
    print(f"\npaired vs {REAL!r} (same blocks and texts; * = the 95% interval excludes 0)")
    for name in (SYNTHETIC, DISTILL):
        study["arms"][name]["vs real"] = {}
        for split, prefix, labels in (("val", VAL, task.val_labels if task else None),
                                      ("test", TEST, task.test_labels if task else None)):
            lifts = paired_lifts(rows[name], rows[REAL], row_prefix=prefix, reference_prefix=prefix,
                                 out_prefix=PAIRED, labels=labels, classes=task.classes if task else None,
                                 block_size=manifest.block_size)
            got = {k.removeprefix(PAIRED): v for k, v in lifts.items()}
            study["arms"][name]["vs real"][split] = got
            print(f"  {name:12s} {split:5s} {paired_cells(got)}")
    write_study(study, rows, started, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
