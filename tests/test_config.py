import subprocess
import sys
from pathlib import Path

import pytest

from raycpt.cli import main
from raycpt.core.config import load_config, with_overrides, with_sample
from raycpt.core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["laptop.yaml", "smoke.yaml", "own-data.yaml"])
def test_shipped_configs_are_valid(name):
    cfg = load_config(ROOT / "experiments" / name)
    assert cfg.data.domain and cfg.search.space


def test_overrides_are_typed_and_reach_the_right_field():
    cfg = load_config(ROOT / "experiments" / "laptop.yaml",
                      ["train.lr=3e-4", "train.steps=7", "search.space.train.lr={choice: [1e-4, 2e-4]}", "name=x"])
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.steps == 7 and isinstance(cfg.train.steps, int)
    assert cfg.search.space["train.lr"] == {"choice": [1e-4, 2e-4]}
    assert cfg.name == "x"
    trial = with_overrides(cfg, {"train.dropout": 0.1, "train.mix_ratio": 0.5})
    assert (trial.train.dropout, trial.train.mix_ratio, cfg.train.dropout) == (0.1, 0.5, 0.0)


def test_a_trials_sample_gives_the_config_a_full_rebuild_gives_without_rebuilding_it(monkeypatch):
    """Trials get the sweep's typed config with their sampled values applied: the same config a rebuild from the
    YAML with those values would give (types included: a choice of 1 for a float field is 1.0), while the search
    space is not validated again at each trial start."""
    import raycpt.core.config as config

    cfg = load_config(ROOT / "experiments" / "laptop.yaml")
    samples = [{"train.lr": 3.3e-4, "train.steps": 8, "train.dropout": 0.1, "train.mix_ratio": 1},
               {"train.lr": 1e-4, "train.steps": 12, "train.dropout": 0.0, "train.mix_ratio": 0.61}]
    rebuilt = [with_overrides(cfg, sample) for sample in samples]
    validations = []
    monkeypatch.setattr(config, "_validate_space", lambda *a: validations.append(a))
    for sample, expected in zip(samples, rebuilt, strict=True):
        trial = with_sample(cfg, sample)
        assert trial == expected and type(trial.train.mix_ratio) is float and type(trial.train.steps) is int
    assert validations == [] and cfg.train.lr == 2e-4, "a trial start re-validated the space or changed the sweep's"
    with pytest.raises(ConfigError, match="search.space.data.block_size: not sweepable"):
        with_sample(cfg, {"data.block_size": 64})


def test_validation_gathers_every_problem_with_the_fix(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  domain: x.txt\ntrain:\n  lrr: 1e-3\n  steps: 0\n  mix_ratio: 1.5\n"
                    "search:\n  space:\n    train.lr: {logunifrom: [1, 2]}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "train.lrr: unknown field (did you mean 'lr'?)" in message
    assert "train.steps: 0 is out of range, must be >= 1" in message
    assert "train.mix_ratio: 1.5 is out of range" in message
    assert "unknown distribution 'logunifrom' (did you mean 'loguniform'?)" in message


def test_type_errors_and_missing_domain(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  steps: many\n  compile: maybe\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "train.steps: expected an integer, got 'many'" in str(err.value)
    assert "train.compile: expected true/false" in str(err.value)
    assert "data.domain: required" in str(err.value)


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("data:\n  domain: a.txt\ntrain: [unclosed\n")
    with pytest.raises(ConfigError, match=r"line \d+, column \d+: YAML syntax error"):
        load_config(path)


def test_cli_validate_exits_2_with_one_line(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  domain: a.txt\ntrain:\n  dropout: 2\n")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("raycpt: error: train.dropout: 2.0 is out of range")
    assert main(["validate", str(ROOT / "experiments" / "smoke.yaml"), "--set", "train.lr=1e-3"]) == 0


def test_cli_bad_input_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "raycpt.cli", "sweep", str(tmp_path / "missing.yaml")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "not found" in proc.stderr
