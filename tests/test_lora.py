"""LoRA / DoRA continued pre-training (train.method: lora): the in-process loop trains the adapter only, lowers the
domain perplexity, resumes exactly, and the export merges the adapter into full weights that reload without PEFT
and reproduce the reported perplexity."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from raycpt.core.config import ExperimentConfig, config_from_dict, with_overrides
from raycpt.core.data.blocks import load_blocks
from raycpt.core.errors import ConfigError
from raycpt.core.eval.evaluate import heldout_loss
from raycpt.core.forecast.plan import plan
from raycpt.core.model.adapters import apply_lora, trainable_params
from raycpt.core.model.loading import load_model
from raycpt.core.prepare import prepare_experiment
from raycpt.core.train.checkpoint import STATE_FILE
from raycpt.core.train.loop import flops_per_token, train
from raycpt.results.export import ADAPTER_DIR, write_weights
from tests.conftest import ROOT, write_corpora

GPT2_TINY_LINEARS = {"c_attn": (64, 192), "attn.c_proj": (64, 64), "c_fc": (64, 256), "mlp.c_proj": (256, 64)}
"""(in, out) of the packaged tiny GPT-2's linear (Conv1D) layers in each of its 2 decoder layers."""


def _cfg(tmp: Path, source: str, **fields) -> ExperimentConfig:
    corpora = write_corpora(tmp)
    return config_from_dict({
        "name": "lora", "storage_path": str(tmp), "model": {"source": source},
        "data": {**corpora, "block_size": 32, "heldout_fraction": 0.1,
                 "heldout_blocks": 8},
        "train": {"method": "lora", "lr": 1e-2, "steps": 8, "batch_size": 4, "eval_every": 4, "warmup_steps": 1,
                  "mix_ratio": 0.75, **fields},
    })


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_gpt2_dir):
    """The corpora, prepared once for this file's runs."""
    tmp = tmp_path_factory.mktemp("lora")
    return tmp, prepare_experiment(_cfg(tmp, tiny_gpt2_dir))


def _run(prepared, tiny_gpt2_dir: str, name: str, **fields):
    tmp, manifest = prepared
    cfg = with_overrides(_cfg(tmp, tiny_gpt2_dir), {f"train.{k}": v for k, v in fields.items()})
    reports: list[tuple[dict, str]] = []
    train(cfg, manifest, lambda m, c: reports.append((m, c)), checkpoint_root=tmp / name)
    return cfg, manifest, reports, tmp / name


@pytest.fixture(scope="module")
def lora_run(prepared, tiny_gpt2_dir):
    """A plain LoRA trial (rank 8, all linear layers), uninterrupted, checkpoints at steps 4 and 8."""
    return _run(prepared, tiny_gpt2_dir, "lora")


@pytest.fixture(scope="module")
def dora_run(prepared, tiny_gpt2_dir):
    """DoRA, adapter dropout and the (tied) embeddings + LM head trained fully: every path PEFT takes here."""
    return _run(prepared, tiny_gpt2_dir, "dora", lora_dora=True, lora_train_embeddings=True, lora_dropout=0.1,
                lora_rank=4)


def test_lora_trains_only_the_adapter_and_lowers_domain_ppl(lora_run, tiny_gpt2_dir):
    cfg, manifest, reports, _ = lora_run
    base = load_model(tiny_gpt2_dir)
    base_ppl = math.exp(heldout_loss(base, load_blocks(manifest.domain.heldout), batch_size=8))
    assert [m["step"] for m, _ in reports] == [4, 8]
    assert reports[-1][0]["eval/domain_ppl"] < 0.9 * base_ppl

    # rank x (in + out) per adapted layer, every linear layer of both decoder layers, nothing else
    expected = 2 * sum(8 * (i + o) for i, o in GPT2_TINY_LINEARS.values())
    model = apply_lora(load_model(tiny_gpt2_dir), cfg.train)
    assert trainable_params(model) == expected
    checkpoint = Path(reports[-1][1])
    optimizer = torch.load(checkpoint / STATE_FILE, weights_only=True)["optimizer"]
    assert sum(s["exp_avg"].numel() for s in optimizer["state"].values()) == expected  # what the loop optimised
    assert (checkpoint / "adapter_model.safetensors").is_file() and not (checkpoint / "model.safetensors").exists()
    # frozen base weights count 4 FLOPs per token-param (no weight gradient), the adapter 6
    full = flops_per_token(base, 32)
    assert flops_per_token(model, 32) == pytest.approx(full - 2 * (full - 12 * 2 * 64 * 32) / 6 + 6 * expected)


