"""Issue #14, "Sweep smarter": optuna search (seeded, resumable), compute accounting, and `raycpt analyze --suggest`
(final.yaml and next.yaml from the CPT law's recommendation; the law itself: tests/test_cpt_law.py). Fast: no Ray
trials; the recorded smoke sweep (tests/fixtures/smoke_sweep, see tests/test_report.py)."""

from __future__ import annotations

import dataclasses
import io
import json
import math
from pathlib import Path

import pytest
from rich.console import Console

from raycpt import cli
from raycpt.core.config import ExperimentConfig, SearchConfig, config_from_dict, load_config, load_saved_config
from raycpt.core.errors import ConfigError
from raycpt.results import render, suggest
from raycpt.results.accounting import describe_compute

FIXTURE = Path(__file__).parent / "fixtures" / "smoke_sweep"
SPACE = {"train.lr": {"loguniform": [1e-5, 1e-2]}, "train.mix_ratio": {"uniform": [0.3, 1.0]},
         "train.steps": {"choice": [12, 24]}}


def _raw(**search) -> dict:
    return {"data": {"domain": "packaged:rotten-tomatoes", "general": "packaged:news"},
            "search": {"space": SPACE, **search}}


# -- search.algorithm ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("search, expected", [
    ({"algorithm": "tpe"}, "search.algorithm: 'tpe' is not allowed"),
    ({"algorithm": "optuna", "space": {"train.lr": {"grid": [1e-4, 3e-4]}}},
     "search.space.train.lr: grid is not supported by search.algorithm=optuna"),
    ({"algorithm": "optuna", "space": {}}, "search.algorithm: optuna needs a search.space"),
])
def test_bad_search_algorithm_is_one_line_naming_the_field(search, expected, tmp_path, capsys):
    with pytest.raises(ConfigError, match=expected):
        config_from_dict(_raw(**search))
    path = tmp_path / "bad.yaml"
    path.write_text(json.dumps(_raw(**search)))
    assert cli.main(["validate", str(path), "--config-only"]) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1


def test_optuna_with_ranges_and_choices_validates_and_grid_stays_with_random():
    assert config_from_dict(_raw(algorithm="optuna")).search.algorithm == "optuna"
    grid = config_from_dict(_raw(space={"train.lr": {"grid": [1e-4, 3e-4]}}))
    assert grid.search.algorithm == "random"
    with pytest.raises(ConfigError, match="law.target_tokens: -1 is out of range"):
        config_from_dict({**_raw(), "law": {"target_tokens": -1}})


def _proposals(seed: int, n: int = 12) -> list[dict]:
    """n proposals of a fresh optuna searcher, each 'trial' completed with a made-up metric before the next."""
    from raycpt.edge.tune import search_algorithm, search_space

    searcher = search_algorithm(SearchConfig(space=SPACE, algorithm="optuna", seed=seed, num_samples=n), 2)
    assert searcher.set_search_properties("eval/domain_ppl", "min", {"train_loop_config": search_space(SPACE)})
    out = []
    for i in range(n):
        config = searcher.suggest(f"t{i}")
        out.append(config)
        hp = config["train_loop_config"]
        searcher.on_trial_complete(f"t{i}", {"eval/domain_ppl": 10 + abs(math.log10(hp["train.lr"]) + 3)
                                             + abs(hp["train.mix_ratio"] - 0.7), "training_iteration": 1})
    return out


def test_optuna_with_the_same_seed_proposes_the_same_configurations():
    first, again, other = _proposals(3), _proposals(3), _proposals(4)
    assert first == again
    assert first != other
    hp = first[-1]["train_loop_config"]  # nested back under train_loop_config, with the space's types
    assert set(hp) == set(SPACE) and hp["train.steps"] in (12, 24) and 1e-5 <= hp["train.lr"] <= 1e-2


