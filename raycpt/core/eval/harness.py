"""lm-evaluation-harness (EleutherAI's lm-eval) on the in-memory model: the tasks people already report numbers on, or
their own task YAMLs, scored on the weights a trial just trained without saving and reloading them.

`HFLM(pretrained=model, tokenizer=tokenizer)` wraps the model (a finished trial's, the base model, the exported
winner) and `simple_evaluate` runs the tasks with lm-eval's own seeds (so the few-shot examples are those its CLI
draws); the global random generators it seeds are put back afterwards. Its bootstrap standard errors (metrics without
a closed form, such as BLEU) use raycpt's resample count and run in this process (DISABLE_MULTIPROC: 0.4.13 honours
it, 0.4.5 does not): a trial holds only its own CPUs, and lm-eval would otherwise start a pool over every core. Every
metric of every task becomes `lm_eval/<task>/<metric>` (raycpt.core.metrics.lm_eval_name) with a 95% interval, value
± 1.96 x lm-eval's standard error (its normal approximation; no interval where lm-eval reports no standard error).

`check_tasks` runs before any work: lm-eval installed, every name known to lm-eval's TaskManager (with the user's
`include_path`), the local data files of the user's YAMLs present. Indexing lm-eval's ~15k built-in YAMLs takes 10-30
s, so tasks that are all defined in `include_path` are looked up there alone (and the index is built once per
process). Relative `data_files` in the user's YAMLs are read from `include_path`: lm-eval runs with it as the working
directory, so a trial finds them wherever Ray starts it.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import glob
import importlib.util
import math
import os
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from raycpt.core import metrics
from raycpt.core.config import EvalConfig
from raycpt.core.errors import InputError
from raycpt.core.eval.stats import BOOTSTRAP_SAMPLES

INSTALL_HINT = "pip install 'raycpt[lm-eval]'"
Z_95 = 1.959963984540054
"""The two-sided 95% normal quantile: an lm-eval metric's interval is value ± Z_95 x its standard error."""
MAIN_METRICS = ("acc", "acc_norm", "exact_match", "f1", "mcc", "bleu", "chrf", "rougeL", "word_perplexity")
"""The metric the trials table shows for a task, the first of these it reports (else its first by name); json, the
summary and the card keep all of them."""
LOCAL_DATASETS = ("json", "csv", "parquet", "text", "arrow")
"""`dataset_path` of a task YAML that reads `dataset_kwargs.data_files` from disk (the ones `check_tasks` checks)."""


@dataclass(frozen=True)
class HarnessSpec:
    """What to run: the `eval.lm_eval_*` fields."""

    tasks: tuple[str, ...]
    include_path: str = ""
    num_fewshot: int = -1
    """-1: each task's own default."""
    limit: int = 0
    """0: every example."""
    batch_size: int = 8


def harness_spec(e: EvalConfig) -> HarnessSpec | None:
    """The HarnessSpec of the `eval` section, or None when eval.lm_eval_tasks is empty."""
    if not e.lm_eval_tasks:
        return None
    return HarnessSpec(tuple(e.lm_eval_tasks), e.lm_eval_include_path, e.lm_eval_num_fewshot, e.lm_eval_limit,
                       e.lm_eval_batch_size)


def require_lm_eval() -> None:
    """One InputError line when lm-eval is not installed."""
    if importlib.util.find_spec("lm_eval") is None:
        raise InputError(f"eval.lm_eval_tasks: lm-evaluation-harness is not installed; {INSTALL_HINT} (or set "
                         "eval.lm_eval_tasks=[])")


@functools.lru_cache(maxsize=4)
def _task_manager(include_path: str, defaults: bool):
    from lm_eval.tasks import TaskManager  # deferred: lm-eval is optional, and its import takes seconds

    return TaskManager(include_path=include_path or None, include_defaults=defaults)


