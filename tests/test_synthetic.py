"""The synthetic corpus as a third mixture source (data.synthetic, train.synthetic_ratio): the three-source plan
realises both ratios exactly at every window end, is prefix-stable and reads each corpus in passes without repeats;
ratio 0 is the two-corpus run bit for bit (plan, losses, manifest fingerprint); the loop draws, counts and reports
the synthetic blocks (not as general rows under distillation); bad settings fail with one line."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math

import numpy as np
import pytest
import torch

import raycpt.core.train.loop as train_module
from raycpt.core import metrics as m
from raycpt.core.config import config_from_dict, validate, with_overrides
from raycpt.core.data.batches import Batches
from raycpt.core.data.blocks import TIMING_FIELDS, load_blocks, mixture_plan, synthetic_plan, worker_positions
from raycpt.core.errors import ConfigError, InputError
from raycpt.core.prepare import Manifest, prepare_experiment
from raycpt.core.train.loop import train
from tests.conftest import write_corpora, write_jsonl

SYNTHETIC_SENTENCES = [
    "Question: what does the critic praise in the drama? Answer: the acting, the photography and the tears it earns.",
    "Glossary entry. Third act: the final movement of a screenplay, where the conflict resolves or collapses.",
    "In plain words: the sequel tells the same jokes again, but louder and with less wit than the first film.",
    "Entities: the thriller, its characters, its twists; the twists land because the characters feel real.",
]


def _plan(n, mix, synth, *, n_domain=23, n_general=17, n_synthetic=11, seed=5, window=8):
    return synthetic_plan(n, mix, n_domain, n_general, seed, window, synthetic_ratio=synth, n_synthetic=n_synthetic)


# --- the plan ----------------------------------------------------------------------------------------------------

def test_a_hand_checked_plan_carries_the_rounding_error_of_the_synthetic_share_across_windows():
    """window 4, mix 0.75: 3 domain-side positions per window; synthetic 0.5 of them: cumulative 1.5, 3, 4.5, 6 ->
    round (half to even) 2, 3, 4, 6 -> 2, 1, 1, 2 synthetic positions in windows 0..3, all on the domain side."""
    is_domain, is_synthetic, _ = _plan(16, 0.75, 0.5, window=4)
    assert is_domain.reshape(4, 4).sum(axis=1).tolist() == [3, 3, 3, 3]
    assert is_synthetic.reshape(4, 4).sum(axis=1).tolist() == [2, 1, 1, 2]
    assert not (is_synthetic & ~is_domain).any()
    # ratio 1: the whole domain side is synthetic; mix 0: no domain side, so nothing synthetic
    is_domain, is_synthetic, _ = _plan(16, 0.75, 1.0, window=4)
    assert np.array_equal(is_synthetic, is_domain) and is_synthetic.sum() == 12
    assert not _plan(16, 0.0, 0.5, window=4)[1].any()


@pytest.mark.parametrize("mix,synth,window", [(0.8, 0.0, 8), (0.8, 0.3, 8), (0.75, 0.5, 4), (0.6, 1.0, 5),
                                              (1.0, 0.37, 6), (0.5, 0.77, 7), (1.0, 1.0, 3)])
def test_the_three_source_plan_realises_both_ratios_at_every_window_end(mix, synth, window):
    is_domain, is_synthetic, _ = _plan(60 * window, mix, synth, window=window)
    assert not (is_synthetic & ~is_domain).any()  # synthetic positions are domain-side positions
    for end in range(window, 60 * window + 1, window):
        side, synthetic = int(is_domain[:end].sum()), int(is_synthetic[:end].sum())
        assert side == round(mix * end), end
        assert synthetic == round(synth * side), end


def test_ratio_zero_is_the_two_corpus_plan_bit_for_bit():
    for n, window in ((1000, 8), (333, 7)):
        is_domain, index = mixture_plan(n, 0.7, 23, 17, seed=9, window=window)
        for n_synthetic in (0, 11):
            three = synthetic_plan(n, 0.7, 23, 17, 9, window, synthetic_ratio=0.0, n_synthetic=n_synthetic)
            assert np.array_equal(three[0], is_domain) and np.array_equal(three[2], index)
            assert three[1].dtype == bool and not three[1].any()


@pytest.mark.parametrize("mix,synth,window", [(0.8, 0.5, 8), (0.77, 0.3, 5), (1.0, 1.0, 4), (0.6, 0.9, 6)])
def test_the_plan_is_prefix_stable_for_every_source_and_index(mix, synth, window):
    """A plan of N positions is the start of a plan of 2N (raycpt extend continues the trial's stream), whole
    windows or not: domain side, synthetic flags and every index, the real domain's draws included."""
    for n in (1, window - 1, window, 3 * window + 2, 97, 250):
        short, long = _plan(n, mix, synth, window=window), _plan(2 * n, mix, synth, window=window)
        for a, b in zip(short, long, strict=True):
            assert np.array_equal(a, b[:n]), n


def test_general_draws_are_the_two_corpus_plans_and_real_domain_keeps_the_domain_stream():
    """The synthetic share only re-assigns domain-side positions: the general positions and their blocks are the
    two-corpus plan's, and the real domain positions take the domain stream's first draws in order (so a real
    domain block is read once per pass of the domain corpus, however many positions went synthetic)."""
    is_domain, is_synthetic, index = _plan(800, 0.75, 0.4)
    plain_domain, plain_index = mixture_plan(800, 0.75, 23, 17, 5, 8)
    assert np.array_equal(is_domain, plain_domain)
    assert np.array_equal(index[~is_domain], plain_index[~is_domain])
    real = is_domain & ~is_synthetic
    assert np.array_equal(index[real], plain_index[plain_domain][:real.sum()])


@pytest.mark.parametrize("synth", [0.3, 1.0])
def test_each_corpus_is_read_in_passes_without_repeats(synth):
    n_domain, n_general, n_synthetic = 23, 17, 11
    is_domain, is_synthetic, index = _plan(900, 0.8, synth, n_domain=n_domain, n_general=n_general,
                                           n_synthetic=n_synthetic)
    for mask, n in ((is_synthetic, n_synthetic), (is_domain & ~is_synthetic, n_domain), (~is_domain, n_general)):
        drawn = index[mask]
        assert len(drawn) == 0 or (drawn.min() >= 0 and drawn.max() < n)
        for start in range(0, len(drawn), n):
            one_pass = drawn[start:start + n].tolist()
            assert len(set(one_pass)) == len(one_pass)  # no block twice within a pass
            if len(one_pass) == n:
                assert sorted(one_pass) == list(range(n))  # a whole pass reads every block once
    assert len(index[is_synthetic]) >= 3 * n_synthetic  # several whole passes were checked


def test_a_synthetic_share_without_synthetic_blocks_is_an_input_error():
    with pytest.raises(InputError) as err:
        _plan(64, 0.8, 0.5, n_synthetic=0)
    assert "data.synthetic" in str(err.value) and "\n" not in str(err.value)
    assert not _plan(64, 0.8, 0.0, n_synthetic=0)[1].any()  # ratio 0 needs none
    assert not _plan(64, 0.0, 0.5, n_synthetic=0)[1].any()  # nor does a mixture without a domain side


# --- the batches -------------------------------------------------------------------------------------------------

def test_batches_read_each_row_from_its_own_corpus_and_count_it():
    """Blocks filled with their corpus's code (1000s domain, 2000s general, 3000s synthetic) + their row: every row
    handed out is the plan's corpus and block; the counts are the plan's; synthetic rows are not flagged general."""
    width = 16
    domain, general, synthetic = (np.repeat((base + np.arange(n))[:, None], width, axis=1).astype(np.int32)
                                  for base, n in ((1000, 23), (2000, 17), (3000, 11)))
    layout = dict(rank=1, world_size=2, micro_batch=2, grad_accum=3)
    steps, window = 9, 2 * 3 * 2
    is_domain, is_synthetic, index = synthetic_plan(steps * window, 0.75, 23, 17, 4, window, synthetic_ratio=0.5,
                                                    n_synthetic=11)
    with Batches(domain, general, is_domain, index, start_step=2, steps=steps, device="cpu", chunk=4,
                 with_general=True, synthetic=synthetic, is_synthetic=is_synthetic, **layout) as batches:
        pairs = list(batches)
    assert len(pairs) == (steps - 2) * 3
    positions = []
    for i, (ids, general_rows) in enumerate(pairs):
        step, micro = divmod(2 * 3 + i, 3)
        pos = worker_positions(step, micro, rank=1, world_size=2, batch_size=2, grad_accum=3)
        positions += range(pos.start, pos.stop)
        for row, p in zip(ids.tolist(), range(pos.start, pos.stop), strict=True):
            base = 3000 if is_synthetic[p] else 1000 if is_domain[p] else 2000
            assert row == [base + index[p]] * width, p
        assert general_rows.tolist() == (~is_domain[pos]).tolist()
    assert batches.domain_blocks == is_domain[positions].sum()
    assert batches.synthetic_blocks == is_synthetic[positions].sum() > 0


# --- the loop ----------------------------------------------------------------------------------------------------

def _written(path, texts: list[str]) -> str:
    """`path`, written once (a file written again is another source to the data cache)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return str(path if path.exists() else write_jsonl(path, texts))


def _raw(tmp, source: str, synthetic: bool = True, **train_fields) -> dict:
    data = {**write_corpora(tmp), "block_size": 32, "heldout_fraction": 0.1, "heldout_blocks": 4}
    if synthetic:  # the dir raycpt augment writes: a jsonl file and a done marker per read unit
        _written(tmp / "augment" / "texts" / "unit_00000.jsonl",
                 [f"{s} Rewrite {i}." for i in range(40) for s in SYNTHETIC_SENTENCES])
        done = tmp / "augment" / "texts" / "unit_00000.done"
        if not done.exists():
            done.write_text('{"texts": 160}')
        data["synthetic"] = str(tmp / "augment" / "texts")
    return {"name": "synthetic", "storage_path": str(tmp), "model": {"source": source}, "data": data,
            "train": {"lr": 1e-2, "steps": 3, "batch_size": 4, "eval_every": 1, "warmup_steps": 0,
                      "mix_ratio": 0.75, **train_fields}}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_gpt2_dir):
    """The three corpora prepared once, and the same experiment prepared without data.synthetic."""
    tmp = tmp_path_factory.mktemp("synthetic")
    with_synthetic = prepare_experiment(config_from_dict(_raw(tmp, tiny_gpt2_dir)))
    without = prepare_experiment(config_from_dict(_raw(tmp, tiny_gpt2_dir, synthetic=False)))
    return tmp, with_synthetic, without


def _run(prepared, tiny_gpt2_dir, name: str, synthetic: bool = True, **fields) -> list[dict]:
    tmp, with_synthetic, without = prepared
    cfg = config_from_dict(_raw(tmp, tiny_gpt2_dir, synthetic=synthetic, **fields))
    reports: list[dict] = []
    train(cfg, with_synthetic if synthetic else without, lambda metrics, checkpoint: reports.append(metrics),
          checkpoint_root=tmp / name)
    return reports


def _old_fingerprint(manifest: Manifest) -> str:
    """The fingerprint as computed before synthetic corpora existed, written out."""
    raw = dataclasses.asdict(manifest)
    raw.pop("fingerprint")
    raw.pop("synthetic")
    for corpus in ("domain", "general"):
        if raw[corpus]:
            for how in TIMING_FIELDS:
                raw[corpus].pop(how)
    return hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()[:16]


def test_the_manifest_without_synthetic_keeps_its_fingerprint_and_json(prepared, tmp_path):
    _, with_synthetic, without = prepared
    assert without.synthetic is None and "synthetic" not in without.to_dict()
    assert without.fingerprint == _old_fingerprint(without)
    # an old manifest (no key) loads, and is the same manifest
    old = without.to_dict()
    assert Manifest.from_dict(old) == without
    # the synthetic corpus is in the manifest, its JSON and its fingerprint; it round-trips through the file
    assert with_synthetic.synthetic is not None and with_synthetic.synthetic.train_tokens > 0
    assert with_synthetic.fingerprint != without.fingerprint
    assert dataclasses.replace(with_synthetic, synthetic=None).compute_fingerprint() == without.fingerprint
    with_synthetic.save(tmp_path)
    assert Manifest.load(tmp_path) == with_synthetic


def test_ratio_zero_trains_exactly_as_the_run_without_a_synthetic_corpus(prepared, tiny_gpt2_dir):
    with_corpus = _run(prepared, tiny_gpt2_dir, "zero", synthetic_ratio=0.0)
    plain = _run(prepared, tiny_gpt2_dir, "plain", synthetic=False)
    for key in (m.TRAIN_LOSS, m.DOMAIN_LOSS, m.GENERAL_LOSS, m.DOMAIN_FRACTION):
        assert [r[key] for r in with_corpus] == [r[key] for r in plain], key
    assert [r[m.SYNTHETIC_FRACTION] for r in with_corpus] == [0.0, 0.0, 0.0]
    assert [r[m.SYNTHETIC_FRACTION] for r in plain] == [None, None, None]


def _block_set(path: str) -> set[bytes]:
    return {row.tobytes() for row in np.asarray(load_blocks(path), dtype=np.int64)}


def test_the_loop_draws_and_reports_the_synthetic_share_and_distills_on_general_rows_only(prepared, tiny_gpt2_dir,
                                                                                          monkeypatch):
    """mix 0.75 of 4 blocks per step: 3 domain-side blocks a step, half of them synthetic, so after steps 1, 2, 3
    round(1.5) = 2, 3, round(4.5) = 4 synthetic of 3, 6, 9: fractions 2/3, 1/2, 4/9 (each within half a block of
    0.5). The rows train_step gets are checked against the corpora's blocks: the synthetic ones come from the
    synthetic corpus and are never flagged general (distillation on)."""
    _, manifest, _ = prepared
    synthetic, general = _block_set(manifest.synthetic.train), _block_set(manifest.general.train)
    domain = _block_set(manifest.domain.train)
    assert not (synthetic & domain) and not (synthetic & general)  # distinctive text: no block in two corpora
    seen: list[tuple[str, bool]] = []
    real_step = train_module.train_step

    def recording_step(model, micro_batches, *args, **kwargs):
        for ids, flags in zip(micro_batches, kwargs["general"], strict=True):
            for row, flag in zip(ids.cpu().numpy(), flags.tolist(), strict=True):
                key = row.tobytes()
                source = "synthetic" if key in synthetic else "general" if key in general else "domain"
                seen.append((source, flag))
        return real_step(model, micro_batches, *args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", recording_step)
    reports = _run(prepared, tiny_gpt2_dir, "half", synthetic_ratio=0.5, distill_weight=1.0)
    fractions = [r[m.SYNTHETIC_FRACTION] for r in reports]
    assert fractions == pytest.approx([2 / 3, 1 / 2, 4 / 9], abs=1e-12)
    for step, fraction in enumerate(fractions, start=1):
        assert abs(fraction - 0.5) <= 0.5 / (3 * step) + 1e-12
    assert [r[m.DOMAIN_FRACTION] for r in reports] == [0.75, 0.75, 0.75]
    assert all(math.isfinite(r[m.TRAIN_LOSS]) and math.isfinite(r[m.DISTILL_KL]) for r in reports)
    assert len(seen) == 12 and [s for s, _ in seen].count("synthetic") == 4
    assert [s for s, _ in seen].count("general") == 3
    assert all(flag == (source == "general") for source, flag in seen)


def test_a_synthetic_ratio_without_prepared_synthetic_blocks_fails_the_run(prepared, tiny_gpt2_dir):
    """A config that skipped validate (or a manifest prepared without data.synthetic): one-line InputError."""
    tmp, _, without = prepared
    cfg = config_from_dict(_raw(tmp, tiny_gpt2_dir, synthetic_ratio=0.5))
    with pytest.raises(InputError, match=r"^train.synthetic_ratio needs blocks .*data.synthetic$"):
        train(cfg, without, lambda metrics, checkpoint: None, checkpoint_root=tmp / "fails")


# --- bad input ---------------------------------------------------------------------------------------------------

NO_SYNTHETIC = ("train.synthetic_ratio > 0 needs a synthetic corpus; set data.synthetic (e.g. the texts/ dir "
                "`raycpt augment` wrote)")


def test_validate_names_a_ratio_out_of_range_and_a_ratio_without_a_synthetic_corpus(tmp_path, tiny_gpt2_dir):
    cfg = config_from_dict(_raw(tmp_path, tiny_gpt2_dir, synthetic_ratio=0.5))
    assert validate(cfg) == []
    for bad in (1.5, -0.25):
        cfg.train.synthetic_ratio = bad
        assert validate(cfg) == [f"train.synthetic_ratio: {bad} is out of range, must be >= 0 and <= 1"]
    cfg.train.synthetic_ratio, cfg.data.synthetic = 0.5, ""
    assert validate(cfg) == [NO_SYNTHETIC]
    cfg.train.synthetic_ratio = 0.0
    assert validate(cfg) == []  # ratio 0 needs no synthetic corpus

    # swept like any train field; each value of the space is checked as the field itself is
    swept = _raw(tmp_path, tiny_gpt2_dir, synthetic=False)
    swept["search"] = {"space": {"train.synthetic_ratio": {"grid": [0, 0.5]}}}
    with pytest.raises(ConfigError) as err:
        config_from_dict(swept)
    assert str(err.value) == f"search.space.train.synthetic_ratio: grid value 0.5: {NO_SYNTHETIC}"
    swept["data"]["synthetic"] = _raw(tmp_path, tiny_gpt2_dir)["data"]["synthetic"]
    assert config_from_dict(swept).search.space == {"train.synthetic_ratio": {"grid": [0, 0.5]}}
    swept["search"]["space"]["train.synthetic_ratio"] = {"choice": [0, 2]}
    with pytest.raises(ConfigError, match=r"^search.space.train.synthetic_ratio: choice value 2.0 is out of range"):
        config_from_dict(swept)
    # a synthetic corpus as a hub-style mapping is coerced like data.domain's
    mapped = with_overrides(cfg, {"data.synthetic": {"path": swept["data"]["synthetic"]}})
    assert mapped.data.synthetic == {"path": swept["data"]["synthetic"]}


@pytest.mark.parametrize("texts,expected", [([], "the file is empty"), (["Too short."], "too short")])
def test_a_synthetic_corpus_with_no_blocks_is_an_input_error_naming_data_synthetic(tmp_path, tiny_gpt2_dir, texts,
                                                                                    expected):
    (tmp_path / "augment" / "texts").mkdir(parents=True)
    write_jsonl(tmp_path / "augment" / "texts" / "unit_00000.jsonl", texts)
    raw = _raw(tmp_path, tiny_gpt2_dir, synthetic_ratio=0.5)
    with pytest.raises(InputError) as err:
        prepare_experiment(config_from_dict(raw))
    assert str(err.value).startswith("data.synthetic ") and expected in str(err.value)
    assert "\n" not in str(err.value)


def test_batches_without_a_synthetic_corpus_are_unchanged_by_a_plan_with_none():
    """The two-corpus call and the three-corpus call with no synthetic position hand out the same ids."""
    rng = np.random.default_rng(1)
    domain, general = rng.integers(0, 50_000, (19, 8), dtype=np.int32), rng.integers(0, 50_000, (13, 8),
                                                                                     dtype=np.int32)
    is_domain, is_synthetic, index = synthetic_plan(40, 0.6, 19, 13, 2, 4, synthetic_ratio=0.0, n_synthetic=5)
    kwargs = dict(start_step=0, steps=10, rank=0, world_size=1, micro_batch=2, grad_accum=2, device="cpu")
    with Batches(domain, general, is_domain, index, **kwargs) as two:
        plain = list(two)
    sevens = np.full((5, 8), 7, dtype=np.int32)
    with Batches(domain, general, is_domain, index, synthetic=sevens, is_synthetic=is_synthetic, **kwargs) as three:
        assert all(torch.equal(a, b) for a, b in zip(plain, three, strict=True))
    assert three.synthetic_blocks == 0 and three.domain_blocks == two.domain_blocks
