"""Everything fixed before any trial starts, without Ray: model and corpora fetched, data packed, the downstream
task split, held-out sets chosen, and the base model measured once on them.

The result is the `Manifest` (paths of memory-mapped blocks + statistics + the labelled task) that every trial
reads, and `base_metrics.json`, the reference for every trial's lift and forgetting.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from raycpt.core import metrics
from raycpt.core.config import AUGMENT_MANIFEST, ExperimentConfig
from raycpt.core.data.blocks import (
    TIMING_FIELDS,
    PreparedCorpus,
    Task,
    check_corpus_start,
    load_blocks,
    load_task,
    prepare_corpus,
    tokenizer_fingerprint,
)
from raycpt.core.data.shards import Mapper, UnitResult, map_in_process
from raycpt.core.data.sources import corpus_units, source_text, unit_bytes
from raycpt.core.errors import InputError
from raycpt.core.eval.evaluate import autocast_dtype, f1_metrics, heldout_block_losses, ppl_metrics
from raycpt.core.eval.generation import generation_spec, read_pairs, require_scorers
from raycpt.core.eval.harness import check_tasks, harness_spec
from raycpt.core.eval.prompting import check_prompt, prompt_spec, scores_without_task
from raycpt.core.files import read_json, write_json
from raycpt.core.model.loading import load_model, load_tokenizer, max_positions, resolve_model_source
from raycpt.core.resources import trial_concurrency

MANIFEST_FILE = "data_manifest.json"
BASE_METRICS_FILE = "base_metrics.json"


@dataclass
class Manifest:
    """Everything a trial needs to know about the prepared data. JSON only on disk (`save`/`load`)."""

    model_source: str
    """The local model dir the source resolved to."""
    tokenizer: str
    block_size: int
    domain: PreparedCorpus
    general: PreparedCorpus | None
    task: Task | None
    fingerprint: str = ""
    """Hash of everything else here except which exact encoder produced the ids (they are the same ids)."""
    synthetic: PreparedCorpus | None = None
    """The synthetic domain corpus (data.synthetic), or None. None is left out of the JSON and of the fingerprint,
    so a manifest without one is the manifest it was before synthetic corpora existed (and an old one loads)."""

    def to_dict(self) -> dict[str, Any]:
        raw = dataclasses.asdict(self)
        if raw["synthetic"] is None:
            del raw["synthetic"]
        return raw

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Manifest:
        return cls(raw["model_source"], raw["tokenizer"], raw["block_size"], PreparedCorpus(**raw["domain"]),
                   PreparedCorpus(**raw["general"]) if raw.get("general") else None,
                   Task(**raw["task"]) if raw.get("task") else None, raw.get("fingerprint", ""),
                   PreparedCorpus(**raw["synthetic"]) if raw.get("synthetic") else None)

    def save(self, exp_dir: Path) -> None:
        write_json(Path(exp_dir) / MANIFEST_FILE, self.to_dict())

    @classmethod
    def load(cls, exp_dir: Path) -> Manifest:
        return cls.from_dict(read_json(Path(exp_dir) / MANIFEST_FILE))

    def compute_fingerprint(self) -> str:
        raw = self.to_dict()
        raw.pop("fingerprint")
        for corpus in ("domain", "general", "synthetic"):
            if raw.get(corpus):
                for how in TIMING_FIELDS:
                    raw[corpus].pop(how)
        return hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()[:16]


def check_storage(cfg: ExperimentConfig) -> Path:
    """The experiment dir can be created and written; returns it. Leaves the disk as it found it: directories
    made for the check (the experiment dir and any missing parent, e.g. runs/) are removed again."""
    exp_dir = cfg.experiment_dir()
    missing = [d for d in (exp_dir, *exp_dir.parents) if not d.exists()]
    try:
        exp_dir.mkdir(parents=True, exist_ok=True)
        probe = exp_dir / f".raycpt-write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise InputError(f"storage_path '{cfg.storage_path}': cannot write {exp_dir} ({err.strerror or err}); "
                         "set storage_path to a writable directory") from None
    finally:
        for made in missing:  # deepest first; one that something else wrote into meanwhile stays
            try:
                made.rmdir()
            except FileNotFoundError:
                continue
            except OSError:
                break
    return exp_dir


def check_model(cfg: ExperimentConfig):
    """The model source resolves and its config loads; the block size fits its positions. Returns the config."""
    from transformers import AutoConfig

    source = resolve_model_source(cfg.model.source)
    try:
        model_config = AutoConfig.from_pretrained(source, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as err:
        hint = ("the hub is unreachable here (offline?): use a local dir or packaged:smollm2-135m"
                if "/" in source and not os.path.isdir(source) else "check the path")
        reason = str(err).splitlines()[0][:160]
        raise InputError(f"model.source '{cfg.model.source}': cannot load its config ({reason}); {hint}") from None
    limit = max_positions(model_config)
    if limit is not None and cfg.data.block_size > limit:
        raise InputError(f"data.block_size={cfg.data.block_size} is over the model's maximum of {limit} positions; "
                         f"set data.block_size <= {limit}")
    return model_config


def check_local_resources(cfg: ExperimentConfig) -> None:
    """Without RAY_ADDRESS raycpt starts Ray on this machine: a trial must fit its CPUs and GPUs."""
    if os.environ.get("RAY_ADDRESS"):
        return  # checked against the cluster's resources once connected, still before any trial starts
    trial_concurrency(cfg, {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())})


def load_eval_task(cfg: ExperimentConfig) -> Task | None:
    e = cfg.eval
    if not e.task:
        return None
    return load_task(e.task, text_field=e.text_field, label_field=e.label_field, labels=e.labels,
                     train_size=e.train_size, val_size=e.val_size, test_size=e.test_size, seed=e.seed,
                     test_source=e.test_task)


def preflight(cfg: ExperimentConfig) -> dict[str, Any]:
    """Every input check `validate` can make without tokenising or training: storage, model, resources, corpora,
    labels. Raises InputError naming the first problem."""
    check_storage(cfg)
    check_model(cfg)
    check_local_resources(cfg)
    task = load_eval_task(cfg)
    tokenizer = load_tokenizer(cfg.model.source, cfg.model.trust_remote_code)
    check_task_prompt(cfg, task, tokenizer)
    check_splitless(cfg)
    found = {}
    d = cfg.data
    synthetic = None if cfg.augments() and not augmented(cfg) else cfg.synthetic_source()  # not written yet
    for field, source in (("data.domain", d.domain), ("data.general", d.general), ("data.synthetic", synthetic)):
        if source:
            units, text_field, _ = corpus_units(source, text_field=d.text_field, field=field, txt_unit=d.txt_unit,
                                                unit_bytes=unit_bytes(d.unit_mb), streaming=d.streaming)
            check_corpus_start(units, tokenizer, d.block_size, source_text(source), field, text_field=text_field,
                               txt_unit=d.txt_unit)
            found[field] = {"units": len(units), "bytes": sum(u.bytes for u in units)}
    sizes = {"train": len(task.train_texts), "val": len(task.val_texts), "test": len(task.test_texts)} if task else None
    return {"documents": found, "task": sizes}


def check_task_prompt(cfg: ExperimentConfig, task, tokenizer) -> None:
    """eval.method prompt: the template and label words can score this task with this tokenizer (InputError)."""
    spec = prompt_spec(cfg.eval)
    if spec is not None and task is not None and cfg.eval.method in ("prompt", "both"):
        check_prompt(spec, task.classes, tokenizer)


def check_splitless(cfg: ExperimentConfig) -> None:
    """eval.lm_eval_tasks: lm-eval installed and every task known, its local data present; eval.generate_path:
    sacrebleu and rouge-score installed, every line a {input, target} pair (InputError, one line)."""
    harness, generation = harness_spec(cfg.eval), generation_spec(cfg.eval)
    if harness is not None:
        check_tasks(harness)
    if generation is not None:
        require_scorers()
        read_pairs(generation.path)


def augmented(cfg: ExperimentConfig) -> bool:
    """The augment stage has written this experiment's rewrites (its manifest is the last thing it writes)."""
    return (cfg.augment_dir() / AUGMENT_MANIFEST).is_file()