def task_manager(spec: HarnessSpec):
    """lm-eval's TaskManager for the spec's tasks: `include_path` alone when every task is one defined there (a
    second), else with lm-eval's built-in tasks too (10-30 s to index, once per process)."""
    if spec.include_path:
        local = _task_manager(spec.include_path, False)
        if all(name in local.all_subtasks for name in spec.tasks):
            return local
    return _task_manager(spec.include_path, True)


def check_tasks(spec: HarnessSpec) -> None:
    """One InputError line for tasks that cannot run: lm-eval missing, include_path not a directory, a name lm-eval
    does not know (with the closest it does), a data file one of the user's YAMLs reads that is not there."""
    require_lm_eval()
    if spec.include_path and not os.path.isdir(spec.include_path):
        raise InputError(f"eval.lm_eval_include_path: {spec.include_path} is not a directory; give the directory "
                         "holding your task YAMLs")
    manager = task_manager(spec)
    known = set(manager.all_tasks)
    unknown = [name for name in spec.tasks if name not in known]
    if unknown:
        described = []
        for name in unknown:
            close = difflib.get_close_matches(name, manager.all_tasks, n=3, cutoff=0.6)
            described.append(f"'{name}'" + (f" (close: {', '.join(close)})" if close else ""))
        where = (f"lm-evaluation-harness or {spec.include_path}" if spec.include_path
                 else "lm-evaluation-harness (your own YAMLs: eval.lm_eval_include_path)")
        raise InputError(f"eval.lm_eval_tasks: {', '.join(described)} {'is' if len(unknown) == 1 else 'are'} not "
                         f"a task of {where}; `lm-eval ls tasks` lists them")
    if spec.include_path:
        for name in spec.tasks:
            _check_data_files(manager, name, spec.include_path)


class _LooseLoader(yaml.SafeLoader):
    """Reads lm-eval task YAMLs without running their `!function` tags (they become None)."""


_LooseLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def _task_yaml(path: Path, depth: int = 0) -> dict[str, Any]:
    """A task YAML with the files it `include`s under it (theirs first, its own keys win), as lm-eval merges them."""
    raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_LooseLoader) or {}
    base = raw.get("include") if isinstance(raw, dict) else None
    if isinstance(base, str) and depth < 8:
        parent = path.parent / base
        if parent.is_file():
            return {**_task_yaml(parent, depth + 1), **raw}
    return raw if isinstance(raw, dict) else {}


