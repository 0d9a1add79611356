"""Export the winner: copy its checkpoint's weights into <exp>/export with the tokenizer and a card
(raycpt_card.json + README.md: metrics vs base, hyperparameters, data mix, versions, lineage), then reload the
export and check that it reproduces the trial's validation ppl and F1; with `export.push_to_hub`, upload it after that
check passed. A LoRA winner is exported merged into full weights (loads without PEFT), its adapter optionally
beside them (`export.adapter`)."""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import re
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from raycpt.core import metrics
from raycpt.core.config import CONFIG_FILE, DTYPES, ExperimentConfig, config_from_dict, to_dict
from raycpt.core.data.sources import _is_local
from raycpt.core.errors import ExportCheckError, InputError
from raycpt.core.files import read_json, write_json
from raycpt.core.model.loading import load_model, load_tokenizer, resolve_model_source
from raycpt.core.prepare import Manifest, score_model
from raycpt.core.train.checkpoint import has_weights, write_hf_weights
from raycpt.results.collect import HP_PREFIX
from raycpt.results.compare import paired_lifts
from raycpt.results.format import fixed, interval_text, num, splitless_label, splitless_names
from raycpt.results.select import Selection

EXPORT_DIR = "export"
CARD_FILE = "raycpt_card.json"
ADAPTER_DIR = "adapter"
"""export.adapter: the LoRA winner's unmerged PEFT adapter, inside the export dir."""
HF_TOKEN_ENV = "HF_TOKEN"
CARD_TAGS = ["raycpt", "continued-pretraining", "domain-adaptation"]
"""The hub tags of every export's card."""
PACKAGED_BASES = {"packaged:smollm2-135m": ("HuggingFaceTB/SmolLM2-135M-Instruct", {"license": "apache-2.0"})}
"""A packaged model's hub original and its license (packaged:tiny-gpt2 is a random init: no base on the hub)."""


def base_dtype(source: str) -> str:
    """The base model's own dtype as its config.json names it (`dtype`, `torch_dtype` before transformers 4.56);
    float32 when it names none, or one an export cannot be written in."""
    from transformers import PretrainedConfig

    try:
        config, _ = PretrainedConfig.get_config_dict(resolve_model_source(source))
    except (OSError, ValueError):  # a hub id whose config is neither cached nor reachable
        return "float32"
    name = str(config.get("dtype") or config.get("torch_dtype") or "").removeprefix("torch.")
    return name if name in DTYPES else "float32"


def export_dtype(cfg: ExperimentConfig) -> str:
    """export.dtype, with auto resolved to the base model's dtype (`base_dtype`)."""
    return base_dtype(cfg.model.source) if cfg.export.dtype == "auto" else cfg.export.dtype