def test_optuna_searcher_state_survives_a_save_and_restore(tmp_path):
    """What `Tuner.restore` does with our searcher: Tune saves it (SearchGenerator.save_to_dir) during the sweep;
    on --resume it builds it from tuner.pkl, sets the search properties and restores the saved state."""
    from ray.tune.search import SearchGenerator

    from raycpt.edge.tune import search_algorithm, search_space

    cfg = SearchConfig(space=SPACE, algorithm="optuna", seed=0, num_samples=8)
    param_space = {"train_loop_config": search_space(SPACE)}

    def fresh() -> SearchGenerator:
        searcher = search_algorithm(cfg, 2)
        searcher.set_search_properties("eval/domain_ppl", "min", param_space)
        return SearchGenerator(searcher)

    running = fresh()
    for i in range(5):
        config = running.searcher.suggest(f"t{i}")
        running.searcher.on_trial_complete(f"t{i}", {"eval/domain_ppl": config["train_loop_config"]["train.lr"] * 1e3,
                                                     "training_iteration": 1})
    running.save_to_dir(str(tmp_path), session_str="s")
    restored = fresh()
    restored.restore_from_dir(str(tmp_path))
    assert restored.searcher.suggest("t5") == running.searcher.suggest("t5")
    assert len(restored.searcher.searcher._ot_study.trials) == 6  # the 5 scored trials came back


# -- compute accounting ----------------------------------------------------------------------------------------------


def test_trained_plus_saved_is_the_full_budget_exactly(summary):
    c = summary.compute
    assert c["compute.tokens_trained"] + c["compute.tokens_saved_by_scheduler"] == c["compute.tokens_full_budget"]
    assert c["compute.tokens_not_run"] == 0 and c["compute.complete"]
    # the fixture: 3 trials of 24 steps x 8 blocks x 64 tokens; one finished, two stopped by ASHA at steps 6, 12
    assert c["compute.tokens_full_budget"] == 3 * 24 * 8 * 64
    assert c["compute.tokens_trained"] == (24 + 6 + 12) * 8 * 64
    assert c["compute.saved_by_scheduler_fraction"] == pytest.approx((18 + 12) / 72)
    assert set(c["compute.resource_seconds"]) == {"CPU"}
    for t in summary.trials:
        assert t["compute/tokens"] == t["tokens"] == t["step"] * 8 * 64
        assert t["compute/tokens"] + t["compute/tokens_saved_by_scheduler"] == t["compute/tokens_full_budget"]
        assert t["compute/cpu_s"] == pytest.approx(2.0 * t["time_total_s"])  # cpus_per_worker 2 x wall time
        assert (t["compute/cpu_s_saved_by_scheduler"] > 0) == (t["status"] == "stopped")
    assert c["compute.resource_seconds"]["CPU"] == pytest.approx(sum(t["compute/cpu_s"] for t in summary.trials))
    assert 0 < c["compute.resource_saved_by_scheduler_fraction"] < 1


def test_compute_and_recommendation_are_in_every_report_format(summary, sweep_dir, capsys):
    data = render.report_json(summary)
    assert data["compute"]["tokens_trained"] == summary.compute["compute.tokens_trained"]
    assert data["recommendation"] == summary.recommendation and "law" not in data  # the mixing law is gone
    assert all(row["compute"]["tokens_full_budget"] == 12288 for row in data["trials"])
    assert {"recommendation", "compute"} <= set(render.REPORT_SCHEMA)
    assert "compute: {tokens," in render.REPORT_SCHEMA["trial"]
    console = Console(width=120, record=True, file=io.StringIO())
    render.print_summary(console, summary)
    text = console.export_text()
    assert f"Compute: {describe_compute(summary.compute)}"[:60] in text.replace("\n", " ")
    assert "ASHA saved 15.4k tokens (42%)" in describe_compute(summary.compute)
    assert "Final run: 240 steps" in text and "Mixing law" not in text
    assert render.report_command(sweep_dir, "markdown", console) == 0
    out = capsys.readouterr().out
    assert "\nCompute: " in out and "\nFinal run: " in out


def _smoke_cfg() -> ExperimentConfig:
    return load_saved_config(FIXTURE)


# -- analyze --suggest -----------------------------------------------------------------------------------------------


