"""Distillation from the frozen base model (train.distill_weight): the KL against a hand-computed value, the step's
loss and gradient against a hand-written reference, the loop's report of the KL, LoRA's teacher being the model with
its adapters disabled, distill_weight 0 leaving the run as it was, and the config's one-line errors."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import yaml

import raycpt.core.train.loop as train_module
from raycpt.core import metrics as m
from raycpt.core.config import ExperimentConfig, config_from_dict, validate, with_overrides
from raycpt.core.data.batches import Batches
from raycpt.core.data.blocks import mixture_plan, worker_positions
from raycpt.core.errors import ConfigError
from raycpt.core.model.loading import apply_dropout, load_model
from raycpt.core.model.loss import distill_kl
from raycpt.core.prepare import prepare_experiment
from raycpt.core.train.loop import Distill, train, train_step
from tests.conftest import DOMAIN_SENTENCES, GENERAL_SENTENCES, write_corpora, write_jsonl

# --- distill_kl --------------------------------------------------------------------------------------------------

def test_distill_kl_equals_the_closed_form_on_two_token_distributions():
    """Teacher logits (0, 0): p_t = (1/2, 1/2). Student logits (ln 3, 0): p_s = (3/4, 1/4).
    KL(p_t || p_s) = 1/2 ln((1/2)/(3/4)) + 1/2 ln((1/2)/(1/4)) = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3)."""
    by_hand = 0.5 * math.log(4 / 3)
    teacher = torch.tensor([[[0.0, 0.0], [0.0, 0.0]]])  # [1 row, 2 positions, V = 2]
    student = torch.tensor([[[math.log(3), 0.0], [0.0, 0.0]]])  # position 1: the teacher's own distribution
    assert float(distill_kl(student[:, :1], teacher[:, :1])) == pytest.approx(by_hand, rel=1e-6)
    assert float(distill_kl(student, teacher)) == pytest.approx(by_hand / 2, rel=1e-6)  # mean over positions
    # a constant added to every logit changes no distribution; bf16 logits are computed in float32
    assert float(distill_kl(student[:, :1] + 5.0, teacher[:, :1] - 2.0)) == pytest.approx(by_hand, rel=1e-6)
    kl_bf16 = distill_kl(student[:, :1].bfloat16(), teacher[:, :1].bfloat16())
    assert kl_bf16.dtype == torch.float32 and float(kl_bf16) == pytest.approx(by_hand, rel=1e-2)


def test_distill_kl_is_zero_for_equal_distributions_and_the_mask_excludes_rows():
    logits = torch.randn(3, 5, 11, generator=torch.Generator().manual_seed(0))
    assert float(distill_kl(logits, logits.clone())) == 0.0
    teacher = torch.zeros(2, 1, 2)  # two rows, one position each: uniform
    student = torch.tensor([[[math.log(3), 0.0]], [[0.0, 0.0]]])  # row 0: KL 1/2 ln(4/3); row 1: 0
    by_hand = 0.5 * math.log(4 / 3)
    assert float(distill_kl(student, teacher)) == pytest.approx(by_hand / 2, rel=1e-6)
    assert float(distill_kl(student, teacher, mask=torch.tensor([[True], [False]]))) == pytest.approx(by_hand,
                                                                                                      rel=1e-6)
    assert float(distill_kl(student, teacher, mask=torch.tensor([[False], [True]]))) == 0.0
    assert float(distill_kl(student, teacher, mask=torch.zeros(2, 1, dtype=torch.bool))) == 0.0  # nothing counts
    student.requires_grad_(True)
    distill_kl(student, teacher).backward()
    # d KL / d student logits = (p_s - p_t) / positions: row 0 = ((3/4 - 1/2), (1/4 - 1/2)) / 2
    torch.testing.assert_close(student.grad, torch.tensor([[[0.125, -0.125]], [[0.0, 0.0]]]))


# --- train_step --------------------------------------------------------------------------------------------------

def _reference_losses(model, teacher, ids, rows):
    """CE over all rows and KL(p_teacher || p_model) over positions 0..T-2 of `rows`, written out in float64."""
    logits = model(input_ids=ids).logits.double()
    logp = logits - logits.logsumexp(-1, keepdim=True)
    ce = -logp[:, :-1].gather(-1, ids[:, 1:, None]).mean()
    if not rows:
        return ce, None
    with torch.no_grad():
        t_logits = teacher(input_ids=ids[rows]).logits.double()
    log_t = t_logits - t_logits.logsumexp(-1, keepdim=True)
    kl = (log_t.exp() * (log_t - logp[rows])).sum(-1)[:, :-1].mean()
    return ce, kl


@pytest.mark.parametrize("loss_impl", ["hf", "chunked"])
def test_train_step_trains_on_ce_plus_weight_times_kl_of_the_general_rows(tiny_gpt2_dir, loss_impl):
    """Three micro-batches: general rows 1 and 2, rows 0 and 3 (not adjacent), none (adds 0). SGD at lr 1 makes the
    step's parameter change the gradient itself: it equals the gradient of the hand-written
    mean over micro-batches of (CE + w x KL); the step returns the CE alone and adds the KL to distill.kl."""
    weight = 0.7
    gen = torch.Generator().manual_seed(0)
    micro_batches = [torch.randint(0, 1000, (4, 16), generator=gen) for _ in range(3)]
    general = [torch.tensor([False, True, True, False]), torch.tensor([True, False, False, True]),
               torch.zeros(4, dtype=torch.bool)]
    teacher = load_model(tiny_gpt2_dir).eval().requires_grad_(False)
    student = load_model(tiny_gpt2_dir)
    apply_dropout(student, 0.0)
    student.train()
    with torch.no_grad():  # move the student off the base model: at the base model the KL and its gradient are 0
        for param in student.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=gen))
    reference = copy.deepcopy(student)
    before = [p.detach().clone() for p in student.parameters()]

    optimizer = torch.optim.SGD(student.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    distill = Distill(lambda ids: teacher(input_ids=ids).logits, weight, torch.zeros(2))
    loss = train_step(student, micro_batches, optimizer, scheduler, scaler, loss_impl=loss_impl, general=general,
                      distill=distill)

    ces, kls, total = [], [], 0.0
    for ids, flags in zip(micro_batches, general, strict=True):
        ce, kl = _reference_losses(reference, teacher, ids, flags.nonzero().flatten().tolist())
        ces.append(ce)
        total = total + (ce + (weight * kl if kl is not None else 0.0)) / len(micro_batches)
        kls += [kl] if kl is not None else []
    total.backward()
    assert float(loss) == pytest.approx(float(sum(ces).detach() / 3), rel=1e-5)  # the CE: train/loss stays comparable
    assert len(kls) == 2 and all(float(kl.detach()) > 1e-3 for kl in kls)
    assert float(distill.kl[0]) == pytest.approx(float(sum(kls).detach()), rel=1e-4)
    assert float(distill.kl[1]) == 2.0  # two micro-batches held general rows
    largest = max(float(p.grad.abs().max()) for p in reference.parameters())
    for (name, param), old, ref in zip(student.named_parameters(), before, reference.parameters(), strict=True):
        torch.testing.assert_close(old - param.detach(), ref.grad, rtol=1e-4, atol=2e-6 * largest,
                                   msg=lambda text, name=name: f"{name}: {text}")

    # the KL term is really in that gradient: without it the change would differ
    ce_only = copy.deepcopy(reference)
    ce_only.zero_grad()
    (sum(_reference_losses(ce_only, teacher, ids, [])[0] for ids in micro_batches) / 3).backward()
    assert any(not torch.allclose(a.grad, b.grad, rtol=1e-2, atol=1e-3 * largest)
               for a, b in zip(ce_only.parameters(), reference.parameters(), strict=True))


def test_batches_with_general_flags_hand_out_the_same_ids_and_the_plans_flags(tmp_path):
    rng = np.random.default_rng(0)
    domain = rng.integers(0, 50_000, (37, 16), dtype=np.int32)
    general_blocks = rng.integers(0, 50_000, (23, 16), dtype=np.int32)
    layout = dict(rank=1, world_size=2, micro_batch=2, grad_accum=3)
    steps, window = 10, 2 * 3 * 2
    is_domain, index = mixture_plan(steps * window, 0.6, len(domain), len(general_blocks), seed=3, window=window)
    kwargs = dict(start_step=2, steps=steps, device="cpu", chunk=4, **layout)
    with Batches(domain, general_blocks, is_domain, index, **kwargs) as plain:
        ids = list(plain)
    with Batches(domain, general_blocks, is_domain, index, with_general=True, **kwargs) as flagged:
        pairs = list(flagged)
    assert len(pairs) == len(ids) == (steps - 2) * 3
    for i, (a, (b, flags)) in enumerate(zip(ids, pairs, strict=True)):
        step, micro = divmod(2 * 3 + i, 3)
        pos = worker_positions(step, micro, rank=1, world_size=2, batch_size=2, grad_accum=3)
        assert torch.equal(a, b)
        assert flags.dtype == torch.bool and flags.device.type == "cpu"
        assert flags.tolist() == (~is_domain[pos]).tolist()
    assert flagged.domain_blocks == plain.domain_blocks


# --- the loop ----------------------------------------------------------------------------------------------------

def _cfg(tmp, source: str, **train_fields) -> ExperimentConfig:
    corpora = write_corpora(tmp)
    return config_from_dict({
        "name": "distill", "storage_path": str(tmp), "model": {"source": source},
        "data": {**corpora, "block_size": 32, "heldout_fraction": 0.1,
                 "heldout_blocks": 4},
        "train": {"lr": 1e-2, "steps": 3, "batch_size": 4, "eval_every": 1, "warmup_steps": 0, "mix_ratio": 0.75,
                  **train_fields},
    })


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_gpt2_dir):
    """The corpora, prepared once for this file's runs."""
    tmp = tmp_path_factory.mktemp("distill")
    return tmp, prepare_experiment(_cfg(tmp, tiny_gpt2_dir))


