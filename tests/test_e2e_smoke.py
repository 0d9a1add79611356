"""The smoke sweep end to end on local Ray (2 CPUs): every trial reports, ASHA stops one, the export reloads and
reproduces its reported perplexity, and each trial's realised domain share matches its mix_ratio."""

from pathlib import Path

import pytest

from raycpt.core.files import read_json
from raycpt.core.prepare import Manifest
from tests.conftest import SECRETS


@pytest.mark.e2e
def test_every_trial_reported_and_asha_stopped_one(smoke_sweep):
    cfg, summary = smoke_sweep
    trials = summary.trials
    assert len(trials) == 3
    assert all(t["reports"] >= 1 and t["eval/domain_ppl"] is not None for t in trials)
    assert any(t["status"] == "stopped" for t in trials)
    assert any(t["status"] == "finished" for t in trials)
    winner = next(t for t in trials if t["trial_id"] == summary.winner)
    assert winner["status"] == "finished"
    assert winner["eval/domain_ppl"] < summary.base["base/domain_ppl"]


@pytest.mark.e2e
def test_realised_domain_share_matches_mix_ratio(smoke_sweep):
    _, summary = smoke_sweep
    for t in summary.trials:
        assert abs(t["data/domain_fraction"] - t["hp/train.mix_ratio"]) <= 0.02


@pytest.mark.e2e
def test_export_reloads_and_reproduces_reported_ppl(smoke_sweep):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raycpt.core.data import load_blocks
    from raycpt.core.evaluate import heldout_loss, perplexity

    cfg, summary = smoke_sweep
    export = Path(summary.export)
    assert (export / "model.safetensors").exists() and (export / "tokenizer.json").exists()
    card = read_json(export / "raycpt_card.json")
    for key in ("config", "hyperparameters", "metrics", "base", "data_mix", "versions", "seed", "lineage"):
        assert key in card
    model = AutoModelForCausalLM.from_pretrained(export)
    AutoTokenizer.from_pretrained(export)
    manifest = Manifest.load(cfg.experiment_dir())
    ppl = perplexity(heldout_loss(model, load_blocks(manifest.domain.heldout),
                                  batch_size=card["config"]["train"]["batch_size"]))
    reported = card["metrics"]["eval/domain_ppl"]
    assert abs(ppl - reported) / reported <= 1e-3
    assert card["hyperparameters"]["train.lr"] == pytest.approx(card["config"]["train"]["lr"])


@pytest.mark.e2e
def test_card_carries_f1_and_lift(smoke_sweep):
    _, summary = smoke_sweep
    card = read_json(Path(summary.export) / "raycpt_card.json")
    assert 0.0 <= card["metrics"]["eval/f1"] <= 1.0
    assert 0.0 <= card["base"]["base/f1"] <= 1.0
    assert set(card["metrics"]["eval/f1_per_class"]) == {"fresh", "rotten"}
    assert card["lift"]["f1"] is not None and card["metrics"]["eval/accuracy"] is not None
    assert card["data_mix"]["domain_stats"]["removed_for_leakage"] >= 200  # the 200 downstream test texts


@pytest.mark.e2e
def test_no_secret_reaches_the_experiment_dir(smoke_sweep):
    cfg, _ = smoke_sweep
    for path in cfg.experiment_dir().rglob("*"):
        if path.is_file() and path.stat().st_size < 50_000_000:
            data = path.read_bytes()
            for value in SECRETS.values():
                assert value.encode() not in data, f"{value} leaked into {path}"