def write_weights(checkpoint: Path, export: Path, cfg: ExperimentConfig) -> None:
    """The checkpoint's model as HF safetensors in `export`, in `export.dtype` (auto: the base model's) and in files
    of at most `export.max_shard_size` (model.safetensors, or model-0000k-of-0000n.safetensors +
    model.safetensors.index.json), with config.json (naming that dtype) and generation_config.json. Any checkpoint
    format, gathered by core.train.checkpoint.write_hf_weights: a ddp save_pretrained dir, an fsdp checkpoint's DCP
    shards (on CPU, no process group; needs the whole model's memory), or a LoRA adapter merged into its base
    (merged in the run's model.dtype, then cast). With `export.adapter`, a LoRA checkpoint's adapter is also copied
    to `export/adapter/`."""
    write_hf_weights(checkpoint, export, load_dtype=cfg.model.dtype, dtype=export_dtype(cfg),
                     max_shard_size=cfg.export.max_shard_size, trust_remote_code=cfg.model.trust_remote_code,
                     adapter_dir=export / ADAPTER_DIR if cfg.export.adapter else None)


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
                  selection: Selection, *, force: bool = False, compute: dict[str, Any] | None = None,
                  export_dir: Path | None = None, lineage: dict[str, Any] | None = None) -> dict[str, Any]:
    """Copy the winner's checkpoint into <exp>/export (safetensors + tokenizer + card), then reload it and check
    that it reproduces the reported validation ppl and F1. `compute`: the sweep's compute accounting, recorded in
    the card with the winner's own `compute/...` numbers. `export_dir` (default <exp>/export) and `lineage` (added
    to the card's): `raycpt extend` exports its continued run this way (raycpt.results.extension)."""
    checkpoint = Path(str(row.get(metrics.CHECKPOINT_PATH) or ""))
    if not has_weights(checkpoint):
        raise InputError(f"trial {row['trial_id']}: its checkpoint {checkpoint} is missing; cannot export it")
    token = hub_token(cfg)  # a missing HF_TOKEN fails here, before anything is written or uploaded
    export = Path(export_dir) if export_dir else exp_dir / EXPORT_DIR
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
    model = load_model(str(export), trial_cfg.model.dtype, trust_remote_code=False)  # as the trial held it
    # the exported model, on the trials' device and precision: the validation blocks and texts again (their ppl
    # and F1 must match what the trial reported) and, once, the test parts
    scored = score_model(model, trial_cfg, manifest, device=device, probe_splits=("val", "test"),
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
                                     metrics.TRAIN_LOSS, metrics.LOSS_IMPL, metrics.PROMPT_F1,
                                     metrics.PROMPT_ACCURACY)}
    for name in (metrics.DOMAIN_PPL, metrics.GENERAL_PPL, metrics.F1, metrics.PROMPT_F1):
        final.update({name + suffix: row.get(name + suffix) for suffix in (metrics.CI_LOW, metrics.CI_HIGH)})
    final.update({k: v for k, v in row.items() if k.startswith(metrics.SPLITLESS_PREFIXES)
                  and v is not None and not isinstance(v, (list, dict)) and not pd.isna(v)})  # lm-eval, generation
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
        "test_verdict": verdict_on_test(test, cfg.select.metric),
        "data_mix": {"mix_ratio": trial_cfg.train.mix_ratio, "realised_domain_fraction":
                     row.get(metrics.DOMAIN_FRACTION), "domain": cfg.data.domain, "general": cfg.data.general,
                     "domain_stats": manifest.to_dict()["domain"], "general_stats": manifest.to_dict()["general"],
                     "block_size": trial_cfg.data.block_size,
                     "task_duplicates_removed": task.duplicates_removed if task else None,
                     # data.synthetic (the rewrites of raycpt augment): only when the sweep had one
                     **({"synthetic": cfg.synthetic_source(), "synthetic_ratio": trial_cfg.train.synthetic_ratio,
                         "realised_synthetic_fraction": row.get(metrics.SYNTHETIC_FRACTION),
                         "synthetic_stats": manifest.to_dict()["synthetic"]} if manifest.synthetic else {})},
        "verification": verification,
        "config": to_dict(trial_cfg),
        "seed": {"data": trial_cfg.data.seed, "train": trial_cfg.train.seed},
        "versions": _versions(),
        "lineage": {"base_model": cfg.model.source, "base_model_dir": manifest.model_source,
                    "checkpoint": str(checkpoint), "experiment_dir": str(exp_dir), **(lineage or {})},
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
"""The reloaded export's validation ppl must match what its trial reported to this relative tolerance, and its
validation F1 to this absolute one."""


def verify_reload(reported: dict[str, Any], rescored: dict[str, Any]) -> dict[str, Any]:
    """Reported vs re-scored validation numbers of the exported model: domain and general ppl within RESCORE_RTOL
    relative, F1 (the probe fitted again on the reload's features) within RESCORE_RTOL absolute. A number the
    trial reported that the reload does not reproduce, or does not score at all, fails the check."""
    checks, problems = {}, []
    for name in (metrics.DOMAIN_PPL, metrics.GENERAL_PPL, *metrics.DOWNSTREAM):
        want, got = num(reported.get(name)), num(rescored.get(name))
        if math.isnan(want):
            continue
        diff = abs(got - want) / ((abs(want) or 1.0) if name not in metrics.DOWNSTREAM else 1.0)
        checks[metrics.short_name(name)] = {"reported": want, "reloaded": got, "difference": diff}
        if not diff <= RESCORE_RTOL:  # NaN fails too
            problems.append(f"{metrics.short_name(name)} {got:.4f} vs reported {want:.4f}")
    legacy = checks.get("domain_ppl", {})
    return {"ok": not problems, "problem": "; ".join(problems), "checks": checks,
            "reloaded_domain_ppl": legacy.get("reloaded"), "reported_domain_ppl": legacy.get("reported"),
            "relative_difference": legacy.get("difference")}