def _run(prepared, tiny_gpt2_dir, name: str, **fields) -> list[dict]:
    """The reports of a run with train.<fields>."""
    tmp, manifest = prepared
    cfg = with_overrides(_cfg(tmp, tiny_gpt2_dir), {f"train.{k}": v for k, v in fields.items()})
    reports: list[dict] = []
    train(cfg, manifest, lambda metrics, checkpoint: reports.append(metrics), checkpoint_root=tmp / name)
    return reports


def _counting_loads(monkeypatch) -> list[str]:
    loads: list[str] = []
    real = train_module.load_model

    def load(source, *args, **kwargs):
        loads.append(source)
        return real(source, *args, **kwargs)

    monkeypatch.setattr(train_module, "load_model", load)
    return loads


def test_the_loop_reports_the_kl_which_is_zero_at_the_base_model_and_positive_after(prepared, tiny_gpt2_dir,
                                                                                     monkeypatch):
    """Full method: a second model (the teacher) is loaded; step 1's KL is that of the base model against itself
    (0 up to rounding), the steps after it move away (KL > 0); train/loss stays the CE, so step 1's loss is the
    loss of a run without distillation, bit for bit."""
    loads = _counting_loads(monkeypatch)
    reports = _run(prepared, tiny_gpt2_dir, "full", distill_weight=1.0)
    assert loads == [tiny_gpt2_dir, tiny_gpt2_dir]  # the trial's model, then the teacher
    kls = [r[m.DISTILL_KL] for r in reports]
    assert [r[m.STEP] for r in reports] == [1, 2, 3]
    assert abs(kls[0]) < 1e-6
    assert all(kl > 1e-6 for kl in kls[1:]), kls
    plain = _run(prepared, tiny_gpt2_dir, "plain-for-full")
    assert reports[0][m.TRAIN_LOSS] == plain[0][m.TRAIN_LOSS]
    assert all(math.isfinite(r[m.TRAIN_LOSS]) for r in reports)