def test_suggest_writes_a_final_run_and_a_narrowed_sweep_that_validate(summary, sweep_dir, capsys):
    """The recorded smoke sweep's curves (a tiny random model) are too noisy for the CPT law (leave-one-trial-out
    error over 5%): final.yaml is the fallback, says so, and carries no prediction; next.yaml is narrowed around the
    same recommendation."""
    winner = summary.trial(summary.winner)
    rec = summary.recommendation
    assert rec["source"] == "fallback"
    assert "leave-one-trial-out error" in rec["reasons"][0]
    final_path, next_path = suggest.write_suggestions(sweep_dir, _smoke_cfg(), summary)
    final, nxt = load_config(final_path), load_config(next_path)

    target = 10 * 24 * 8 * 64  # law.target_tokens 0: 10 x the largest trial budget
    assert final.search.space == {} and final.name == "smoke-final" and final.storage_path == str(sweep_dir.parent)
    assert final.train.steps == math.ceil(target / (8 * 64)) == 240
    assert final.train.eval_every == 6 * 10  # scaled by 240 / 24
    # the fallback is Ibrahim et al.'s recipe around the winner: its lr scaled by the horizon rule for 10x its
    # tokens (x 10**-0.3 = x 0.501), re-warmed over 1% of 240 steps, cosine down to 0.1 x, at least 5% replay
    assert final.train.lr == pytest.approx(winner["hp/train.lr"] * 0.5012, rel=1e-3)
    assert final.train.warmup_steps == 2 and final.train.schedule == "cosine" and final.train.min_lr_ratio == 0.1
    assert final.train.mix_ratio == pytest.approx(min(winner.get("hp/train.mix_ratio") or 0.9, 0.95))
    assert final.law.target_tokens == target
    header = final_path.read_text().split("\nmodel:")[0]
    assert "fallback" in header and "NOT the law's pick" in header and "predicts" not in header

    assert nxt.name == "smoke-next" and nxt.search.num_samples == 3  # the sweep's 3 trials (lr was a grid of 3)
    assert nxt.law.target_tokens == target
    # at the sweep's budget: the winner's own lr (the fallback's, before its horizon scaling) / 3 to x 3
    lo, hi = nxt.search.space["train.lr"]["loguniform"]
    assert lo == pytest.approx(winner["hp/train.lr"] / 3, rel=1e-2)
    assert hi == pytest.approx(winner["hp/train.lr"] * 3, rel=1e-2)
    low, high = nxt.search.space["train.mix_ratio"]["uniform"]  # the recommended mix +- 0.1, within [0, 1]
    assert low == pytest.approx(max(0.0, rec["mix_ratio"] - suggest.MIX_HALF_WIDTH), abs=1e-3)
    assert high == pytest.approx(min(1.0, rec["mix_ratio"] + suggest.MIX_HALF_WIDTH), abs=1e-3)
    header = next_path.read_text().split("\nmodel:")[0]
    assert "narrowed around the recommendation" in " ".join(header.replace("# ", "").split())
    assert "mixing law" not in header
    for path in (final_path, next_path):
        assert cli.main(["validate", str(path), "--config-only"]) == 0
    assert "OK:" in capsys.readouterr().out


def test_suggest_writes_the_laws_pick_with_its_prediction(summary, sweep_dir):
    rec = {**summary.recommendation, "source": "law", "peak_lr": 1.234e-3, "mix_ratio": 0.8, "schedule": "wsd",
           "reasons": ["lowest predicted domain loss"], "predicted_domain_loss": math.log(40.0),
           "predicted_general_loss": math.log(30.0), "domain_loss_ci": [math.log(38.0), math.log(42.0)],
           "fits": {"domain": {"loo_error": 0.01}, "general": {"loo_error": 0.02}}}
    final_path, next_path = suggest.write_suggestions(sweep_dir, _smoke_cfg(),
                                                      dataclasses.replace(summary, recommendation=rec))
    final, nxt = load_config(final_path), load_config(next_path)
    assert final.train.lr == 1.234e-3 and final.train.mix_ratio == 0.8 and final.train.schedule == "wsd"
    # the law's lr for 10x the reference trial's tokens, brought back to its tokens: 1.234e-3 x 10**0.3 = 2.462e-3;
    # / 3 to x 3, 3 digits
    assert nxt.search.space["train.lr"]["loguniform"] == [0.000821, 0.00739]
    assert nxt.search.space["train.mix_ratio"]["uniform"] == [0.7, 0.9]
    header = final_path.read_text().split("\nmodel:")[0]
    assert "predicts domain ppl 40.00 [38.00, 42.00], general ppl 30.00" in " ".join(header.replace("# ", "").split())
    assert "the CPT law's pick" in header


def test_suggest_with_nothing_to_plan_from_is_one_line_exit_2(tmp_path, capsys):
    import shutil

    exp = tmp_path / "smoke"
    shutil.copytree(FIXTURE, exp)
    (exp / "base_metrics.json").unlink()  # no base model: every curve starts at its loss, so no plan
    assert cli.main(["analyze", str(exp), "--suggest", "--set", "report.plots=false"]) == 2
    err = capsys.readouterr().err
    assert "--suggest" in err and "nothing to plan from" in err and err.count("\n") == 1