def verdict_on_test(test: dict[str, Any], metric: str = metrics.F1) -> str:
    """The winner against the base model on the test split, in plain words, on `metric` (select.metric)."""
    lift = metrics.TEST_PREFIX + metrics.lift_name(metric)
    value, low, high = (num(test.get(lift + suffix)) for suffix in ("", metrics.CI_LOW, metrics.CI_HIGH))
    if math.isnan(value):
        return ""
    label = "F1" if metric == metrics.F1 else "prompt F1"
    texts = len(test.get(metrics.test_name(metrics.DOWNSTREAM[metric])) or [])
    interval = f"{value:+.3f} {label}, 95% CI [{low:+.3f}, {high:+.3f}] on {texts} test texts"
    if low > 0:
        return f"significant lift over the base model on test: {interval}"
    if high < 0:
        return f"negative: worse than the base model on test: {interval}"
    return f"not significant: the test {label} lift over the base model is within noise ({interval})"


def _scalars(values: dict[str, Any]) -> dict[str, Any]:
    """Metrics without their long per-text / per-block lists (kept in the trial's results, not the card)."""
    return {k: v for k, v in values.items() if not isinstance(v, (list, tuple))}


def _with_ci(values: dict[str, Any], name: str, digits: int) -> str:
    return interval_text(values, name, lambda v: fixed(v, digits))


def _license_of(readme: Path) -> dict[str, str]:
    """The license fields (license, and for `other` its license_name / license_link) of a model card's front
    matter; none when there is no card, it names no license or its front matter does not parse."""
    from huggingface_hub import ModelCard

    if not readme.is_file():
        return {}
    try:
        data = ModelCard.load(readme).data
    except Exception:  # a card someone wrote by hand: its license is then just not known
        return {}
    return {k: getattr(data, k) for k in ("license", "license_name", "license_link")
            if isinstance(getattr(data, k, None), str)}


def _hub_license(repo_id: str) -> dict[str, str]:
    """A hub model's license from its card (the HF cache, else the hub); none when neither has it."""
    from huggingface_hub import hf_hub_download

    try:
        readme = Path(hf_hub_download(repo_id, "README.md"))
    except Exception:  # offline, no card, gated, a bad id: whatever it is, the license is just not known
        return {}
    return _license_of(readme)


def base_model_metadata(source: str) -> dict[str, Any]:
    """What is known of the base model for the hub: `base_model` (its hub id) and its license fields. A packaged
    model: its hub original (PACKAGED_BASES). A hub id: itself, its license from its card. A local dir: its license
    from its own README.md front matter, and its hub id when it is a snapshot in the HF cache
    (.../models--owner--name/snapshots/<revision>)."""
    if source.startswith("packaged:"):
        repo_id, license_fields = PACKAGED_BASES.get(source, (None, {}))
        return {"base_model": repo_id, **license_fields} if repo_id else {}
    path = Path(source).expanduser()
    if path.exists() or source.startswith((".", "/", "~")):  # a local dir, as resolve_model_source decides
        snapshot = re.search(r"models--([^/]+)--([^/]+)/snapshots/[^/]+$", str(path.resolve()))
        return {**({"base_model": f"{snapshot[1]}/{snapshot[2]}"} if snapshot else {}),
                **_license_of(path / "README.md")}
    return {"base_model": source, **_hub_license(source)}


