"""A new user's first hour: the bare command and --version, validate leaving the disk as it was, a broken saved
config, GPU wording, re-analysing under another rule, a Ray already running on the machine, and
experiments/own-data.yaml run end to end on small local files."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import pytest

from raycpt import __version__
from raycpt.cli import main
from raycpt.core.config import load_config
from raycpt.core.errors import InputError
from raycpt.core.resources import trial_concurrency
from tests.conftest import DOMAIN_SENTENCES, GENERAL_SENTENCES, ROOT, write_jsonl

FIXTURE = Path(__file__).parent / "fixtures" / "smoke_sweep"


def _one_line_error(capsys, *expected: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("raycpt: error: ") and "Traceback" not in err, err
    for text in expected:
        assert text in err, err
    return err


# -- the command itself ----------------------------------------------------------------------------------------------


def test_bare_raycpt_prints_help_and_version_prints_the_version(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: raycpt") and all(c in out for c in ("sweep", "train", "analyze", "report",
                                                                        "validate", "prepare"))
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"raycpt {__version__}"


def test_validate_leaves_no_empty_runs_dir_behind(tmp_path, tiny_gpt2_dir, corpora, capsys):
    storage = tmp_path / "nested" / "runs"
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"name": "v", "storage_path": str(storage), "model": {"source": tiny_gpt2_dir},
                                  "data": {"domain": corpora["domain"], "block_size": 16},
                                  "train": {"mix_ratio": 1.0}}))
    assert main(["validate", str(config)]) == 0
    assert "OK:" in capsys.readouterr().out
    assert not (tmp_path / "nested").exists(), "validate created directories"


@pytest.mark.parametrize("command", [["report"], ["analyze"], ["sweep", "--resume"]])
def test_a_corrupted_saved_config_is_one_line_and_exit_2(tmp_path, capsys, command, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    exp = tmp_path / "smoke"
    shutil.copytree(FIXTURE, exp)
    (exp / "raycpt_config.json").write_text('{"data": {"domain": "x.txt",')  # cut off mid-write
    assert main([*command, str(exp)]) == 2
    _one_line_error(capsys, "raycpt_config.json: not valid JSON")


@pytest.mark.parametrize("workers,wording", [(1, "needs 1 GPU but the cluster has 0"),
                                             (2, "needs 2 GPUs but the cluster has 1")])
def test_gpu_shortage_is_worded_for_one_or_many(workers, wording):
    cfg = load_config(None, ["data.domain=x.jsonl", "train.mix_ratio=1", "resources.use_gpu=true",
                             f"resources.num_workers={workers}", "train.batch_size=4"])
    with pytest.raises(InputError, match=wording) as err:
        trial_concurrency(cfg, {"CPU": 16.0, "GPU": float(workers - 1)})
    assert "1 GPUs" not in str(err.value)


# -- re-analysing under another rule ---------------------------------------------------------------------------------


def test_analyze_with_another_rule_writes_new_results_and_keeps_the_earlier_ones(tmp_path, capsys):
    exp = tmp_path / "smoke"
    shutil.copytree(FIXTURE, exp)
    # the recorded finished trial's general ppl is 8361.75; put the base model's at 8000, so the default bound
    # (1.10 x 8000 = 8800) admits it and a bound of 0 (8000) excludes it
    base = json.loads((exp / "base_metrics.json").read_text())
    base["base/general_ppl"] = 8000.0
    (exp / "base_metrics.json").write_text(json.dumps(base))
    assert main(["analyze", str(exp)]) == 0
    first = json.loads((exp / "summary.json").read_text())
    plots = sorted(p.name for p in (exp / "plots").glob("*.png"))
    assert plots and first["rule"]["max_forgetting"] == pytest.approx(0.10)
    assert first["winner"].endswith("_00000") and not first["flagged"]
    capsys.readouterr()

    # under the stricter bound the only finished trial forgets too much; the recorded sweep kept no weights, so
    # there is nothing to fall back on: no winner, exit 1, and the exclusion says why
    assert main(["analyze", "--set", "select.max_forgetting=0", str(exp)]) == 1
    assert "the earlier ones are kept as summary-" in " ".join(capsys.readouterr().out.split())
    second = json.loads((exp / "summary.json").read_text())
    assert second["rule"]["max_forgetting"] == 0
    assert second["winner"] is None and second["flagged"]
    assert "forgetting: general ppl 8361.75 > bound 8000.00" in second["excluded"][first["winner"]]
    kept = list(exp.glob("summary-*.json"))
    assert len(kept) == 1 and json.loads(kept[0].read_text()) == first
    kept_plots = list(exp.glob("plots-*"))
    assert len(kept_plots) == 1 and sorted(p.name for p in kept_plots[0].glob("*.png")) == plots

    # `report` and `analyze` agree about the winner and its export under either rule
    for overrides, summary in (([], first), (["--set", "select.max_forgetting=0"], second)):
        assert main(["report", str(exp), "--format", "json", *overrides]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["selection"]["winner"] == summary["winner"]
        assert (report["export"] or {}).get("path") == summary["export"]


# -- a Ray already running on the machine ----------------------------------------------------------------------------


def test_without_ray_address_raycpt_starts_its_own_local_ray(monkeypatch):
    """`ray start --head` on the machine: ray.init(num_cpus=...) alone would attach to it and raise "When connecting
    to an existing cluster, num_cpus and num_gpus must not be provided". address="local" starts a separate one."""
    import ray

    from raycpt.edge import session

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(("init", kwargs)))
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append(("shutdown", {})))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with session.ray_session(num_cpus=2):
        pass
    (name, kwargs), shutdown = calls
    assert name == "init" and kwargs["address"] == "local" and kwargs["num_cpus"] == 2
    assert shutdown[0] == "shutdown", "the Ray this process started is shut down"

    calls.clear()
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    with session.ray_session(num_cpus=2):
        pass
    assert calls == [("init", {"address": "ray://head:10001", "log_to_driver": False})]  # joined, left running