def _data_files(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _data_files(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _data_files(item)


def _check_data_files(manager, name: str, include_path: str) -> None:
    """The local files a task YAML of `include_path` reads (dataset_path json/csv/...: dataset_kwargs.data_files,
    relative to include_path) must exist."""
    entry = manager.task_index.get(name)
    found = getattr(entry, "yaml_path", None) or (entry.get("yaml_path") if isinstance(entry, dict) else None)
    if not isinstance(found, (str, Path)) or not Path(found).is_file():
        return
    path = Path(found)
    root = Path(include_path).resolve()
    if root not in path.resolve().parents:
        return  # one of lm-eval's own
    cfg = _task_yaml(path)
    if cfg.get("dataset_path") not in LOCAL_DATASETS:
        return
    for pattern in _data_files((cfg.get("dataset_kwargs") or {}).get("data_files")):
        if "://" in pattern:
            continue
        full = Path(include_path) / pattern
        if not (glob.glob(str(full)) if glob.has_magic(pattern) else full.exists()):
            raise InputError(f"eval.lm_eval_tasks: task '{name}' ({path}) reads data file {pattern}, which is not in "
                             f"{include_path}; relative data_files are read from eval.lm_eval_include_path")


@contextlib.contextmanager
def _kept_random_state() -> Iterator[None]:
    """lm-eval seeds Python's, numpy's and torch's global generators; put them back afterwards, so scoring never
    changes what the process draws next."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    cuda = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=cuda):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


@contextlib.contextmanager
def _working_dir(path: str) -> Iterator[None]:
    """Run with `path` as the working directory (none given: stay)."""
    before = os.getcwd()
    if path:
        os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


@contextlib.contextmanager
def _environment(name: str, value: str) -> Iterator[None]:
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def per_example(samples: list[dict[str, Any]], metric: str, filter_name: str) -> list[float] | None:
    """One value of `metric` per document, in doc_id order, from lm-eval's logged samples (acc: 1.0 or 0.0); None
    when the metric has no numeric value per document (corpus-level scores such as BLEU)."""
    rows = sorted((s for s in samples if s.get("filter", "none") == filter_name), key=lambda s: s.get("doc_id", 0))
    values = [_number(s.get(metric)) for s in rows]
    return values if values and all(v is not None for v in values) else None


def flat_scores(results: dict[str, dict[str, Any]], samples: dict[str, list[dict[str, Any]]] | None = None
                ) -> dict[str, Any]:
    """lm-eval's results, {task: {"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": ...}}, as flat metrics
    (`lm_eval/<task>/<metric>`) with value ± Z_95 x stderr as their interval (none without a stderr) and, from its
    logged `samples`, the per-example values (`..._samples`: what paired intervals between models use)."""
    flat: dict[str, Any] = {}
    for task, row in results.items():
        for key, raw in row.items():
            metric, comma, filter_name = key.partition(",")
            value = _number(raw)
            if not comma or metric.endswith("_stderr") or value is None:
                continue
            name = metrics.lm_eval_name(task, metric, filter_name)
            flat[name] = value
            stderr = _number(row.get(f"{metric}_stderr,{filter_name}"))
            if stderr is not None:
                flat[name + metrics.CI_LOW] = value - Z_95 * stderr
                flat[name + metrics.CI_HIGH] = value + Z_95 * stderr
            values = per_example((samples or {}).get(task, []), metric, filter_name)
            if values is not None:
                flat[name + metrics.SAMPLES] = values
    return flat


def harness_scores(model: nn.Module, tokenizer, spec: HarnessSpec) -> dict[str, Any]:
    """The spec's tasks scored on `model` as it is in memory: flat `lm_eval/...` metrics with intervals and
    per-example values. Restores the model's train mode and the process's random state."""
    import lm_eval  # deferred: lm-eval is optional, and its import takes seconds
    from lm_eval.models.huggingface import HFLM  # deferred: as above

    manager = task_manager(spec)
    was_training = model.training
    try:
        with _kept_random_state(), _working_dir(spec.include_path), _environment("DISABLE_MULTIPROC", "1"):
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=spec.batch_size)
            out = lm_eval.simple_evaluate(model=lm, tasks=list(spec.tasks), task_manager=manager,
                                          num_fewshot=None if spec.num_fewshot < 0 else spec.num_fewshot,
                                          limit=spec.limit or None, log_samples=True,
                                          bootstrap_iters=BOOTSTRAP_SAMPLES)
    finally:
        model.train(was_training)
    return flat_scores(out["results"], out.get("samples"))


def main_metrics(names: Iterable[str]) -> dict[str, str]:
    """{task: the `lm_eval/...` name the trials table shows for it} among `names` (MAIN_METRICS)."""
    by_task: dict[str, list[str]] = {}
    for name in names:
        if name.startswith(metrics.LM_EVAL_PREFIX) and not name.endswith((metrics.CI_LOW, metrics.CI_HIGH)):
            task = name.removeprefix(metrics.LM_EVAL_PREFIX).split("/", 1)[0]
            by_task.setdefault(task, []).append(name)

    def rank(name: str) -> tuple[int, int, str]:
        rest = name.removeprefix(metrics.LM_EVAL_PREFIX).split("/")[1:]  # [metric] or [filter, metric]
        metric = rest[-1]
        return (MAIN_METRICS.index(metric) if metric in MAIN_METRICS else len(MAIN_METRICS), len(rest), name)

    return {task: min(found, key=rank) for task, found in sorted(by_task.items())}