def test_distill_weight_zero_is_the_run_without_distillation(prepared, tiny_gpt2_dir, monkeypatch):
    """distill_weight 0: no teacher, no flags, train_step called as before the feature, no KL reported; the same
    losses (rtol=0, atol=0) as a run whose batches carry their general flags into train_step with distillation
    off (the flag-carrying batch path hands out the same ids)."""
    calls: list[dict] = []
    real_step = train_module.train_step

    def recording_step(model, micro_batches, *args, **kwargs):
        calls.append({"tensors": all(isinstance(b, torch.Tensor) for b in micro_batches), **kwargs})
        return real_step(model, micro_batches, *args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", recording_step)
    monkeypatch.setattr(train_module, "distill_teacher",
                        lambda *args: pytest.fail("distill_weight 0 loaded a teacher"))
    off = _run(prepared, tiny_gpt2_dir, "off")
    assert calls and all(c["tensors"] and c["general"] is None and c["distill"] is None for c in calls)
    assert all(r[m.DISTILL_KL] is None for r in off)

    real_batches = train_module.Batches

    def flagged_batches(*args, **kwargs):
        return real_batches(*args, **{**kwargs, "with_general": True})

    def flags_but_no_distill(model, micro_batches, *args, **kwargs):
        ids, flags = [b[0] for b in micro_batches], [b[1] for b in micro_batches]
        return real_step(model, ids, *args, **{**kwargs, "general": flags})

    monkeypatch.setattr(train_module, "Batches", flagged_batches)
    monkeypatch.setattr(train_module, "train_step", flags_but_no_distill)
    flagged = _run(prepared, tiny_gpt2_dir, "flagged")
    assert [r[m.TRAIN_LOSS] for r in off] == [r[m.TRAIN_LOSS] for r in flagged]
    assert [r[m.DOMAIN_LOSS] for r in off] == [r[m.DOMAIN_LOSS] for r in flagged]
    assert [r[m.GENERAL_LOSS] for r in off] == [r[m.GENERAL_LOSS] for r in flagged]


def test_lora_distills_from_the_model_with_its_adapters_disabled(prepared, tiny_gpt2_dir, monkeypatch):
    """method lora: no second model is loaded; at initialisation LoRA's B matrices are 0, so the student is the
    base model and the KL is 0 (to float rounding); the adapters come back on after each teacher forward, so the
    trained student moves away from the base (KL > 0) and the model is left in train mode."""
    loads = _counting_loads(monkeypatch)
    reports = _run(prepared, tiny_gpt2_dir, "lora", method="lora", distill_weight=2.0)
    assert loads == [tiny_gpt2_dir]  # the trial's model only
    kls = [r[m.DISTILL_KL] for r in reports]
    assert abs(kls[0]) < 1e-6
    assert all(kl > 1e-6 for kl in kls[1:]), kls


# --- memory plan -------------------------------------------------------------------------------------------------

def test_the_plan_lists_the_teacher_and_the_general_rows_logits(prepared, tiny_gpt2_dir):
    """full: the teacher's weights (params x bytes of model.dtype) and the general rows' logits; lora: the logits
    only (its teacher is the model itself); weight 0: neither. `raycpt plan` prints both rows."""
    from rich.console import Console

    from raycpt.core.forecast.plan import model_shape, plan, render

    tmp, _ = prepared
    cfg = _cfg(tmp, tiny_gpt2_dir)
    shape = model_shape(cfg)
    off = plan(cfg, shape)
    assert not any(name.startswith("distill") for name in off.rows)
    full = plan(with_overrides(cfg, {"train.distill_weight": 1.0}), shape)
    assert full.rows["distill teacher"] == shape.params * 4  # float32
    assert full.rows["distill logits"] > 0
    assert full.total == off.total + full.rows["distill teacher"] + full.rows["distill logits"]
    lora = plan(with_overrides(cfg, {"train.distill_weight": 1.0, "train.method": "lora"}), shape)
    assert "distill teacher" not in lora.rows and lora.rows["distill logits"] == full.rows["distill logits"]
    console = Console(record=True, width=200)
    render(console, full)
    text = console.export_text()
    assert "distill teacher" in text and "distill logits" in text and "one forward per general row" in text


# --- config ------------------------------------------------------------------------------------------------------

def _raw(tmp_path, source, **train_fields) -> dict:
    raw = {"name": "d", "storage_path": str(tmp_path), "model": {"source": source},
           "data": {"domain": str(write_jsonl(tmp_path / "domain.jsonl", DOMAIN_SENTENCES)),
                    "general": str(write_jsonl(tmp_path / "general.jsonl", GENERAL_SENTENCES))},
           "train": {"mix_ratio": 0.75, **train_fields}}
    return raw


NEGATIVE = "train.distill_weight: -0.5 is out of range, must be >= 0"
NO_GENERAL = "train.distill_weight > 0 needs general replay data; set data.general"


def test_validate_names_a_negative_weight_and_a_weight_without_general_data(tmp_path, tiny_gpt2_dir):
    cfg = config_from_dict(_raw(tmp_path, tiny_gpt2_dir))
    assert validate(cfg) == []
    cfg.train.distill_weight = -0.5
    assert validate(cfg) == [NEGATIVE]
    cfg.train.distill_weight, cfg.train.mix_ratio, cfg.data.general = 0.5, 1.0, ""
    assert validate(cfg) == [NO_GENERAL]
    cfg.train.distill_weight = 0.0
    assert validate(cfg) == []  # weight 0 needs nothing

    # swept like any train field; each value of the space is checked as the field itself is
    swept = _raw(tmp_path, tiny_gpt2_dir, mix_ratio=1.0)
    swept["data"]["general"] = ""
    swept["search"] = {"space": {"train.distill_weight": {"grid": [0, 0.5, 2]}}}
    with pytest.raises(ConfigError) as err:
        config_from_dict(swept)
    assert str(err.value) == f"search.space.train.distill_weight: grid value 0.5: {NO_GENERAL}"
    swept["data"]["general"] = _raw(tmp_path, tiny_gpt2_dir)["data"]["general"]
    swept["train"]["mix_ratio"] = 0.75
    assert config_from_dict(swept).search.space == {"train.distill_weight": {"grid": [0, 0.5, 2]}}
    swept["search"]["space"]["train.distill_weight"] = {"choice": [-1, 0]}
    with pytest.raises(ConfigError, match=r"search.space.train.distill_weight: choice value -1.0 is out of range"):
        config_from_dict(swept)


@pytest.mark.parametrize("weight,general,expected", [(-0.5, True, NEGATIVE), (0.5, False, NO_GENERAL)])
def test_the_cli_rejects_bad_distill_settings_with_one_line_and_exit_2(tmp_path, tiny_gpt2_dir, capsys, weight,
                                                                         general, expected):
    from raycpt.cli import main

    raw = _raw(tmp_path, tiny_gpt2_dir, distill_weight=weight)
    if not general:
        raw["data"]["general"] = ""
        raw["train"]["mix_ratio"] = 1.0
    path = tmp_path / "case.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("raycpt: error: ") and expected in err, err
