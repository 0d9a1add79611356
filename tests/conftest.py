"""Shared fixtures: a real GPT-2 BPE tokenizer and tiny models built from a config (no weights committed)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from raycpt.core.config import load_config
from raycpt.core.model.loading import resolve_model_source

ROOT = Path(__file__).resolve().parents[1]
# Tests run offline (the hub is unreachable on our machines): fail hub look-ups at once instead of after network
# time-outs. Users elsewhere keep hub loading; the offline errors are what the bad-input tests check.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_gpt2_dir() -> str:
    """The packaged 2-layer GPT-2 (seeded random init, real GPT-2 BPE tokenizer), built in the cache once."""
    return resolve_model_source("packaged:tiny-gpt2")


@pytest.fixture(scope="session")
def tokenizer(tiny_gpt2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_gpt2_dir)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tokenizer) -> str:
    """A 2-layer Llama (the SmolLM2 architecture) from a config, with the GPT-2 tokenizer."""
    return str(save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tokenizer))


def save_tiny_llama(path: Path, tokenizer, dtype: torch.dtype = torch.float32) -> Path:
    """Save a seeded 2-layer Llama with `tokenizer` in `dtype` to `path`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(dtype).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def local_ray():
    """A small local Ray cluster (2 CPUs, dashboard on), shut down after the module."""
    import ray

    ray.init(num_cpus=2, include_dashboard=True, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def finished_trial(cfg):
    """Prepare `cfg`'s experiment and train it in-process: its directory, manifest and last report as a trial
    row (trial id 't1')."""
    from raycpt.core import metrics
    from raycpt.core.prepare import prepare_experiment
    from raycpt.core.train.loop import train

    exp_dir = cfg.experiment_dir()
    manifest = prepare_experiment(cfg)
    exp_dir.mkdir(parents=True)
    manifest.save(exp_dir)
    reports = []
    train(cfg, manifest, lambda m, c: reports.append((m, c)), checkpoint_root=exp_dir / "ckpt")
    last, checkpoint = reports[-1]
    return exp_dir, manifest, {"trial_id": "t1", metrics.CHECKPOINT_PATH: checkpoint, **last}


DOMAIN_SENTENCES = [
    "The film's pacing drags, but the lead performance is luminous and the score soars.",
    "A clumsy script undercuts a charming cast; the third act collapses under its own weight.",
    "Gorgeously shot and fiercely acted, this drama earns every one of its tears.",
    "The sequel recycles the original's jokes with less wit and more noise.",
    "An absorbing thriller whose twists land because the characters feel real.",
    "Overlong and self-serious, the epic mistakes spectacle for meaning.",
]
GENERAL_SENTENCES = [
    "The senate voted on the budget bill late on Tuesday after a long debate.",
    "Shares of the company rose three percent after quarterly earnings beat forecasts.",
    "Officials said the storm would reach the coast by Friday morning.",
    "The central bank left interest rates unchanged at its monthly meeting.",
]


def write_jsonl(path: Path, texts: list[str], field: str = "text", **extra) -> Path:
    with path.open("w") as fh:
        for i, text in enumerate(texts):
            row = {field: text, **{k: v[i] for k, v in extra.items()}}
            fh.write(json.dumps(row) + "\n")
    return path


def write_corpora(root: Path) -> dict[str, str]:
    """Small domain and general corpora (jsonl) in `root`, repeated with variations so they pack into many blocks;
    a file already there is kept (written again, it would be another source to the data cache)."""
    texts = {"domain": [f"{s} Review {i}." for i in range(60) for s in DOMAIN_SENTENCES],
             "general": [f"{s} Report {i}." for i in range(60) for s in GENERAL_SENTENCES]}
    root.mkdir(parents=True, exist_ok=True)
    return {name: str(path if (path := root / f"{name}.jsonl").exists() else write_jsonl(path, lines))
            for name, lines in texts.items()}


@pytest.fixture()
def corpora(tmp_path) -> dict[str, str]:
    return write_corpora(tmp_path)


SECRETS = {"HF_TOKEN": "hf_secretvalue_0123456789", "WANDB_API_KEY": "wandb-secret-0123456789",
           "AWS_SECRET_ACCESS_KEY": "aws-secret-0123456789abcdef"}


@pytest.fixture(scope="session")
def node_tmp(tmp_path_factory):
    """The smoke sweep's trial processes' temp dir (TMPDIR), where they stage checkpoints."""
    return tmp_path_factory.mktemp("node-tmp")


@pytest.fixture(scope="session")
def smoke_sweep(tmp_path_factory, node_tmp):
    """The smoke sweep, uninterrupted, on local Ray with 2 CPUs (shared by the e2e tests)."""
    import os

    import ray

    from raycpt.pipeline import sweep
    from raycpt.results.format import make_console

    storage = tmp_path_factory.mktemp("runs")
    cfg = load_config(ROOT / "experiments" / "smoke.yaml", [f"storage_path={storage}"])
    saved = {k: os.environ.get(k) for k in SECRETS}
    os.environ.update(SECRETS)  # secrets live in the environment; they must never reach experiment files
    ray.init(num_cpus=2, include_dashboard=True, log_to_driver=False,
             runtime_env={"env_vars": {"TMPDIR": str(node_tmp)}})
    try:
        summary = sweep(cfg, console=make_console())
    finally:
        ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return cfg, summary


def fit_or_fail(trainer, timeout_s: float):
    """trainer.fit() in a daemon thread, so a desynchronised process group fails the test instead of hanging the
    whole run (a stuck collective never returns). Returns fit()'s result; re-raises its error."""
    import threading

    outcome: dict = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as err:  # re-raised below, in the test's thread
            outcome["error"] = err

    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        import ray

        ray.shutdown()  # ends the stuck workers
        pytest.fail(f"fit() did not finish in {timeout_s} s (ranks out of step?)")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


RECORDED_SWEEP = ROOT / "tests" / "fixtures" / "smoke_sweep"
"""A recorded smoke sweep (Tune's JSON state and results, no weights): see tests/test_report.py to re-record it."""


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    """The recorded sweep at a path it was not recorded at (paths inside it must resolve to the copy)."""
    import shutil

    path = tmp_path_factory.mktemp("moved") / "smoke"
    shutil.copytree(RECORDED_SWEEP, path)
    return path


@pytest.fixture(scope="module")
def summary(sweep_dir):
    """The recorded sweep analysed from disk (never exported)."""
    from raycpt.results.summary import analyze

    return analyze(sweep_dir, export=False)