def test_lora_resume_from_a_checkpoint_matches_the_uninterrupted_run(dora_run):
    cfg, manifest, reports, tmp = dora_run
    resumed = []
    train(cfg, manifest, lambda m, c: resumed.append(m), checkpoint_root=tmp / "resumed", resume_dir=reports[0][1])
    assert [m["step"] for m in resumed] == [8]
    torch.testing.assert_close(resumed[-1]["eval/domain_loss"], reports[-1][0]["eval/domain_loss"], rtol=1e-5,
                               atol=0)
    assert resumed[-1]["lr"] == pytest.approx(reports[-1][0]["lr"])


RELOAD_WITHOUT_PEFT = textwrap.dedent("""
    import json, math, sys
    sys.modules["peft"] = None  # `import peft` now fails: the export must not need it
    from transformers import AutoModelForCausalLM
    from raycpt.core.data.blocks import load_blocks
    from raycpt.core.eval.evaluate import heldout_loss
    blocks = load_blocks(sys.argv[1])
    print(json.dumps([math.exp(heldout_loss(AutoModelForCausalLM.from_pretrained(export), blocks, batch_size=8))
                      for export in sys.argv[2:]]))
""")


def test_lora_export_is_merged_full_weights_that_reload_without_peft(lora_run, dora_run):
    exports, reported = [], []
    for cfg, _, reports, tmp in (lora_run, dora_run):
        metrics, checkpoint = reports[-1]
        export = tmp / "export"
        write_weights(Path(checkpoint), export, with_overrides(cfg, {"export.adapter": True}))
        assert (export / "model.safetensors").is_file() and (export / "config.json").is_file()
        assert (export / ADAPTER_DIR / "adapter_model.safetensors").is_file()
        assert json.loads((export / ADAPTER_DIR / "adapter_config.json").read_text())["r"] == cfg.train.lora_rank
        # the tied head trained as one matrix with the embeddings (lora_train_embeddings) stays tied
        assert json.loads((export / "config.json").read_text())["tie_word_embeddings"] is True
        exports.append(str(export))
        reported.append(metrics["eval/domain_ppl"])
    out = subprocess.run([sys.executable, "-c", RELOAD_WITHOUT_PEFT, lora_run[1].domain.heldout, *exports],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == pytest.approx(reported, rel=1e-3)


@pytest.mark.parametrize("fields", [{}, {"lora_dora": True, "lora_train_embeddings": True, "lora_rank": 4},
                                    {"lora_target_modules": ["c_attn"]}])
def test_the_plan_counts_what_lora_trains(fields, tmp_path, tiny_gpt2_dir):
    cfg = _cfg(tmp_path, tiny_gpt2_dir, **fields)
    trained = trainable_params(apply_lora(load_model(tiny_gpt2_dir), cfg.train))
    result = plan(cfg)
    assert result.rows["gradients"] == trained * 4 and result.rows["AdamW state"] == 2 * trained * 4
    assert result.checkpoint_weights == trained * 4
    full = plan(with_overrides(cfg, {"train.method": "full"}))
    assert result.rows["weights"] >= full.rows["weights"] and result.total < full.total


@pytest.mark.parametrize("checkpointing", [False, True])
def test_lora_works_with_the_chunked_loss_and_activation_checkpointing(checkpointing, tmp_path, tiny_gpt2_dir):
    from raycpt.core.model.loss import causal_lm_loss, resolve_loss_impl

    model = load_model(tiny_gpt2_dir)
    if checkpointing:
        model.gradient_checkpointing_enable()
    model = apply_lora(model, _cfg(tmp_path, tiny_gpt2_dir).train)
    assert resolve_loss_impl("chunked", "cpu", model)[0] == "chunked"
    ids = torch.randint(0, 50000, (2, 16))
    chunked = causal_lm_loss(model, ids, "chunked")
    torch.testing.assert_close(chunked, causal_lm_loss(model, ids, "hf"), rtol=1e-5, atol=1e-5)
    chunked.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for n, g in grads.items() if "lora_B" in n)  # B gets gradients from step 1


def test_lora_fields_are_validated_and_sweepable(tmp_path, tiny_gpt2_dir):
    cfg = _cfg(tmp_path, tiny_gpt2_dir)
    raw = {"train.lora_rank": 0, "train.lora_dropout": 1.5, "train.method": "qlora", "export.adapter": True}
    for key, value in raw.items():
        overrides = {key: value, **({"train.method": "full"} if key == "export.adapter" else {})}
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            with_overrides(cfg, overrides)
    with pytest.raises(ConfigError, match="train.method: lora is not supported with resources.strategy=fsdp"):
        with_overrides(cfg, {"resources.strategy": "fsdp", "resources.num_workers": 2})
    from raycpt.edge.tune import search_space  # the Ray edge: imported here so the other tests never load Ray

    swept = with_overrides(cfg, {"search.space.train.lora_rank": {"loguniform": [4, 64]}})
    assert type(search_space(swept.search.space)["train.lora_rank"]).__name__ == "Integer"
