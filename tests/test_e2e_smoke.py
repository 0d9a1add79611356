"""The smoke sweep end to end on local Ray (2 CPUs): every trial reports, ASHA stops one, the export reloads and
reproduces its reported perplexity, and each trial's realised domain share matches its mix_ratio."""

import json
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

    from raycpt.core.data.blocks import load_blocks
    from raycpt.core.eval.evaluate import heldout_loss, perplexity

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
def test_card_and_report_carry_test_numbers_lifts_and_intervals(smoke_sweep, capsys):
    from raycpt.cli import main

    cfg, summary = smoke_sweep
    card = read_json(Path(summary.export) / "raycpt_card.json")
    assert 0.0 <= card["metrics"]["eval/f1"] <= 1.0 and 0.0 <= card["base"]["base/f1"] <= 1.0
    assert set(card["metrics"]["eval/f1_per_class"]) == {"fresh", "rotten"}
    for name in ("test/f1", "test/domain_ppl", "test/general_ppl", "test/lift/f1", "test/lift/domain_ppl"):
        low, value, high = card["test"][name + "_ci_low"], card["test"][name], card["test"][name + "_ci_high"]
        assert low <= value <= high, name
    for name in ("lift/f1", "lift/domain_ppl", "lift/general_ppl"):
        assert card["lift"][name + "_ci_low"] <= card["lift"][name] <= card["lift"][name + "_ci_high"], name
    assert card["test_verdict"].split(":")[0] in ("significant lift over the base model on test", "not significant",
                                                  "negative")
    assert card["verification"]["ok"] and card["verification"]["checks"]["general_ppl"]["difference"] <= 1e-3
    assert card["verification"]["checks"]["f1"]["difference"] <= 1e-3  # F1 re-scored from the reloaded export
    assert card["metrics"]["train/loss_impl"] == "hf"  # the loss the trial ran (auto on CPU: hf)
    # the 200 validation + 200 test texts of the task were removed from the domain corpus
    assert card["data_mix"]["domain_stats"]["removed_for_leakage"] >= 400
    assert main(["report", str(cfg.experiment_dir()), "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["test"]["test/f1"] == card["test"]["test/f1"] and report["test_verdict"] == card["test_verdict"]
    winner = next(t for t in report["trials"] if t["winner"])
    assert winner["f1_ci_low"] <= winner["f1"] <= winner["f1_ci_high"]
    assert winner["lift"]["f1"] == pytest.approx(card["lift"]["lift/f1"])


@pytest.mark.e2e
def test_an_export_that_does_not_reproduce_its_numbers_fails_the_command(smoke_sweep, tmp_path, monkeypatch,
                                                                          capsys):
    """The re-score check can fail: a reload scoring 1% off ends `raycpt analyze --export` with exit 1."""
    import shutil

    from raycpt.cli import main
    from raycpt.results import export

    cfg, _ = smoke_sweep
    copy = tmp_path / "smoke"
    shutil.copytree(cfg.experiment_dir(), copy)
    real = export.score_model

    def off_by_one_percent(*args, **kwargs):
        scores = real(*args, **kwargs)
        return {k: v * 1.01 if k == "eval/domain_ppl" else v for k, v in scores.items()}

    monkeypatch.setattr(export, "score_model", off_by_one_percent)
    assert main(["analyze", str(copy), "--export", "--force"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("raycpt: export check failed:") and "domain_ppl" in err and "\n" not in err
    assert read_json(copy / "export" / "raycpt_card.json")["verification"]["ok"] is False


@pytest.mark.e2e
def test_no_secret_reaches_the_experiment_dir(smoke_sweep):
    cfg, _ = smoke_sweep
    for path in cfg.experiment_dir().rglob("*"):
        if path.is_file() and path.stat().st_size < 50_000_000:
            data = path.read_bytes()
            for value in SECRETS.values():
                assert value.encode() not in data, f"{value} leaked into {path}"


@pytest.mark.e2e
def test_a_bound_no_trial_meets_exports_a_flagged_winner_that_has_weights(smoke_sweep, tmp_path, capsys):
    """Every finished trial breaks the forgetting bound (the base model's general ppl set far below theirs): the
    fallback picks among trials whose weights were kept (ASHA-stopped ones lost theirs), exports it and flags it."""
    import shutil

    from raycpt.cli import main
    from raycpt.core.train.checkpoint import has_weights

    cfg, _ = smoke_sweep
    copy = tmp_path / "smoke"
    shutil.copytree(cfg.experiment_dir(), copy)
    base = read_json(copy / "base_metrics.json")
    base["base/general_ppl"] = 1.0
    (copy / "base_metrics.json").write_text(json.dumps(base))
    assert main(["analyze", str(copy), "--export", "--force"]) == 0
    summary = read_json(copy / "summary.json")
    assert summary["flagged"] and summary["winner"] is not None
    assert all("forgetting" in why or "stopped" in why for why in summary["excluded"].values())
    winner = next(t for t in summary["trials"] if t["trial_id"] == summary["winner"])
    assert winner["status"] == "finished" and has_weights(winner["checkpoint_path"])
    card = read_json(copy / "export" / "raycpt_card.json")
    assert card["selection"]["flagged"] and card["trial_id"] == summary["winner"] and card["verification"]["ok"]
    assert (copy / "export" / "model.safetensors").exists()