def hub_datasets(data: dict[str, Any]) -> list[str]:
    """The hub dataset ids among the training corpora (data.domain and data.general): not files, not packaged."""
    ids = []
    for spec in (data.get("domain"), data.get("general")):
        path = str((spec.get("path") if isinstance(spec, dict) else spec) or "")
        if path and not path.startswith("packaged:") and not _is_local(path) and path not in ids:
            ids.append(path)
    return ids


def card_metadata(card: dict[str, Any]):
    """The card's front matter for the hub (huggingface_hub.ModelCardData): base_model and its license where
    known (base_model_metadata), library_name, pipeline_tag, tags, and the training corpora that are hub datasets."""
    from huggingface_hub import ModelCardData

    config = card["config"]
    return ModelCardData(**base_model_metadata(config["model"]["source"]), library_name="transformers",
                         pipeline_tag="text-generation", tags=list(CARD_TAGS),
                         datasets=hub_datasets(config["data"]) or None)


def _card_markdown(card: dict[str, Any]) -> str:
    """The export's README.md: YAML front matter the hub reads (card_metadata), then the card for people."""
    from huggingface_hub import ModelCard

    return str(ModelCard(f"---\n{card_metadata(card).to_yaml()}\n---\n\n{_card_text(card)}"))


def _card_text(card: dict[str, Any]) -> str:
    t, b = card["test"], card["base"]
    rows = "\n".join(
        f"| {label} | {_with_ci(b, metrics.base_name(metrics.test_name(name)), digits)} | "
        f"{_with_ci(t, metrics.test_name(name), digits)} | "
        f"{_with_ci(t, metrics.TEST_PREFIX + metrics.lift_name(name), 3)} |"
        for label, name, digits in (("domain held-out ppl", metrics.DOMAIN_PPL, 2),
                                    ("general held-out ppl", metrics.GENERAL_PPL, 2),
                                    ("downstream macro-F1 (probe)", metrics.F1, 4),
                                    ("downstream macro-F1 (prompt)", metrics.PROMPT_F1, 4))
        if t.get(metrics.test_name(name)) is not None)
    rows += "".join(  # lm-eval tasks and generation: no paired difference (scored on each task's own split)
        f"\n| {label} ({'lm-eval' if name.startswith(metrics.LM_EVAL_PREFIX) else 'generation'}) | "
        f"{_with_ci(b, metrics.base_name(metrics.test_name(name)), digits)} | "
        f"{_with_ci(t, metrics.test_name(name), digits)} | - |"
        for name in splitless_names([t], metrics.TEST_PREFIX)
        for label, digits in [splitless_label(name)])
    splitless = ("\n\nlm-eval and generation rows: each task's own evaluation data, which the selection never used "
                 "(lm-eval: ± 1.96 standard errors; generation: bootstrap over examples)."
                 if splitless_names([t], metrics.TEST_PREFIX) else "")
    hp = "\n".join(f"| {k} | {v} |" for k, v in card["hyperparameters"].items())
    return f"""# {card['model']}

Exported by raycpt from trial `{card['trial_id']}`. {' '.join(card['selection']['reasons'])}

On the test split (texts and blocks no trial, probe fit or selection saw), with 95% bootstrap intervals:

| metric | base | this model | paired difference |
|---|---|---|---|
{rows}{splitless}

{card['test_verdict'] or ''} {card['selection'].get('verdict') or ''}

| hyperparameter | value |
|---|---|
{hp}

Data: domain `{card['data_mix']['domain']}`, general `{card['data_mix']['general']}`, mix ratio
{card['data_mix']['mix_ratio']} (realised {fixed(card['data_mix']['realised_domain_fraction'], 3)}).

Weights: safetensors in {_dtype_text(card['config'])}.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("<this dir>")
tokenizer = AutoTokenizer.from_pretrained("<this dir>")
```

Versions: {json.dumps(card['versions'])}
"""


def _dtype_text(config: dict[str, Any]) -> str:
    """The exported weights' dtype in words, from the trial's config (export.dtype, auto resolved)."""
    export = config.get("export", {})
    if export.get("dtype", "auto") != "auto":
        return f"{export['dtype']} (export.dtype)"
    return f"{base_dtype(config['model']['source'])} (export.dtype auto: the base model's dtype)"
