"""What users of the peer tools expect (issue #16), besides LoRA (tests/test_lora.py): a token budget instead of
steps, fp16 with a loss scaler, and pushing the verified export to the Hugging Face Hub."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from raycpt.cli import main
from raycpt.core import metrics
from raycpt.core.config import ExperimentConfig, TrainConfig, config_from_dict, to_dict, with_overrides
from raycpt.core.errors import ConfigError, ExportCheckError, InputError
from raycpt.core.eval.evaluate import autocast_dtype
from raycpt.core.prepare import prepare_experiment
from raycpt.core.train.checkpoint import STATE_FILE
from raycpt.core.train.loop import train
from raycpt.results.accounting import trial_steps
from raycpt.results.select import Selection
from tests.conftest import SECRETS, finished_trial


def _cfg(corpora, tiny_gpt2_dir, tmp_path, **train) -> ExperimentConfig:
    return config_from_dict({
        "name": "peers", "storage_path": str(tmp_path / "runs"), "model": {"source": tiny_gpt2_dir},
        "data": {"domain": corpora["domain"], "general": corpora["general"], "block_size": 32,
                 "heldout_fraction": 0.1, "heldout_blocks": 4},
        "train": {"lr": 3e-3, "steps": 8, "batch_size": 4, "eval_every": 4, "warmup_steps": 1, "mix_ratio": 0.75,
                  **train},
    })


def _cli_error(tmp_path, cfg: ExperimentConfig, capsys, *args: str) -> str:
    """`raycpt validate` of `cfg` with `--set args`: exit 2 and one line on stderr, returned."""
    path = tmp_path / "case.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    assert main(["validate", str(path), *[a for arg in args for a in ("--set", arg)]]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


# --- token budget ------------------------------------------------------------------------------------------------

def test_a_token_budget_sets_the_steps_from_the_global_batch_and_block_size():
    assert TrainConfig(steps=24).total_steps(32) == 24
    assert TrainConfig(tokens=1000, batch_size=4).total_steps(32) == math.ceil(1000 / 128) == 8
    assert TrainConfig(tokens=1024, batch_size=4, grad_accum=2).total_steps(32) == 4
    assert TrainConfig(tokens=1024, global_batch_size=16, batch_size=4).total_steps(32) == 2
    assert TrainConfig(tokens=1, batch_size=4).total_steps(32) == 1


def test_the_loop_runs_the_token_budget_and_reports_its_tokens(corpora, tiny_gpt2_dir, tmp_path):
    cfg = _cfg(corpora, tiny_gpt2_dir, tmp_path, steps=100, tokens=5 * 128 - 7)  # 5 steps of 4 x 32 tokens
    reports = []
    train(cfg, prepare_experiment(cfg), lambda m, c: reports.append(m), checkpoint_root=tmp_path / "ckpt")
    assert [m["step"] for m in reports] == [4, 5]
    assert reports[-1]["tokens"] == 5 * 128 and reports[-1]["finished"] is True
    assert reports[-1]["lr"] == pytest.approx(3e-3 * 0.1)  # the schedule decayed over the 5 steps, not 100


def test_asha_progress_accounting_and_plan_count_the_token_budget(corpora, tiny_gpt2_dir, tmp_path):
    from raycpt.core.forecast.plan import plan
    from raycpt.edge.tune import max_reports, max_steps  # the Ray edge: only this test loads Ray

    cfg = _cfg(corpora, tiny_gpt2_dir, tmp_path, tokens=2560)
    assert max_steps(cfg) == 20 and max_reports(cfg) == 5
    swept = with_overrides(cfg, {"search.space.train.tokens": {"choice": [1280, 2560]},
                                 "search.space.train.batch_size": {"choice": [2, 4]}})
    assert max_steps(swept) == 2560 // (2 * 32)  # the largest budget at the smallest batch
    assert max_steps(_cfg(corpora, tiny_gpt2_dir, tmp_path)) == 8  # no budget: train.steps, as before
    assert trial_steps({"hp/train.tokens": 1280, "hp/train.batch_size": 2}, swept) == 20
    assert trial_steps({}, with_overrides(cfg, {"train.tokens": 0})) == 8
    assert plan(cfg).steps == 20


def test_a_token_budget_is_validated(corpora, tiny_gpt2_dir, tmp_path, capsys):
    cfg = _cfg(corpora, tiny_gpt2_dir, tmp_path, tokens=2560)
    err = _cli_error(tmp_path, cfg, capsys, "search.space.train.steps={choice: [4, 8]}")
    assert "search.space.train.steps: the run length is set by train.tokens; sweep train.tokens or train.steps, " \
           "not both" in err
    err = _cli_error(tmp_path, cfg, capsys, "train.warmup_steps=30")
    assert "train.warmup_steps: 30 is more than the 20 steps train.tokens=2560 makes" in err
    assert "train.tokens: -1 is out of range" in _cli_error(tmp_path, cfg, capsys, "train.tokens=-1")
    with pytest.raises(ConfigError, match="search.space.train.tokens: choice value 128: train.warmup_steps: 2 is"):
        with_overrides(cfg, {"train.warmup_steps": 2, "search.space.train.tokens": {"choice": [128, 2560]}})


# --- fp16 ---------------------------------------------------------------------------------------------------------

def test_fp16_is_validated_in_one_line(corpora, tiny_gpt2_dir, tmp_path, capsys):
    cfg = _cfg(corpora, tiny_gpt2_dir, tmp_path)
    assert "train.precision: fp16 needs a GPU" in _cli_error(tmp_path, cfg, capsys, "train.precision=fp16")
    err = _cli_error(tmp_path, cfg, capsys, "train.precision=fp16", "resources.use_gpu=true", "model.dtype=float16")
    assert "train.precision: fp16 needs model.dtype float32" in err
    assert autocast_dtype("fp16", torch.device("cuda")) is torch.float16


def test_fp16_trains_with_a_loss_scale_that_checkpoints_and_resumes(corpora, tiny_gpt2_dir, tmp_path):
    """The real GradScaler path: with use_gpu on a host without CUDA the loop runs on CPU, where torch's autocast
    supports float16 too, so the scaler is enabled (on a GPU host this runs on CUDA, same assertions)."""
    cfg = _cfg(corpora, tiny_gpt2_dir, tmp_path)
    manifest = prepare_experiment(cfg)  # the data does not depend on the precision (nor needs the GPU)
    cfg = with_overrides(cfg, {"train.precision": "fp16", "resources.use_gpu": True})
    full = []
    train(cfg, manifest, lambda m, c: full.append((m, c)), checkpoint_root=tmp_path / "a")
    assert full[-1][0]["eval/domain_ppl"] < 0.8 * full[0][0]["eval/domain_ppl"]
    scaler = [torch.load(Path(c) / STATE_FILE, weights_only=True)["scaler"] for _, c in full]
    assert scaler[0]["scale"] > 1 and scaler[0]["_growth_tracker"] == 4  # 4 steps without overflow
    resumed = []
    train(cfg, manifest, lambda m, c: resumed.append((m, c)), checkpoint_root=tmp_path / "b", resume_dir=full[0][1])
    assert torch.load(Path(resumed[-1][1]) / STATE_FILE, weights_only=True)["scaler"] == scaler[-1]  # restored
    torch.testing.assert_close(resumed[-1][0]["eval/domain_loss"], full[-1][0]["eval/domain_loss"], rtol=1e-5,
                               atol=0)


def test_without_fp16_the_checkpoint_holds_no_scaler_state(corpora, tiny_gpt2_dir, tmp_path):
    cfg = _cfg(corpora, tiny_gpt2_dir, tmp_path, steps=4)
    reports = []
    train(cfg, prepare_experiment(cfg), lambda m, c: reports.append(c), checkpoint_root=tmp_path / "c")
    assert torch.load(Path(reports[-1]) / STATE_FILE, weights_only=True)["scaler"] == {}


# --- push to hub --------------------------------------------------------------------------------------------------

class FakeHfApi:
    """huggingface_hub.HfApi, recording every call instead of reaching the network."""

    calls: list[tuple[str, tuple, dict]] = []

    def __init__(self, *args, **kwargs) -> None:
        FakeHfApi.calls.append(("__init__", args, kwargs))

    def create_repo(self, *args, **kwargs):
        FakeHfApi.calls.append(("create_repo", args, kwargs))

    def upload_folder(self, *args, **kwargs):
        FakeHfApi.calls.append(("upload_folder", args, kwargs))
        return f"https://huggingface.co/{kwargs['repo_id']}/commit/0"


@pytest.fixture()
def fake_hub(monkeypatch):
    import huggingface_hub

    FakeHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    return FakeHfApi.calls


@pytest.fixture()
def winner(corpora, tiny_gpt2_dir, tmp_path):
    """A finished 2-step trial of a sweep with export.push_to_hub set, as export_winner sees it."""
    cfg = _cfg(corpora, tiny_gpt2_dir, tmp_path, steps=2, eval_every=2)
    cfg = with_overrides(cfg, {"export.push_to_hub": "someone/cpt-winner"})
    exp_dir, _, row = finished_trial(cfg)
    return cfg, exp_dir, row


def test_the_verified_export_is_pushed_with_the_token_from_the_environment(winner, fake_hub, monkeypatch):
    from raycpt.results.export import export_winner

    cfg, exp_dir, row = winner
    monkeypatch.setenv("HF_TOKEN", SECRETS["HF_TOKEN"])
    card = export_winner(exp_dir, cfg, row, {}, Selection("t1"))
    export = exp_dir / "export"
    assert [name for name, _, _ in fake_hub] == ["__init__", "create_repo", "upload_folder"]
    assert fake_hub[0][2] == {"token": SECRETS["HF_TOKEN"]}  # the environment's, the only token anywhere
    assert fake_hub[1][1] == ("someone/cpt-winner",)
    upload = fake_hub[2][2]
    assert upload["folder_path"] == str(export) and upload["repo_id"] == "someone/cpt-winner"
    assert "token" not in upload
    from huggingface_hub import ModelCard

    # the repo's card: hub metadata, then the human part
    assert ModelCard.load(export / "README.md").text.lstrip().startswith("# continued pre-training of")
    assert card["hub"].startswith("https://huggingface.co/someone/cpt-winner")
    assert not any(SECRETS["HF_TOKEN"] in f.read_text(errors="ignore") for f in export.iterdir() if f.is_file())


def test_an_export_that_fails_its_check_is_not_pushed(winner, fake_hub, monkeypatch):
    from raycpt.results.export import export_winner

    cfg, exp_dir, row = winner
    monkeypatch.setenv("HF_TOKEN", SECRETS["HF_TOKEN"])
    with pytest.raises(ExportCheckError):
        export_winner(exp_dir, cfg, {**row, metrics.DOMAIN_PPL: row[metrics.DOMAIN_PPL] * 2}, {}, Selection("t1"))
    assert fake_hub == []


def test_a_missing_hf_token_is_one_line_before_anything_is_exported_or_uploaded(winner, fake_hub, monkeypatch,
                                                                                  tmp_path, capsys):
    from raycpt.results.export import export_winner

    cfg, exp_dir, row = winner
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(InputError, match="export.push_to_hub=someone/cpt-winner: HF_TOKEN is not set"):
        export_winner(exp_dir, cfg, row, {}, Selection("t1"))
    assert not (exp_dir / "export").exists() and fake_hub == []
    # `raycpt sweep` says so before it prepares anything or starts Ray
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(to_dict(with_overrides(cfg, {"name": "fresh"}))))
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "HF_TOKEN is not set in the environment" in err
    assert not (cfg.experiment_dir().parent / "fresh").exists() and fake_hub == []
    assert "export.push_to_hub: 'no-owner' is not a hub repo id" in str(
        pytest.raises(ConfigError, with_overrides, cfg, {"export.push_to_hub": "no-owner"}).value)
