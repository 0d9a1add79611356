"""Export the winner: copy its checkpoint's weights into <exp>/export with the tokenizer and a card
(raycpt_card.json + README.md: metrics vs base, hyperparameters, data mix, versions, lineage), then reload the
export and check that it scores the reported held-out perplexity; with `export.push_to_hub`, upload it after that
check passed. A LoRA winner is exported merged into full weights (loads without PEFT), its adapter optionally
beside them (`export.adapter`)."""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from raycpt.core import metrics
from raycpt.core.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, is_adapter_checkpoint
from raycpt.core.config import CONFIG_FILE, ExperimentConfig, config_from_dict, to_dict
from raycpt.core.errors import ExportCheckError, InputError
from raycpt.core.files import read_json, write_json
from raycpt.core.models import load_model, load_tokenizer
from raycpt.core.prepare import Manifest, score_model
from raycpt.core.train import has_weights, load_checkpoint_model
from raycpt.results.collect import HP_PREFIX
from raycpt.results.compare import paired_lifts
from raycpt.results.format import fixed, interval_text, num
from raycpt.results.select import Selection

EXPORT_DIR = "export"
CARD_FILE = "raycpt_card.json"
ADAPTER_DIR = "adapter"
"""export.adapter: the LoRA winner's unmerged PEFT adapter, inside the export dir."""
HF_TOKEN_ENV = "HF_TOKEN"


def write_weights(checkpoint: Path, export: Path, cfg: ExperimentConfig) -> None:
    """The checkpoint's model as HF safetensors in `export`, in files of at most `export.max_shard_size`
    (model.safetensors, or model-0000k-of-0000n.safetensors + model.safetensors.index.json), with config.json and
    generation_config.json. Either checkpoint format: a ddp save_pretrained dir, or an fsdp checkpoint's DCP
    shards gathered here on CPU (no process group; needs the whole model's memory), or a LoRA adapter merged into
    its base. With `export.adapter`, a LoRA checkpoint's adapter is also copied to `export/adapter/`."""
    model = load_checkpoint_model(checkpoint, cfg.model.dtype, cfg.model.trust_remote_code)
    model.save_pretrained(export, safe_serialization=True, max_shard_size=cfg.export.max_shard_size)
    if cfg.export.adapter and is_adapter_checkpoint(checkpoint):
        (export / ADAPTER_DIR).mkdir(parents=True, exist_ok=True)
        for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
            shutil.copy2(checkpoint / name, export / ADAPTER_DIR / name)


def hub_token(cfg: ExperimentConfig) -> str | None:
    """export.push_to_hub's token: HF_TOKEN from the environment (never the config), None when not pushing.
    Missing: InputError (one line) before anything is exported or uploaded."""
    if not cfg.export.push_to_hub:
        return None
    token = os.environ.get(HF_TOKEN_ENV, "").strip()
    if not token:
        raise InputError(f"export.push_to_hub={cfg.export.push_to_hub}: {HF_TOKEN_ENV} is not set in the "
                         f"environment; export {HF_TOKEN_ENV}=<a token with write access> (tokens never go in the "
                         "config), or set export.push_to_hub=''")
    return token


def push_to_hub(export: Path, repo_id: str, token: str) -> str:
    """Upload the export dir (weights, tokenizer, card; its README.md is the repo's card) to `repo_id`, creating the
    repo if needed. Returns the commit URL; any failure is one InputError line saying the export stays on disk."""
    from huggingface_hub import HfApi  # deferred: only pushes need the hub client

    try:
        api = HfApi(token=token)
        api.create_repo(repo_id, repo_type="model", exist_ok=True)
        commit = api.upload_folder(folder_path=str(export), repo_id=repo_id, repo_type="model",
                                   commit_message="raycpt: export the sweep's winner")
    except Exception as err:  # network, auth, quota: whatever it is, the verified export is kept and retryable
        raise InputError(f"export.push_to_hub={repo_id}: upload failed ({type(err).__name__}: "
                         f"{' '.join(str(err).split())[:200]}); the export stays in {export}; retry with "
                         "`raycpt analyze EXP_DIR --export --force`") from None
    return str(getattr(commit, "commit_url", None) or commit)


def _versions() -> dict[str, str]:
    """Versions of what trained and scored the model (read from package metadata: nothing is imported)."""
    packages = ("raycpt", "torch", "transformers", "peft", "ray", "datasets", "scikit-learn")
    return {**{name: importlib.metadata.version(name) for name in packages}, "python": platform.python_version()}