# -- experiments/own-data.yaml end to end ----------------------------------------------------------------------------


def test_own_data_config_trains_on_local_files_and_domain_ppl_falls(tmp_path, tiny_gpt2_dir, capsys):
    corpus = write_jsonl(tmp_path / "my-corpus.jsonl", [f"{s} Note {i}." for i in range(40) for s in DOMAIN_SENTENCES])
    general = write_jsonl(tmp_path / "news.jsonl", [f"{s} Item {i}." for i in range(40) for s in GENERAL_SENTENCES])
    task = tmp_path / "my-task.csv"
    with task.open("w", newline="") as fh:  # the column names own-data.yaml expects
        writer = csv.writer(fh)
        writer.writerow(["review", "sentiment"])
        for i in range(90):
            good = i % 2 == 0
            writer.writerow([f"Review {i}: {'a moving, luminous film' if good else 'a dull, clumsy mess'}.",
                             "fresh" if good else "rotten"])
    config = ROOT / "experiments" / "own-data.yaml"
    overrides = [f"model.source={tiny_gpt2_dir}", f"data.domain={corpus}", f"data.general={general}",
                 f"eval.task={task}", f"storage_path={tmp_path / 'runs'}", "train.steps=8", "train.eval_every=2",
                 "train.lr=3e-3", "data.block_size=32", "data.heldout_blocks=4", "eval.train_size=40",
                 "eval.val_size=20", "eval.test_size=20", "eval.max_length=32"]
    assert main(["train", str(config), "--no-ray", *(a for o in overrides for a in ("--set", o))]) == 0
    out = " ".join(capsys.readouterr().out.split())
    ppl = [float(v) for v in re.findall(r"step \d+: train loss [\d.]+, domain ppl ([\d.]+)", out)]
    assert len(ppl) == 4 and ppl[-1] < ppl[0], out
    assert "F1" in out  # the csv task's probe ran at the last step
    kept = [p.name for p in (tmp_path / "runs").rglob("checkpoint_step*")]
    assert kept == ["checkpoint_step000008"], kept  # the newest checkpoint only: a long run cannot fill the disk
