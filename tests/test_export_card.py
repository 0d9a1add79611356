"""A hub-ready export: the card's README.md has the front matter the hub reads (huggingface_hub.ModelCard loads it
back), and the weights are written in export.dtype, by default the base model's (a bf16 base exports bf16, half
the bytes of fp32), reloading to the numbers the trial reported. No Ray: a 2-step trial of a tiny Llama."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors import safe_open

from raycpt.core import metrics
from raycpt.core.config import config_from_dict, load_config, to_dict, with_overrides
from raycpt.core.data.blocks import load_blocks
from raycpt.core.errors import ConfigError
from raycpt.core.eval.evaluate import heldout_loss
from raycpt.core.model.loading import load_model
from raycpt.core.train.checkpoint import load_checkpoint_model
from raycpt.results.export import CARD_TAGS, base_model_metadata, card_metadata, export_winner, write_weights
from raycpt.results.select import Selection
from tests.conftest import finished_trial, save_tiny_llama

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bf16_base(tmp_path_factory, tokenizer) -> Path:
    """A 2-layer Llama saved in bfloat16 (as most hub models are), with a card naming its license."""
    path = save_tiny_llama(tmp_path_factory.mktemp("bf16-llama"), tokenizer, torch.bfloat16)
    (path / "README.md").write_text("---\nlicense: apache-2.0\n---\n\n# a tiny bf16 Llama\n")
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
    return path


@pytest.fixture(scope="module")
def exported(bf16_base, tmp_path_factory):
    """A finished 2-step trial (fp32 weights, the default model.dtype) of the bf16 base, exported."""
    from tests.conftest import write_corpora

    tmp = tmp_path_factory.mktemp("export")
    cfg = config_from_dict({
        "name": "card", "storage_path": str(tmp / "runs"), "model": {"source": str(bf16_base)},
        "data": {**write_corpora(tmp), "block_size": 32, "heldout_fraction": 0.1,
                 "heldout_blocks": 4},
        "train": {"lr": 3e-3, "steps": 2, "batch_size": 4, "eval_every": 2, "warmup_steps": 1, "mix_ratio": 0.75},
    })
    exp_dir, manifest, row = finished_trial(cfg)
    card = export_winner(exp_dir, cfg, row, {}, Selection("t1"))
    return cfg, manifest, row, card, exp_dir / "export"


def tensor_dtypes(export: Path) -> set[str]:
    dtypes = set()
    for path in export.glob("*.safetensors"):
        with safe_open(path, "pt") as f:
            dtypes |= {str(f.get_slice(name).get_dtype()) for name in f.keys()}
    return dtypes


def test_the_card_has_the_front_matter_the_hub_reads(exported):
    _, _, _, _, export = exported
    card = ModelCard.load(export / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert card.data.tags == CARD_TAGS
    assert card.data.license == "apache-2.0"  # the local base's own card
    assert card.data.base_model is None  # a local dir that is not a hub snapshot: no hub id to name
    assert card.data.datasets is None  # jsonl files, not hub datasets
    # the human part is kept, below the front matter
    assert card.text.lstrip().startswith("# continued pre-training of") and "| hyperparameter | value |" in card.text
    assert "Weights: safetensors in bfloat16 (export.dtype auto: the base model's dtype)." in card.text


def test_a_bf16_base_exports_bf16_weights_that_reload_to_the_trials_numbers(exported):
    cfg, manifest, row, card, export = exported
    assert tensor_dtypes(export) == {"BF16"}
    assert json.loads((export / "config.json").read_text())["dtype"] == "bfloat16"
    # the reload check (the export reloaded and scored as the trial was) passed against the trial's fp32 numbers
    assert card["verification"]["ok"], card["verification"]
    # and the export is the trained checkpoint in bf16, exactly
    blocks = load_blocks(manifest.domain.heldout)
    checkpoint_bf16 = heldout_loss(load_checkpoint_model(row[metrics.CHECKPOINT_PATH], "bfloat16"), blocks,
                                   batch_size=4)
    reloaded_bf16 = heldout_loss(load_model(str(export), "bfloat16"), blocks, batch_size=4)
    assert reloaded_bf16 == checkpoint_bf16


def test_an_explicit_export_dtype_wins_over_the_base(exported, tmp_path):
    cfg, _, row, _, _ = exported
    write_weights(Path(row[metrics.CHECKPOINT_PATH]), tmp_path, with_overrides(cfg, {"export.dtype": "float32"}))
    assert tensor_dtypes(tmp_path) == {"F32"}
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "float32"


def test_hub_ids_become_base_model_and_datasets(exported, tmp_path):
    _, _, _, card, _ = exported
    config = to_dict(with_overrides(config_from_dict(card["config"]), {
        "model.source": "HuggingFaceTB/SmolLM2-135M", "data.domain": "stanfordnlp/imdb",
        "data.general": {"path": "wikitext", "name": "wikitext-2-raw-v1", "split": "train"}}))
    readme = tmp_path / "README.md"
    from raycpt.results.export import _card_markdown

    readme.write_text(_card_markdown({**card, "config": config}))  # offline here: the hub id's license is unknown
    data = ModelCard.load(readme).data
    assert data.base_model == "HuggingFaceTB/SmolLM2-135M" and data.license is None
    assert data.datasets == ["stanfordnlp/imdb", "wikitext"] and data.library_name == "transformers"
    packaged = to_dict(with_overrides(config_from_dict(config), {"data.general": "packaged:news"}))
    assert card_metadata({**card, "config": packaged}).datasets == ["stanfordnlp/imdb"]


def test_what_is_known_of_packaged_and_local_bases(tmp_path):
    assert base_model_metadata("packaged:smollm2-135m") == {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
                                                            "license": "apache-2.0"}
    assert base_model_metadata("packaged:tiny-gpt2") == {}  # a random init: nothing on the hub
    snapshot = tmp_path / "hub" / "models--HuggingFaceTB--SmolLM2-360M" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    assert base_model_metadata(str(snapshot)) == {"base_model": "HuggingFaceTB/SmolLM2-360M"}
    (snapshot / "README.md").write_text("---\nlicense: other\nlicense_name: custom\n---\n# card\n")
    assert base_model_metadata(str(snapshot)) == {"base_model": "HuggingFaceTB/SmolLM2-360M", "license": "other",
                                                  "license_name": "custom"}
    (snapshot / "README.md").write_text("---\nlicense: [unclosed\n---\n# a hand-written card\n")
    assert base_model_metadata(str(snapshot)) == {"base_model": "HuggingFaceTB/SmolLM2-360M"}


def test_export_dtype_is_validated():
    with pytest.raises(ConfigError, match="export.dtype: 'bf16' is not allowed \\(did you mean 'bfloat16'\\?\\)"):
        load_config(ROOT / "experiments" / "smoke.yaml", ["export.dtype=bf16"])
    assert load_config(ROOT / "experiments" / "smoke.yaml").export.dtype == "auto"
