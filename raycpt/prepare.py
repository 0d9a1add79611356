"""Everything fixed before any trial starts, without Ray: model and corpora fetched, data packed, the downstream
task split, held-out sets chosen, and the base model measured once on them.

The result is the data manifest (paths of memory-mapped blocks + statistics) that every trial reads, and
`base_metrics.json`, the reference for every trial's lift and forgetting.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch

from raycpt.config import ExperimentConfig
from raycpt.data import load_blocks, load_task, prepare_corpus, tokenizer_fingerprint
from raycpt.errors import InputError
from raycpt.evaluate import heldout_loss, perplexity
from raycpt.files import read_json, write_json
from raycpt.models import load_model, load_tokenizer, max_positions, resolve_model_source


def prepare_experiment(cfg: ExperimentConfig) -> dict[str, Any]:
    """Fetch, split, tokenise and pack; returns the data manifest (JSON-serialisable)."""
    from transformers import AutoConfig

    d = cfg.data
    source = resolve_model_source(cfg.model.source)
    model_config = AutoConfig.from_pretrained(source, trust_remote_code=cfg.model.trust_remote_code)
    limit = max_positions(model_config)
    if limit is not None and d.block_size > limit:
        raise InputError(f"data.block_size={d.block_size} is over the model's maximum of {limit} positions; "
                         f"set data.block_size <= {limit}")
    tokenizer = load_tokenizer(cfg.model.source, cfg.model.trust_remote_code)
    task = None
    if cfg.eval.task:
        e = cfg.eval
        task = load_task(e.task, text_field=e.text_field, label_field=e.label_field, labels=e.labels,
                         train_size=e.train_size, test_size=e.test_size, seed=e.seed)
    common = dict(text_field=d.text_field, block_size=d.block_size, heldout_fraction=d.heldout_fraction,
                  heldout_blocks=d.heldout_blocks, max_tokens=d.max_tokens, seed=d.seed,
                  exclude_texts=task.test_texts if task else [])
    domain = prepare_corpus(d.domain, tokenizer, field="data.domain", **common)
    general = prepare_corpus(d.general, tokenizer, field="data.general", **common) if d.general else None
    manifest = {
        "model_source": source, "tokenizer": tokenizer_fingerprint(tokenizer), "block_size": d.block_size,
        "domain": dataclasses.asdict(domain), "general": dataclasses.asdict(general) if general else None,
        "task": dataclasses.asdict(task) if task else None,
    }
    manifest["fingerprint"] = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]
    return manifest


def measure_base(cfg: ExperimentConfig, manifest: dict[str, Any], exp_dir: Path) -> dict[str, Any]:
    """The base model's held-out metrics on the exact blocks trials use; cached in the experiment dir."""
    path = exp_dir / "base_metrics.json"
    key = hashlib.sha256(json.dumps([manifest["fingerprint"], dataclasses.asdict(cfg.eval), cfg.model.source,
                                     cfg.model.dtype], sort_keys=True).encode()).hexdigest()[:16]
    if path.exists():
        cached = read_json(path)
        if cached.get("key") == key:
            return cached
    start = time.perf_counter()
    model = load_model(cfg.model.source, cfg.model.dtype, cfg.model.trust_remote_code)
    domain_loss = heldout_loss(model, load_blocks(manifest["domain"]["heldout"]), batch_size=cfg.train.batch_size)
    metrics: dict[str, Any] = {"base/domain_loss": domain_loss, "base/domain_ppl": perplexity(domain_loss)}
    if manifest["general"]:
        general_loss = heldout_loss(model, load_blocks(manifest["general"]["heldout"]),
                                    batch_size=cfg.train.batch_size)
        metrics.update({"base/general_loss": general_loss, "base/general_ppl": perplexity(general_loss)})
    if manifest.get("task"):
        from raycpt.train import f1_metrics

        metrics.update(f1_metrics(model, cfg, manifest["task"], "cpu", prefix="base"))
    metrics.update({"key": key, "time_s": time.perf_counter() - start,
                    "threads": torch.get_num_threads()})
    write_json(path, metrics)
    return metrics