def export_winner(exp_dir: Path, cfg: ExperimentConfig, row: dict[str, Any], base: dict[str, Any],
                  selection: Selection, *, force: bool = False, compute: dict[str, Any] | None = None
                  ) -> dict[str, Any]:
    """Copy the winner's checkpoint into <exp>/export (safetensors + tokenizer + card), then reload it and check
    that it scores the reported held-out ppl. `compute`: the sweep's compute accounting, recorded in the card
    with the winner's own `compute/...` numbers."""
    checkpoint = Path(str(row.get(metrics.CHECKPOINT_PATH) or ""))
    if not has_weights(checkpoint):
        raise InputError(f"trial {row['trial_id']}: its checkpoint {checkpoint} is missing; cannot export it")
    token = hub_token(cfg)  # a missing HF_TOKEN fails here, before anything is written or uploaded
    export = exp_dir / EXPORT_DIR
    if export.exists() and any(export.iterdir()):
        if not force:
            raise InputError(f"{export} already holds an export; pass --force to overwrite it")
        shutil.rmtree(export)
    export.mkdir(parents=True)
    write_weights(checkpoint, export, cfg)
    load_tokenizer(cfg.model.source, cfg.model.trust_remote_code).save_pretrained(export)

    trial_cfg = config_from_dict(read_json(checkpoint / CONFIG_FILE))
    manifest = Manifest.load(exp_dir)
    device = "cuda" if trial_cfg.resources.use_gpu and torch.cuda.is_available() else "cpu"
    model = load_model(str(export), trust_remote_code=False)
    # the exported model, on the trials' device and precision: the validation blocks again (their ppl must match
    # what the trial reported) and, once, the test parts with the probe
    scored = score_model(model, trial_cfg, manifest, device=device, probe_splits=("test",),
                         prefixes={"val": metrics.EVAL_PREFIX, "test": metrics.TEST_PREFIX})
    rescored = {k: v for k, v in scored.items() if k.startswith(metrics.EVAL_PREFIX)}
    test = {k: v for k, v in scored.items() if k.startswith(metrics.TEST_PREFIX)}
    task = manifest.task
    test.update(paired_lifts(test, base, row_prefix=metrics.TEST_PREFIX,
                             reference_prefix=metrics.base_name(metrics.TEST_PREFIX),
                             out_prefix=metrics.TEST_PREFIX + metrics.LIFT_PREFIX,
                             labels=task.test_labels if task else None, classes=task.classes if task else None,
                             block_size=manifest.block_size))
    verification = verify_reload(row, rescored)
    final = {k: row.get(k) for k in (metrics.STEP, metrics.TOKENS, metrics.DOMAIN_PPL, metrics.GENERAL_PPL,
                                     metrics.F1, metrics.F1_SD, metrics.ACCURACY, metrics.DOMAIN_FRACTION,
                                     metrics.TRAIN_LOSS)}
    for name in (metrics.DOMAIN_PPL, metrics.GENERAL_PPL, metrics.F1):
        final.update({name + suffix: row.get(name + suffix) for suffix in (metrics.CI_LOW, metrics.CI_HIGH)})
    final["eval/f1_per_class"] = {k.rsplit("/", 1)[1]: v for k, v in row.items()
                                  if k.startswith(metrics.F1_CLASS_PREFIX) and v is not None and not pd.isna(v)}
    card = {
        "model": "continued pre-training of " + cfg.model.source,
        "trial_id": row["trial_id"],
        "selection": {"rule": to_dict(cfg)["select"], "reasons": selection.reasons, "flagged": selection.flagged,
                      "beats_base": selection.beats_base, "verdict": selection.verdict},
        "hyperparameters": {k.removeprefix(HP_PREFIX): v for k, v in row.items() if k.startswith(HP_PREFIX)},
        "metrics": final,
        "test": _scalars(test),
        "base": _scalars({k: v for k, v in base.items() if k.startswith(metrics.BASE_PREFIX)}),
        "lift": {k: v for k, v in row.items() if k.startswith(metrics.LIFT_PREFIX)},
        "test_verdict": verdict_on_test(test),
        "data_mix": {"mix_ratio": trial_cfg.train.mix_ratio, "realised_domain_fraction":
                     row.get(metrics.DOMAIN_FRACTION), "domain": cfg.data.domain, "general": cfg.data.general,
                     "domain_stats": manifest.to_dict()["domain"], "general_stats": manifest.to_dict()["general"],
                     "block_size": trial_cfg.data.block_size,
                     "task_duplicates_removed": task.duplicates_removed if task else None},
        "verification": verification,
        "config": to_dict(trial_cfg),
        "seed": {"data": trial_cfg.data.seed, "train": trial_cfg.train.seed},
        "versions": _versions(),
        "lineage": {"base_model": cfg.model.source, "base_model_dir": manifest.model_source,
                    "checkpoint": str(checkpoint), "experiment_dir": str(exp_dir)},
        "compute": {"sweep": compute or {}, "winner": {k: v for k, v in row.items() if k.startswith("compute/")}},
    }
    write_json(export / CARD_FILE, card)
    (export / "README.md").write_text(_card_markdown(card))
    if not verification["ok"]:
        raise ExportCheckError(f"the exported model in {export} does not reproduce its trial's numbers "
                               f"({verification['problem']}); the card records both (verification)")
    if token:  # only a verified export is published
        card["hub"] = push_to_hub(export, cfg.export.push_to_hub, token)
    return card


