"""The loop's batches come from a background thread (raycpt.core.data.batches): the same blocks in the same order as the
mixture plan indexed directly, so the same losses, bit for bit, also after a resume; no thread outlives a run, and
an error in the thread is raised in the loop's."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch

from raycpt.core import metrics as m
from raycpt.core.data.batches import THREAD_NAME, Batches
from raycpt.core.data.blocks import load_blocks, mixture_plan, mixture_seed, worker_positions
from raycpt.core.model.loading import apply_dropout, load_model
from raycpt.core.prepare import prepare_experiment
from raycpt.core.train.loop import build_optimizer, build_scheduler, train, train_step
from tests.test_train import _cfg as train_cfg


def batch_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == THREAD_NAME]


def reference_batch(domain, general, is_domain, index, step: int, micro: int, **layout) -> torch.Tensor:
    """One micro-batch straight from the plan: block by block, each row read from its corpus on its own."""
    pos = worker_positions(step, micro, **layout)
    rows = [np.asarray(domain[i] if from_domain else general[i]) for from_domain, i in
            zip(is_domain[pos], index[pos], strict=True)]
    return torch.from_numpy(np.stack(rows)).long()


@pytest.fixture()
def blocks(tmp_path):
    """A domain corpus in two .npy shards (read as one ShardedBlocks view) and a general one as a plain .npy."""
    rng = np.random.default_rng(0)
    shards = []
    for i, n in enumerate((37, 29)):
        path = tmp_path / f"domain-{i}.npy"
        np.save(path, rng.integers(0, 50_000, (n, 16), dtype=np.int32))
        shards.append(str(path))
    (tmp_path / "domain.json").write_text(json.dumps({"shards": shards, "limit": 60}))
    np.save(tmp_path / "general.npy", rng.integers(0, 50_000, (23, 16), dtype=np.int32))
    return load_blocks(str(tmp_path / "domain.json")), load_blocks(str(tmp_path / "general.npy"))


@pytest.mark.parametrize("world_size,rank,micro_batch,grad_accum,start_step,chunk", [
    (1, 0, 4, 1, 0, 8), (1, 0, 3, 2, 5, 3), (2, 1, 2, 3, 0, 1), (4, 2, 1, 2, 7, 5)])
def test_batches_are_the_plans_blocks_in_the_plans_order(blocks, world_size, rank, micro_batch, grad_accum,
                                                         start_step, chunk):
    domain, general = blocks
    steps = 12
    is_domain, index = mixture_plan(steps * micro_batch * grad_accum * world_size, 0.6, len(domain), len(general),
                                    seed=3, window=micro_batch * grad_accum * world_size)
    layout = dict(rank=rank, world_size=world_size, batch_size=micro_batch, grad_accum=grad_accum)
    with Batches(domain, general, is_domain, index, start_step=start_step, steps=steps, rank=rank,
                 world_size=world_size, micro_batch=micro_batch, grad_accum=grad_accum, device="cpu",
                 chunk=chunk) as batches:
        got = list(batches)
        domain_blocks = batches.domain_blocks
    want = [reference_batch(domain, general, is_domain, index, step, micro, **layout)
            for step in range(start_step, steps) for micro in range(grad_accum)]
    assert len(got) == len(want) == (steps - start_step) * grad_accum
    for a, b in zip(got, want, strict=True):
        assert a.dtype == torch.long and torch.equal(a, b)
    mine = [p for s in range(start_step, steps) for g in range(grad_accum)
            for p in range(*worker_positions(s, g, **layout).indices(len(is_domain)))]
    assert domain_blocks == int(is_domain[mine].sum())  # what data/domain_fraction counts
    assert not batch_threads()


def test_reused_buffers_never_change_a_batch_already_handed_out(blocks):
    """The thread refills its two chunk buffers while the loop still holds the batches copied out of them."""
    domain, general = blocks
    is_domain, index = mixture_plan(40 * 2, 0.5, len(domain), len(general), seed=1, window=2)
    with Batches(domain, general, is_domain, index, start_step=0, steps=40, rank=0, world_size=1, micro_batch=2,
                 grad_accum=1, device="cpu", chunk=2) as batches:
        held = [next(batches) for _ in range(40)]
    layout = dict(rank=0, world_size=1, batch_size=2, grad_accum=1)
    for step, batch in enumerate(held):
        assert torch.equal(batch, reference_batch(domain, general, is_domain, index, step, 0, **layout))


def test_an_error_in_the_thread_is_raised_in_the_loop_as_itself_after_the_batches_before_it(blocks):
    domain, general = blocks
    error = OSError("input/output error reading a shard")

    class Failing:
        """The general corpus, failing from its 2nd read on (a disk gone bad mid-run)."""

        shape = general.shape

        def __init__(self) -> None:
            self.reads = 0

        def __len__(self) -> int:
            return len(general)

        def __getitem__(self, rows):
            self.reads += 1
            if self.reads >= 2:
                raise error
            return general[rows]

    is_domain, index = mixture_plan(10 * 4, 0.5, len(domain), len(general), seed=0, window=4)
    batches = Batches(domain, Failing(), is_domain, index, start_step=0, steps=10, rank=0, world_size=1,
                      micro_batch=4, grad_accum=1, device="cpu", chunk=2)  # a read per 2 micro-batches
    try:
        got = []
        with pytest.raises(OSError) as raised:
            for batch in batches:
                got.append(batch)
        assert raised.value is error
        assert len(got) == 2  # the first chunk's batches, then the error
        with pytest.raises(OSError):  # and again if asked again: never a batch past it
            next(batches)
    finally:
        batches.close()
    assert not batch_threads()


def test_closing_early_ends_the_thread_and_a_plan_too_short_is_refused(blocks):
    domain, general = blocks
    is_domain, index = mixture_plan(100 * 2, 0.5, len(domain), len(general), seed=0, window=2)
    batches = Batches(domain, general, is_domain, index, start_step=0, steps=100, rank=0, world_size=1,
                      micro_batch=2, grad_accum=1, device="cpu")
    next(batches)
    batches.close()  # the loop stopped early (early stopping, the forgetting guard, an error)
    assert not batch_threads()
    with pytest.raises(ValueError, match="mixture plan holds 200 positions"):
        Batches(domain, general, is_domain, index, start_step=0, steps=101, rank=0, world_size=1, micro_batch=2,
                grad_accum=1, device="cpu")
    assert not batch_threads()


# --- the loop ------------------------------------------------------------------------------------------------------


def _cfg(corpora, model_dir, tmp_path, **train):
    """tests/test_train.py's config: 6 steps of 2 x 2 micro-batches, an eval after every step, no dropout."""
    return train_cfg(corpora, model_dir, tmp_path, **{"steps": 6, "batch_size": 2, "grad_accum": 2, "eval_every": 1,
                                                       "dropout": 0.0, **train})