def prepare_experiment(cfg: ExperimentConfig, *, mapper: Mapper = map_in_process,
                       on_unit: Callable[[str, UnitResult | None, int], None] | None = None) -> Manifest:
    """Fetch, split, tokenise and pack; returns the data manifest. `mapper` runs the per-unit and per-bucket work
    (here by default; `raycpt.edge.data.RayDataMapper` on Ray Data: the same blocks either way); `on_unit(field,
    result, input_bytes)` hears of each finished read unit (progress)."""
    d = cfg.data
    check_storage(cfg)
    if cfg.augments() and not augmented(cfg):
        raise InputError(f"data.synthetic: augment: {cfg.synthetic_source()} holds no rewrites yet; run `raycpt "
                         "augment CONFIG` first (`raycpt prepare`, `sweep` and `train` run it), or name another corpus")
    check_model(cfg)
    check_local_resources(cfg)
    source = resolve_model_source(cfg.model.source)
    tokenizer = load_tokenizer(cfg.model.source, cfg.model.trust_remote_code)
    task = load_eval_task(cfg)
    check_task_prompt(cfg, task, tokenizer)
    check_splitless(cfg)
    common = dict(text_field=d.text_field, block_size=d.block_size, heldout_fraction=d.heldout_fraction,
                  heldout_blocks=d.heldout_blocks, test_blocks=d.test_blocks or d.heldout_blocks,
                  max_tokens=d.max_tokens, seed=d.seed, exclude_texts=task.heldout_texts() if task else [],
                  txt_unit=d.txt_unit, dedup=d.dedup, shards=d.shards, unit_mb=d.unit_mb, streaming=d.streaming,
                  tokenizer_source=source, trust_remote_code=cfg.model.trust_remote_code, mapper=mapper)

    def corpus(field: str, spec: str | dict) -> PreparedCorpus:
        report = (lambda result, total: on_unit(field, result, total)) if on_unit else None
        return prepare_corpus(spec, tokenizer, field=field, on_unit=report, **common)

    domain = corpus("data.domain", d.domain)
    general = corpus("data.general", d.general) if d.general else None
    synthetic = corpus("data.synthetic", cfg.synthetic_source()) if d.synthetic else None  # the rewrites (augment)
    manifest = Manifest(source, tokenizer_fingerprint(tokenizer), d.block_size, domain, general, task,
                        synthetic=synthetic)
    manifest.fingerprint = manifest.compute_fingerprint()
    return manifest