RESCORE_RTOL = 1e-3
"""The reloaded export's validation ppl must match what its trial reported to this relative tolerance."""


def verify_reload(reported: dict[str, Any], rescored: dict[str, Any]) -> dict[str, Any]:
    """Reported vs re-scored validation perplexities of the exported model (domain and general), within
    RESCORE_RTOL relative. (The probe is then scored once, on the test split, from the reloaded export.)"""
    checks, problems = {}, []
    for name in (metrics.DOMAIN_PPL, metrics.GENERAL_PPL):
        want, got = num(reported.get(name)), num(rescored.get(name))
        if math.isnan(want) and math.isnan(got):
            continue
        diff = abs(got - want) / (abs(want) or 1.0)
        checks[metrics.short_name(name)] = {"reported": want, "reloaded": got, "difference": diff}
        if not diff <= RESCORE_RTOL:  # NaN fails too
            problems.append(f"{metrics.short_name(name)} {got:.4f} vs reported {want:.4f}")
    legacy = checks.get("domain_ppl", {})
    return {"ok": not problems, "problem": "; ".join(problems), "checks": checks,
            "reloaded_domain_ppl": legacy.get("reloaded"), "reported_domain_ppl": legacy.get("reported"),
            "relative_difference": legacy.get("difference")}


def verdict_on_test(test: dict[str, Any]) -> str:
    """The winner against the base model on the test split, in plain words."""
    lift = metrics.TEST_PREFIX + metrics.LIFT_PREFIX + "f1"
    value, low, high = (num(test.get(lift + suffix)) for suffix in ("", metrics.CI_LOW, metrics.CI_HIGH))
    if math.isnan(value):
        return ""
    interval = f"{value:+.3f} F1, 95% CI [{low:+.3f}, {high:+.3f}] on {_n_test(test)} test texts"
    if low > 0:
        return f"significant lift over the base model on test: {interval}"
    if high < 0:
        return f"negative: worse than the base model on test: {interval}"
    return f"not significant: the test F1 lift over the base model is within noise ({interval})"


def _n_test(test: dict[str, Any]) -> int:
    return len(test.get(metrics.test_name(metrics.PREDICTIONS)) or [])


def _scalars(values: dict[str, Any]) -> dict[str, Any]:
    """Metrics without their long per-text / per-block lists (kept in the trial's results, not the card)."""
    return {k: v for k, v in values.items() if not isinstance(v, (list, tuple))}


def _with_ci(values: dict[str, Any], name: str, digits: int) -> str:
    return interval_text(values, name, lambda v: fixed(v, digits))


def _card_markdown(card: dict[str, Any]) -> str:
    t, b = card["test"], card["base"]
    rows = "\n".join(
        f"| {label} | {_with_ci(b, metrics.base_name(metrics.test_name(name)), digits)} | "
        f"{_with_ci(t, metrics.test_name(name), digits)} | "
        f"{_with_ci(t, metrics.TEST_PREFIX + metrics.lift_name(name), 3)} |"
        for label, name, digits in (("domain held-out ppl", metrics.DOMAIN_PPL, 2),
                                    ("general held-out ppl", metrics.GENERAL_PPL, 2),
                                    ("downstream macro-F1", metrics.F1, 4)))
    hp = "\n".join(f"| {k} | {v} |" for k, v in card["hyperparameters"].items())
    return f"""# {card['model']}

Exported by raycpt from trial `{card['trial_id']}`. {' '.join(card['selection']['reasons'])}

On the test split (texts and blocks no trial, probe fit or selection saw), with 95% bootstrap intervals:

| metric | base | this model | paired difference |
|---|---|---|---|
{rows}

{card['test_verdict'] or ''} {card['selection'].get('verdict') or ''}

| hyperparameter | value |
|---|---|
{hp}

Data: domain `{card['data_mix']['domain']}`, general `{card['data_mix']['general']}`, mix ratio
{card['data_mix']['mix_ratio']} (realised {fixed(card['data_mix']['realised_domain_fraction'], 3)}).

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("<this dir>")
tokenizer = AutoTokenizer.from_pretrained("<this dir>")
```

Versions: {json.dumps(card['versions'])}
"""
