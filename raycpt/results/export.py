"""Export the winner: copy its checkpoint's weights into <exp>/export with the tokenizer and a card
(raycpt_card.json + README.md: metrics vs base, hyperparameters, data mix, versions, lineage), then reload the
export and check that it scores the reported held-out perplexity."""

from __future__ import annotations

import importlib.metadata
import json
import platform
import shutil
from pathlib import Path
from typing import Any

import pandas as pd

from raycpt.core import metrics
from raycpt.core.config import CONFIG_FILE, ExperimentConfig, config_from_dict, to_dict
from raycpt.core.data import load_blocks
from raycpt.core.errors import InputError
from raycpt.core.evaluate import heldout_loss, perplexity
from raycpt.core.files import read_json, write_json
from raycpt.core.models import load_model, load_tokenizer
from raycpt.core.prepare import Manifest
from raycpt.results.collect import HP_PREFIX
from raycpt.results.format import fixed, num, relative_change
from raycpt.results.select import Selection

EXPORT_DIR = "export"
CARD_FILE = "raycpt_card.json"
EXPORT_FILES = ("config.json", "generation_config.json", "model.safetensors")


def _versions() -> dict[str, str]:
    """Versions of what trained and scored the model (read from package metadata: nothing is imported)."""
    packages = ("raycpt", "torch", "transformers", "ray", "datasets", "scikit-learn")
    return {**{name: importlib.metadata.version(name) for name in packages}, "python": platform.python_version()}


def export_winner(exp_dir: Path, cfg: ExperimentConfig, row: dict[str, Any], base: dict[str, Any],
                  selection: Selection, *, force: bool = False) -> dict[str, Any]:
    """Copy the winner's checkpoint into <exp>/export (safetensors + tokenizer + card), then reload it and check
    that it scores the reported held-out ppl."""
    checkpoint = Path(str(row.get(metrics.CHECKPOINT_PATH) or ""))
    if not (checkpoint / "model.safetensors").exists():
        raise InputError(f"trial {row['trial_id']}: its checkpoint {checkpoint} is missing; cannot export it")
    export = exp_dir / EXPORT_DIR
    if export.exists() and any(export.iterdir()):
        if not force:
            raise InputError(f"{export} already holds an export; pass --force to overwrite it")
        shutil.rmtree(export)
    export.mkdir(parents=True)
    for name in EXPORT_FILES:
        if (checkpoint / name).exists():
            shutil.copy2(checkpoint / name, export / name)
    load_tokenizer(cfg.model.source, cfg.model.trust_remote_code).save_pretrained(export)

    trial_cfg = config_from_dict(read_json(checkpoint / CONFIG_FILE))
    manifest = Manifest.load(exp_dir)
    model = load_model(str(export), trust_remote_code=False)
    reloaded = perplexity(heldout_loss(model, load_blocks(manifest.domain.heldout),
                                       batch_size=trial_cfg.train.batch_size))
    reported = num(row.get(metrics.DOMAIN_PPL))
    final = {k: row.get(k) for k in (metrics.STEP, metrics.TOKENS, metrics.DOMAIN_PPL, metrics.GENERAL_PPL,
                                     metrics.F1, metrics.F1_SD, metrics.ACCURACY, metrics.DOMAIN_FRACTION,
                                     metrics.TRAIN_LOSS)}
    final["eval/f1_per_class"] = {k.rsplit("/", 1)[1]: v for k, v in row.items()
                                  if k.startswith(metrics.F1_CLASS_PREFIX) and v is not None and not pd.isna(v)}
    card = {
        "model": "continued pre-training of " + cfg.model.source,
        "trial_id": row["trial_id"],
        "selection": {"rule": to_dict(cfg)["select"], "reasons": selection.reasons, "flagged": selection.flagged},
        "hyperparameters": {k.removeprefix(HP_PREFIX): v for k, v in row.items() if k.startswith(HP_PREFIX)},
        "metrics": final,
        "base": {k: v for k, v in base.items() if k.startswith(metrics.BASE_PREFIX)},
        "lift": {metrics.short_name(name): relative_change(row.get(name), base.get(metrics.base_name(name)))
                 for name in (metrics.DOMAIN_PPL, metrics.F1, metrics.GENERAL_PPL)},
        "data_mix": {"mix_ratio": trial_cfg.train.mix_ratio, "realised_domain_fraction":
                     row.get(metrics.DOMAIN_FRACTION), "domain": cfg.data.domain, "general": cfg.data.general,
                     "domain_stats": manifest.to_dict()["domain"], "general_stats": manifest.to_dict()["general"],
                     "block_size": trial_cfg.data.block_size},
        "verification": {"reloaded_domain_ppl": reloaded, "reported_domain_ppl": reported,
                         "relative_difference": abs(reloaded - reported) / reported if reported else None},
        "config": to_dict(trial_cfg),
        "seed": {"data": trial_cfg.data.seed, "train": trial_cfg.train.seed},
        "versions": _versions(),
        "lineage": {"base_model": cfg.model.source, "base_model_dir": manifest.model_source,
                    "checkpoint": str(checkpoint), "experiment_dir": str(exp_dir)},
    }
    write_json(export / CARD_FILE, card)
    (export / "README.md").write_text(_card_markdown(card))
    return card


def _card_markdown(card: dict[str, Any]) -> str:
    m, b = card["metrics"], card["base"]
    hp = "\n".join(f"| {k} | {v} |" for k, v in card["hyperparameters"].items())
    return f"""# {card['model']}

Exported by raycpt from trial `{card['trial_id']}`. {' '.join(card['selection']['reasons'])}

| metric | base | this model |
|---|---|---|
| domain held-out ppl | {fixed(b.get('base/domain_ppl'))} | {fixed(m.get('eval/domain_ppl'))} |
| general held-out ppl | {fixed(b.get('base/general_ppl'))} | {fixed(m.get('eval/general_ppl'))} |
| downstream macro-F1 | {fixed(b.get('base/f1'), 4)} | {fixed(m.get('eval/f1'), 4)} |

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