def score_model(model, cfg: ExperimentConfig, manifest: Manifest, *, prefixes: dict[str, str],
                probe_splits: tuple[str, ...] | None = None, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Held-out ppl (with intervals and per-block losses) and probe F1 (with interval and predictions) of a model
    on the validation and/or test parts, as flat metrics: `prefixes` maps each split ("val", "test") to the prefix
    of its names ('base/', 'test/', 'base/test/'). The probe is fitted once and scored on `probe_splits` (default:
    every split in `prefixes`); lm-eval tasks and generation (split-less) run once and are named under each of
    those splits' prefixes. Runs in the precision trials use on this device."""
    device = torch.device(device)
    amp = autocast_dtype(cfg.train.precision, device)
    model.to(device)
    results: dict[str, Any] = {}
    for split, prefix in prefixes.items():
        for corpus, loss_name, ppl_name in ((manifest.domain, metrics.DOMAIN_LOSS, metrics.DOMAIN_PPL),
                                            (manifest.general, metrics.GENERAL_LOSS, metrics.GENERAL_PPL)):
            if corpus is not None:
                blocks = load_blocks(corpus.heldout if split == "val" else corpus.test)
                losses = heldout_block_losses(model, blocks, batch_size=cfg.train.batch_size, device=device,
                                              autocast_dtype=amp)
                results.update(ppl_metrics(losses, manifest.block_size,
                                           prefix + loss_name.removeprefix(metrics.EVAL_PREFIX),
                                           prefix + ppl_name.removeprefix(metrics.EVAL_PREFIX), seed=cfg.data.seed))
    probe = {split: prefixes[split] for split in (prefixes if probe_splits is None else probe_splits)}
    if (manifest.task or scores_without_task(cfg.eval)) and probe:
        e = cfg.eval
        results.update(f1_metrics(model, cfg.model.source, manifest.task, seeds=e.seeds, seed=e.seed,
                                  max_length=e.max_length, device=device, trust_remote_code=cfg.model.trust_remote_code,
                                  prefixes=probe, method=e.method, prompt=prompt_spec(e)))
    return results


def base_cache_key(cfg: ExperimentConfig, manifest: Manifest) -> str:
    """What the base measurement depends on: the data, the task, the model and how it is run, and the files the
    lm-eval tasks and generation read (each file's path, size and modification time)."""
    return hashlib.sha256(json.dumps([manifest.fingerprint, dataclasses.asdict(cfg.eval), cfg.model.source,
                                      cfg.model.dtype, cfg.train.precision, cfg.resources.use_gpu,
                                      *splitless_files(cfg)],
                                     sort_keys=True).encode()).hexdigest()[:16]


def splitless_files(cfg: ExperimentConfig) -> list[list]:
    """[path, bytes, mtime_ns] of eval.generate_path and of every file under eval.lm_eval_include_path (their
    contents change the base model's scores without changing the config)."""
    e = cfg.eval
    paths = [Path(e.generate_path)] if e.generate_path else []
    if e.lm_eval_tasks and e.lm_eval_include_path and Path(e.lm_eval_include_path).is_dir():
        paths += sorted(p for p in Path(e.lm_eval_include_path).rglob("*") if p.is_file())
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in paths if p.is_file()]


