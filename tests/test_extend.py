"""WSD trials keep their pre-decay checkpoint, and `raycpt extend` continues it exactly: a trial of T1 steps extended
from its last stable step to T2 steps equals one uninterrupted wsd run of T2 steps (tiny GPT-2, in-process)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from raycpt.core import metrics as m
from raycpt.core.config import CONFIG_FILE, config_from_dict, to_dict
from raycpt.core.errors import InputError
from raycpt.core.extend import SUMMARY_FILE, TUNE_DIR, extend_local, plan_extension
from raycpt.core.files import write_json
from raycpt.core.prepare import measure_base, prepare_experiment
from raycpt.core.train.checkpoint import checkpoints_in, is_pre_decay, is_sharded_checkpoint, keeping_newest_checkpoint
from raycpt.core.train.loop import train
from tests.conftest import write_corpora


def _raw(corpora, model_dir, tmp_path, **train) -> dict:
    return {
        "name": "exp", "storage_path": str(tmp_path),
        "model": {"source": model_dir},
        "data": {"domain": corpora["domain"], "general": corpora["general"], "block_size": 32,
                 "heldout_fraction": 0.1, "heldout_blocks": 4},
        "train": {"lr": 3e-3, "steps": 10, "batch_size": 4, "eval_every": 4, "warmup_steps": 1, "mix_ratio": 0.75,
                  "schedule": "wsd", "decay_fraction": 0.2, **train},
    }


def _run(cfg, manifest, root: Path, resume: str | None = None) -> list[tuple[dict, str | None]]:
    reports: list[tuple[dict, str | None]] = []
    train(cfg, manifest, lambda metrics, ckpt: reports.append((metrics, ckpt)), checkpoint_root=root,
          resume_dir=resume)
    return reports


def test_wsd_run_checkpoints_its_last_stable_step_and_keeps_it(corpora, tiny_gpt2_dir, tmp_path):
    # 10 steps, 2 of them cool-down: the last stable step is 8; 11 steps: 2 (round(2.2)) -> 9, not an eval step
    cfg = config_from_dict(_raw(corpora, tiny_gpt2_dir, tmp_path, steps=11))
    manifest = prepare_experiment(cfg)
    kept: list[str] = []
    train(cfg, manifest, keeping_newest_checkpoint(lambda metrics, ckpt: kept.append(ckpt)),
          checkpoint_root=tmp_path / "ckpt")
    steps = [int(Path(c).name.removeprefix("checkpoint_step")) for c in kept]
    assert steps == [4, 8, 9, 11]
    left = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert left == ["checkpoint_step000009", "checkpoint_step000011"]  # the newest, and the pre-decay one
    assert is_pre_decay(tmp_path / "ckpt" / "checkpoint_step000009")
    assert not is_pre_decay(tmp_path / "ckpt" / "checkpoint_step000011")


@pytest.mark.parametrize("t1,t2,strategy", [(10, 20, "ddp"), (11, 23, "ddp"), (10, 20, "fsdp")])
def test_extending_the_pre_decay_checkpoint_equals_one_uninterrupted_run(corpora, tiny_gpt2_dir, tmp_path, t1, t2,
                                                                         strategy):
    """(10, 20): the stable ends (8, 16) are eval steps, so every report's window matches; (11, 23): they are not
    (9, 18), so the first report after the resume averages fewer steps: its train loss is not compared. fsdp: the
    sharded checkpoint format (DCP weights and optimizer; one worker trains unwrapped)."""
    short = config_from_dict({**_raw(corpora, tiny_gpt2_dir, tmp_path, steps=t1),
                              "resources": {"strategy": strategy}})
    long = config_from_dict({**_raw(corpora, tiny_gpt2_dir, tmp_path, steps=t2), "resources": {"strategy": strategy}})
    manifest = prepare_experiment(long)
    uninterrupted = {r[m.STEP]: r for r, _ in _run(long, manifest, tmp_path / "long")}
    trial = _run(short, manifest, tmp_path / "short")
    pre_step, pre_decay = next((r[m.STEP], c) for r, c in trial if r[m.PRE_DECAY])
    assert pre_step == {10: 8, 11: 9}[t1]
    assert is_sharded_checkpoint(pre_decay) == (strategy == "fsdp")
    for r, _ in trial:  # the trial itself follows the long run up to its last stable step
        if r[m.STEP] <= pre_step and r[m.STEP] in uninterrupted:
            torch.testing.assert_close(r[m.DOMAIN_LOSS], uninterrupted[r[m.STEP]][m.DOMAIN_LOSS], rtol=1e-5, atol=0)
    extended = _run(long, manifest, tmp_path / "ext", resume=pre_decay)
    assert [r[m.STEP] for r, _ in extended] == [s for s in uninterrupted if s > pre_step]
    first = True
    for r, _ in extended:
        want = uninterrupted[r[m.STEP]]
        for name in (m.DOMAIN_LOSS, m.GENERAL_LOSS):
            torch.testing.assert_close(r[name], want[name], rtol=1e-5, atol=0)
        assert r[m.LR] == pytest.approx(want[m.LR], rel=1e-12)
        if t1 == 10 or not first:
            torch.testing.assert_close(r[m.TRAIN_LOSS], want[m.TRAIN_LOSS], rtol=1e-5, atol=0)
        first = False
    assert extended[-1][0][m.TOKENS] == uninterrupted[t2][m.TOKENS]


def _checkpoints(tiny_gpt2_dir: str, root: Path, steps: list[int], pre_decay: int | None) -> list[Path]:
    """Real checkpoints (weights + AdamW state) as the loop saves them, one marked pre-decay."""
    from raycpt.core.model.loading import load_model
    from raycpt.core.train.checkpoint import TrainState, save_checkpoint
    from raycpt.core.train.loop import build_optimizer, build_scheduler

    cfg = config_from_dict({"model": {"source": tiny_gpt2_dir}, "data": {"domain": "x"}, "train": {"mix_ratio": 1}})
    model = load_model(tiny_gpt2_dir)
    optimizer = build_optimizer(model, 1e-3, 0.0, torch.device("cpu"))
    scheduler = build_scheduler(optimizer, 1, 10, 0.1, schedule="wsd")
    model(input_ids=torch.arange(16).view(1, 16), labels=torch.arange(16).view(1, 16)).loss.backward()
    optimizer.step()
    paths = []
    for step in steps:
        path = root / f"checkpoint_{step:06d}"
        save_checkpoint(path, model, TrainState(step=step), optimizer, scheduler, cfg,
                        {m.STEP: step, m.PRE_DECAY: step == pre_decay})
        paths.append(path)
    return paths


def test_disk_policy_keeps_pre_decay_checkpoints_whole_until_analysis_then_for_the_winner(tiny_gpt2_dir, tmp_path):
    from raycpt.core.config import CheckpointConfig
    from raycpt.core.train.checkpoint import has_optimizer, has_weights
    from raycpt.edge.disk import prune_ended, prune_pre_decay, prune_running, trial_dirs

    trials = {}
    for trial_id, finished in (("a", True), ("b", True), ("c", False)):
        dirs = trial_dirs(tmp_path, trial_id, None)
        trials[trial_id] = (dirs, _checkpoints(tiny_gpt2_dir, dirs[0], [4, 8, 10], pre_decay=8))
        prune_running(dirs, trials[trial_id][1][-1])
        prune_ended(dirs, CheckpointConfig(), finished=finished, failed=False)
    for trial_id, (_, (old, pre, last)) in trials.items():  # the sweep is running: every pre-decay one is whole
        assert has_optimizer(pre) and has_weights(pre), trial_id
        assert not has_optimizer(old) and not has_optimizer(last)
    rows = [{"trial_id": t} for t in trials]
    pruned = prune_pre_decay(tmp_path, rows, CheckpointConfig(), winner="b", order=["b", "a", "c"])
    assert list(pruned["kept"]) == ["b"] and pruned["removed"] == 2 and pruned["freed"] > 0
    assert trials["b"][1][1].exists() and not trials["a"][1][1].exists() and not trials["c"][1][1].exists()
    assert has_weights(trials["a"][1][2])  # the finished trial's last checkpoint is untouched
    top = prune_pre_decay(tmp_path, rows, CheckpointConfig(keep_pre_decay="top_k", keep_pre_decay_k=2),
                          winner="b", order=["b", "a", "c"])
    assert list(top["kept"]) == ["b"] and top["removed"] == 0  # a's is gone already
    none = prune_pre_decay(tmp_path, rows, CheckpointConfig(keep_pre_decay="none"), winner="b", order=["b"])
    assert none["kept"] == {} and none["removed"] == 1 and not trials["b"][1][1].exists()


TRIAL, COSINE = "abc12_00000", "abc12_00001"


def _sweep(corpora, model_dir, tmp_path, resources: dict | None = None, **trial) -> Path:
    """An analysed sweep on disk, without Ray: a wsd winner (10 steps, pre-decay at 8, unless `trial` says
    otherwise) and a cosine trial, each in a Tune-style trial dir, with the sweep's config, manifest, base metrics
    and summary.json."""
    cfg = config_from_dict({**_raw(corpora, model_dir, tmp_path), "resources": resources or {}})
    exp_dir = cfg.experiment_dir()
    exp_dir.mkdir(parents=True)
    write_json(exp_dir / CONFIG_FILE, to_dict(cfg))
    manifest = prepare_experiment(cfg)
    manifest.save(exp_dir)
    measure_base(cfg, manifest, exp_dir)
    rows = []
    for trial_id, schedule in ((TRIAL, "wsd"), (COSINE, "cosine")):
        raw = _raw(corpora, model_dir, tmp_path, **trial)
        trial_cfg = config_from_dict({**raw, "train": {**raw["train"], "schedule": schedule},
                                      "resources": resources or {}})
        trial_dir = exp_dir / TUNE_DIR / f"train_driver_fn_{trial_id}_0_lr=0.003"
        last: dict = {}

        def report(metrics, ckpt, last=last):
            last.update(metrics, checkpoint_path=ckpt)

        train(trial_cfg, manifest, keeping_newest_checkpoint(report), checkpoint_root=trial_dir)
        rows.append({"trial_id": trial_id, "status": "finished", "path": str(trial_dir),
                     "hp/train.schedule": schedule, **last})
    write_json(exp_dir / SUMMARY_FILE, {"experiment_dir": str(exp_dir), "winner": TRIAL, "trials": rows,
                                        "order": [TRIAL, COSINE]})
    return exp_dir


@pytest.fixture()
def swept(corpora, tiny_gpt2_dir, tmp_path):
    return _sweep(corpora, tiny_gpt2_dir, tmp_path)


@pytest.fixture(scope="module")
def swept_once(tiny_gpt2_dir, tmp_path_factory):
    """One sweep dir for the tests that only read it (refusals before any work, planning)."""
    root = tmp_path_factory.mktemp("swept")
    return _sweep(write_corpora(root), tiny_gpt2_dir, root)


def _cli(capsys, *argv) -> tuple[int, str]:
    from raycpt.cli import main

    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_extend_cli_without_ray_continues_the_winner_and_exports_it_with_its_lineage(swept, capsys):
    code, out = _cli(capsys, "extend", swept, "--tokens", 2560, "--no-ray")
    assert code == 0, out
    out_dir = swept / f"extend-{TRIAL}-2560"  # 20 steps of 4 x 32 tokens
    card = __import__("json").loads((out_dir / "export" / "raycpt_card.json").read_text())
    lineage = card["lineage"]["extension"]
    assert (lineage["trial_id"], lineage["tokens_before"], lineage["tokens_at_checkpoint"],
            lineage["tokens_after"]) == (TRIAL, 1280, 1024, 2560)
    assert lineage["schedule"]["schedule"] == "wsd" and lineage["schedule"]["stable_end_step"] == 16
    assert card["verification"]["ok"] and card["metrics"]["step"] == 20 and card["test"]
    assert "domain_ppl" in card["lineage"]["vs_trial"]  # paired against the trial it continued
    assert f"Trial {TRIAL} (the sweep winner) continued" in (out_dir / "export" / "README.md").read_text()
    # the continued stream: the extension's checkpoints are its own, the trial's pre-decay one is untouched
    assert [p.name for p in checkpoints_in([out_dir / "local"])] == ["checkpoint_step000016",
                                                                     "checkpoint_step000020"]
    code, out = _cli(capsys, "extend", swept, "--tokens", 2560, "--no-ray")
    assert code == 2 and "already holds this extension's export; pass --force" in out
    code, out = _cli(capsys, "extend", swept, "--tokens", 2560, "--no-ray", "--force")  # re-export, no retraining
    assert code == 0 and "the extension already ran to step 20" in out, out


@pytest.mark.parametrize("argv,message", [
    (["--tokens", 1280], "--tokens 1280: not above the 1280 tokens trial abc12_00000 trained"),
    (["--tokens", 4000, "--trial", COSINE], "ran train.schedule=cosine: only a wsd trial keeps a pre-decay"),
    (["--tokens", 4000, "--trial", "nope"], "--trial nope: no such trial"),
    (["--tokens", 4000, "--set", "train.schedule=cosine"], "an extension continues a wsd run's stable phase"),
])
def test_extend_refuses_bad_input_in_one_line_before_any_work(swept_once, capsys, argv, message):
    code, out = _cli(capsys, "extend", swept_once, *argv, "--no-ray")
    assert code == 2 and message in out and len(out.strip().splitlines()) == 1, out
    assert not list(swept_once.glob("extend-*"))


def test_extend_refuses_a_sweep_without_winner_or_with_changed_data(swept, capsys):
    summary = __import__("json").loads((swept / SUMMARY_FILE).read_text())
    write_json(swept / SUMMARY_FILE, {**summary, "winner": None})
    code, out = _cli(capsys, "extend", swept, "--tokens", 4000, "--no-ray")
    assert code == 2 and "the sweep has no winner to extend; name a trial with --trial ID" in out
    write_json(swept / SUMMARY_FILE, summary)
    manifest = __import__("json").loads((swept / "data_manifest.json").read_text())
    write_json(swept / "data_manifest.json", {**manifest, "fingerprint": "0123456789abcdef"})
    code, out = _cli(capsys, "extend", swept, "--tokens", 4000, "--no-ray")
    assert code == 2 and "the model or data changed since the sweep" in out, out
    shutil.rmtree(next(swept.glob(f"tune/*{TRIAL}*")) / "checkpoint_step000008")
    code, out = _cli(capsys, "extend", swept, "--tokens", 4000, "--no-ray")
    assert code == 2 and "its pre-decay checkpoint is not on disk" in out, out


def test_plan_extension_rounds_the_target_up_to_whole_steps(swept_once):
    ext = plan_extension(swept_once, 1281)
    assert (ext.steps, ext.tokens, ext.cfg.train.steps, ext.cfg.train.tokens) == (11, 1408, 11, 0)
    assert ext.checkpoint.name == "checkpoint_step000008" and ext.winner
    with pytest.raises(InputError, match="--tokens 0"):
        plan_extension(swept_once, 0)


class _Killed(Exception):
    pass


def test_an_extension_killed_midway_resumes_from_its_own_checkpoint_to_the_same_result(swept, tmp_path):
    ext = plan_extension(swept, 2560)

    def dies_after_step_16(line: str) -> None:
        if line.startswith("step 16"):
            raise _Killed  # after the step-16 checkpoint was written, as a kill would find it

    with pytest.raises(_Killed):
        extend_local(ext, dies_after_step_16)
    lines: list[str] = []
    result = extend_local(ext, lines.append)
    last = result.metrics
    assert "from step 16" in lines[0] and Path(result.checkpoint).name == "checkpoint_step000020"
    uninterrupted = _run(ext.cfg, prepare_experiment(ext.cfg), tmp_path / "whole")
    torch.testing.assert_close(last[m.DOMAIN_LOSS], uninterrupted[-1][0][m.DOMAIN_LOSS], rtol=1e-5, atol=0)
    torch.testing.assert_close(last[m.TRAIN_LOSS], uninterrupted[-1][0][m.TRAIN_LOSS], rtol=1e-5, atol=0)


@pytest.mark.e2e
@pytest.mark.parametrize("workers,strategy", [(1, "ddp"), (2, "ddp"), (2, "fsdp")])
def test_extend_on_ray_train_equals_the_uninterrupted_run(corpora, tiny_gpt2_dir, capsys, tmp_path, local_ray,
                                                          workers, strategy):
    """`raycpt extend` on Ray Train (the path `raycpt train` takes), 1 and 2 workers with the same global batch:
    the trial's pre-decay checkpoint reaches the workers through the loop's config, and the extended run ends where
    one uninterrupted wsd run of the same length ends (2 workers: float summation order, as tests/test_ddp.py).
    fsdp: the trial's sharded checkpoint is resharded onto the extension's 2 workers."""
    import json

    swept = _sweep(corpora, tiny_gpt2_dir, tmp_path, resources={"strategy": strategy})  # fsdp: sharded checkpoints
    code, out = _cli(capsys, "extend", swept, "--tokens", 2560, "--set", f"resources.num_workers={workers}",
                     "--set", f"resources.strategy={strategy}")
    assert code == 0, out
    card = json.loads((swept / f"extend-{TRIAL}-2560" / "export" / "raycpt_card.json").read_text())
    assert card["verification"]["ok"] and card["metrics"]["step"] == 20
    ext = plan_extension(swept, 2560)
    whole = _run(ext.cfg, prepare_experiment(ext.cfg), tmp_path / "whole")[-1][0]
    for name in (m.DOMAIN_PPL, m.TRAIN_LOSS):
        torch.testing.assert_close(card["metrics"][name], whole[name], rtol=1e-5 if workers == 1 else 1e-4, atol=0)


def test_the_forgetting_guard_stops_an_extension_made_to_forget_at_its_last_checkpoint_within_the_bound(
        corpora, tiny_gpt2_dir, tmp_path, capsys):
    """A trial trained on the general corpus alone, extended on the domain corpus alone: its general ppl rises. The
    bound (the base model's general ppl is set so that (1 + max_forgetting) x it lies inside the rise) is crossed at
    report k; the run stops there and exports the checkpoint of report k-1, and the card says where and why."""
    import json

    exp_dir = _sweep(corpora, tiny_gpt2_dir, tmp_path, mix_ratio=0.0, steps=24, lr=1e-2)
    forget = ["--set", "train.mix_ratio=1.0", "--set", "train.lr=0.003"]
    ext = plan_extension(exp_dir, 48 * 128, overrides=forget[1::2])
    unguarded = [r for r, _ in _run(ext.cfg, prepare_experiment(ext.cfg), tmp_path / "probe",
                                    resume=str(ext.checkpoint))]
    assert unguarded[0][m.LR] == pytest.approx(0.003)  # the extension's own train.lr, not the trial's 1e-2
    assert "lr 0.003 and mix 1 from --set (trial abc12_00000 (the winner) ran lr 0.01, mix 0)" in ext.why
    general = [r[m.GENERAL_PPL] for r in unguarded]
    k = next(i for i in range(1, len(general)) if general[i] > max(general[:i]))  # the first rise above them all
    bound = (max(general[:k]) + general[k]) / 2
    base = json.loads((exp_dir / "base_metrics.json").read_text())
    write_json(exp_dir / "base_metrics.json", {**base, "base/general_ppl": bound / 1.1})  # max_forgetting 0.1
    code, out = _cli(capsys, "extend", exp_dir, "--tokens", 48 * 128, *forget, "--no-ray")
    assert code == 0, out
    card = json.loads((ext.out_dir / "export" / "raycpt_card.json").read_text())
    stopped = card["lineage"]["extension"]["stopped"]
    assert f"at step {unguarded[k][m.STEP]}" in stopped and f"step {unguarded[k - 1][m.STEP]}" in stopped
    assert card["metrics"]["step"] == unguarded[k - 1][m.STEP] and card["verification"]["ok"]
    assert card["metrics"]["eval/general_ppl"] <= bound
    assert "The forgetting guard ended it early" in (ext.out_dir / "export" / "README.md").read_text()


def test_extend_and_final_sections_are_validated_and_a_final_run_that_cannot_run_leaves_the_sweep_standing(
        swept, capsys):
    from raycpt.core.config import load_saved_config
    from raycpt.pipeline import final_run
    from raycpt.results.format import make_console

    base = {"data": {"domain": "x.txt", "general": "y.txt"}}
    with pytest.raises(InputError) as err:
        config_from_dict({**base, "extend": {"on_forgetting": "halt"}, "final": {"tokens": 1000}})
    assert "extend.on_forgetting: 'halt' is not allowed" in str(err.value)
    assert "final.tokens: continuing a trial to 1000 tokens needs wsd trials" in str(err.value)
    assert config_from_dict({**base, "train": {"schedule": "wsd"}, "final": {"tokens": 1000}}).final.tokens == 1000
    cfg = load_saved_config(swept, ["final.tokens=1000"], relocate=True)
    assert final_run(cfg, swept, make_console()) is None
    out = " ".join(capsys.readouterr().out.split())
    assert "Final run not run: final.tokens 1000: not above the 1280 tokens trial abc12_00000 trained" in out


def test_a_trial_process_killed_mid_report_leaves_no_staged_checkpoint(tmp_path, local_ray):
    # A trial that Tune stops or kills never returns from its report, so it never removes the checkpoint it staged:
    # here a process dies inside its staging dir, as a killed trial does, and the after-sweep cleanup removes it
    import ray

    from raycpt.edge.staging import remove_orphans_on_every_node, staging_dir

    def die_while_staging(tmp: str) -> None:
        import os
        import tempfile

        tempfile.tempdir = tmp
        with staging_dir() as root:
            with open(os.path.join(root, "model.safetensors"), "wb") as f:
                f.write(b"w" * 4096)
            os._exit(1)  # no finally, no context exit: what a kill does

    with pytest.raises(ray.exceptions.RayError):
        ray.get(ray.remote(max_retries=0)(die_while_staging).remote(str(tmp_path)))
    assert [p.name.startswith("raycpt-ckpt-") for p in tmp_path.iterdir()] == [True]
    assert remove_orphans_on_every_node(wait_s=30, tmp=tmp_path) == 4096
    assert list(tmp_path.iterdir()) == []