def _train(cfg, manifest, root, resume: str | None = None, fed: list | None = None):
    """train() in-process: its reports and checkpoints; `fed` collects every micro-batch the model trained on."""
    reports: list[tuple[dict, str | None]] = []

    def record(module, args, kwargs):
        if module.training:  # not the held-out evaluation's forwards
            fed.append(kwargs["input_ids"].clone())

    def watch(model):
        if fed is not None:
            model.register_forward_pre_hook(record, with_kwargs=True)
        return model

    train(cfg, manifest, lambda metrics, checkpoint: reports.append((metrics, checkpoint)), checkpoint_root=root,
          resume_dir=resume, wrap_model=watch)
    return reports


def test_the_loop_trains_on_the_plans_blocks_with_the_losses_of_a_loop_fed_from_the_plan(corpora, tiny_gpt2_dir,
                                                                                        tmp_path):
    """train() feeds the model the plan's blocks (each checked) and reports, step by step, the very losses of a
    plain loop of train_step fed straight from the plan; resumed at step 3, it reports the uninterrupted run's
    losses for steps 4-6, bit for bit."""
    cfg = _cfg(corpora, tiny_gpt2_dir, tmp_path)
    t = cfg.train
    manifest = prepare_experiment(cfg)
    fed: list[torch.Tensor] = []
    full = _train(cfg, manifest, tmp_path / "full", fed=fed)
    assert [r[m.STEP] for r, _ in full] == list(range(1, 7))

    # the plan, indexed directly
    domain, general = load_blocks(manifest.domain.train), load_blocks(manifest.general.train)
    is_domain, index = mixture_plan(6 * 4, t.mix_ratio, len(domain), len(general),
                                    seed=mixture_seed(cfg.data.seed, t.seed), window=4)
    layout = dict(rank=0, world_size=1, batch_size=2, grad_accum=2)
    plan = [reference_batch(domain, general, is_domain, index, step, micro, **layout)
            for step in range(6) for micro in range(2)]
    assert len(fed) == len(plan)
    for step, (got, want) in enumerate(zip(fed, plan, strict=True)):
        assert got.dtype == torch.long and torch.equal(got, want), step

    # a plain loop of the same step on the same blocks: the same losses, bit for bit
    torch.manual_seed(t.seed)
    model = load_model(tiny_gpt2_dir)
    apply_dropout(model, t.dropout)
    model.config.use_cache = False
    model.train()
    optimizer = build_optimizer(model, t.lr, t.weight_decay, torch.device("cpu"), betas=(t.adam_beta1, t.adam_beta2),
                                eps=t.adam_eps)
    scheduler = build_scheduler(optimizer, t.warmup_steps, 6, t.min_lr_ratio)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    plain = [float(train_step(model, plan[2 * step:2 * step + 2], optimizer, scheduler, scaler,
                              grad_clip=t.grad_clip)) for step in range(6)]
    assert [r[m.TRAIN_LOSS] for r, _ in full] == plain

    # resumed from step 3's checkpoint: steps 4-6 as the uninterrupted run had them
    resumed = _train(cfg, manifest, tmp_path / "resumed", resume=full[2][1])
    assert [r[m.STEP] for r, _ in resumed] == [4, 5, 6]
    for (r, _), (want, _) in zip(resumed, full[3:], strict=True):
        for key in (m.TRAIN_LOSS, m.DOMAIN_LOSS, m.GENERAL_LOSS, m.LR):
            assert r[key] == want[key], (r[m.STEP], key)
    assert not batch_threads()


def test_no_batch_thread_outlives_a_run_that_fails(corpora, tiny_gpt2_dir, tmp_path):
    cfg = _cfg(corpora, tiny_gpt2_dir, tmp_path, steps=24, grad_accum=1)
    manifest = prepare_experiment(cfg)

    def report(metrics, checkpoint):
        # at step 1 of 24 the thread is two chunks ahead, no more: it waits for the loop to hand one back
        assert len(batch_threads()) == 1
        raise RuntimeError("the report failed")

    with pytest.raises(RuntimeError, match="the report failed"):
        train(cfg, manifest, report, checkpoint_root=tmp_path / "ckpt")
    assert not batch_threads()