def cached_base(cfg: ExperimentConfig, manifest: Manifest, exp_dir: Path) -> dict[str, Any] | None:
    """The base metrics saved in the experiment dir, if they were measured for this data, task, model and
    precision."""
    path = exp_dir / BASE_METRICS_FILE
    cached = read_json(path) if path.exists() else {}
    return cached if cached.get("key") == base_cache_key(cfg, manifest) else None


def measure_base(cfg: ExperimentConfig, manifest: Manifest, exp_dir: Path) -> dict[str, Any]:
    """The base model's metrics on the exact blocks and texts trials use (`base/...`, validation) and on the test
    parts (`base/test/...`, shown only beside the winner's test numbers), on the device and in the precision
    trials use (a GPU when resources.use_gpu); cached in the experiment dir."""
    cached = cached_base(cfg, manifest, exp_dir)
    if cached is not None:
        return cached
    start = time.perf_counter()
    device = torch.device("cuda" if cfg.resources.use_gpu and torch.cuda.is_available() else "cpu")
    model = load_model(cfg.model.source, cfg.model.dtype, cfg.model.trust_remote_code)
    results = score_model(model, cfg, manifest, device=device, prefixes={
        "val": metrics.BASE_PREFIX, "test": metrics.base_name(metrics.TEST_PREFIX)})
    results.update({"key": base_cache_key(cfg, manifest), "time_s": time.perf_counter() - start,
                    "threads": torch.get_num_threads(), "device": str(device),
                    "precision": str(autocast_dtype(cfg.train.precision, device) or "fp32")})
    write_json(exp_dir / BASE_METRICS_FILE, results)
    return results
