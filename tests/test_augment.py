"""`raycpt augment`: deterministic for a seed whatever the batching and the workers, resumable per unit, blind to
held-out and downstream validation/test texts, its output a corpus; bad settings are one line each (exit 2)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml

from raycpt.cli import main
from raycpt.core.augment import (
    MANIFEST,
    STYLE_TEMPLATES,
    AugmentWorker,
    augment_corpus,
)
from raycpt.core.config import AUGMENT_STYLES, config_from_dict
from raycpt.core.data.shards import map_in_process, normalize_text, split_hash, text_key, threshold_u
from raycpt.core.data.sources import corpus_units, load_documents, unit_bytes
from raycpt.core.errors import ConfigError, InputError
from raycpt.core.prepare import load_eval_task, prepare_experiment
from tests.conftest import write_jsonl

PLACES = ["harbour", "granary", "chapel", "forge", "orchard", "quarry", "tannery", "ferry", "mill", "bakery",
          "foundry", "vineyard", "lighthouse", "brewery"]
DOMAIN = [f"The {p} of village {i} was rebuilt in {1800 + 7 * i} after the flood, and its {p} keeper kept a "
          f"ledger of every visitor." for i, p in enumerate(PLACES)]
TASK = [f"Review {i}: the {w} film about the {p} was {w}." for i, (w, p) in enumerate(
    zip(["dull", "great", "slow", "moving", "flat", "bright", "tired", "sharp"], PLACES, strict=False))]
LABELS = ["neg", "pos", "neg", "pos", "neg", "pos", "neg", "pos"]
STYLES, COPIES = ["paraphrase", "qa"], 2


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_gpt2_dir):
    """A 22-document domain corpus in 3 read units (the task's texts among them) and its data step, run once. One
    torch thread: the tiny model gains nothing from two, and two wait on each other when the machine is busy."""
    root = tmp_path_factory.mktemp("augment")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAYCPT_CACHE", str(root / "cache"))
        write_jsonl(root / "domain.jsonl", DOMAIN[:7] + TASK + DOMAIN[7:])
        write_jsonl(root / "task.jsonl", TASK, label=LABELS)
        raw = {"data": {"domain": str(root / "domain.jsonl"), "block_size": 16, "heldout_blocks": 1, "test_blocks": 1,
                        "unit_mb": 0.001},
               "eval": {"task": str(root / "task.jsonl"), "train_size": 0, "val_size": 2, "test_size": 2, "seed": 1},
               "train": {"mix_ratio": 1}, "model": {"source": tiny_gpt2_dir}, "storage_path": str(root / "runs"),
               "augment": {"styles": STYLES, "copies": COPIES, "max_new_tokens": 8, "batch_size": 4}}
        cfg = config_from_dict(raw)
        manifest = prepare_experiment(cfg)
        cfg.experiment_dir().mkdir(parents=True)
        manifest.save(cfg.experiment_dir())
        yield raw, manifest, root
    torch.set_num_threads(threads)


def configure(prepared, out: Path, **augment):
    raw, _, _ = prepared
    return config_from_dict({**raw, "augment": {**raw["augment"], **augment, "output": str(out)}})


def run(prepared, out: Path, mapper=map_in_process, **augment):
    return augment_corpus(configure(prepared, out, **augment), mapper=mapper, manifest=prepared[1])


def corpus_bytes(result) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(Path(result.corpus).glob("unit_*.jsonl")))


def split_of(prepared) -> dict[str, list[str]]:
    """The domain documents by what augment must do with them, worked out here from the data step's threshold."""
    raw, manifest, _ = prepared
    cfg = config_from_dict(raw)
    banned = {text_key(t) for t in load_eval_task(cfg).heldout_texts()}
    threshold = threshold_u(manifest.domain.heldout_fraction)
    out: dict[str, list[str]] = {"train": [], "heldout": [], "task": []}
    for text in DOMAIN[:7] + TASK + DOMAIN[7:]:
        key = text_key(text)
        out["task" if key in banned else "heldout" if split_hash(key, cfg.data.seed) < threshold else "train"].append(
            text)
    return out


class Recording(AugmentWorker):
    """The worker with every prompt it gets recorded (in this process); `generating` False skips the generation."""

    prompts: list[str] = []
    generating = True

    def generate(self, prompts, seeds):
        Recording.prompts += prompts
        return super().generate(prompts, seeds) if Recording.generating else [("stub", 1)] * len(prompts)


def recording(worker, args, items):
    return map_in_process(Recording, args, items)


@pytest.fixture(scope="module")
def reference(prepared, tmp_path_factory):
    """The job with this module's settings (batch_size 4), in process, every prompt recorded."""
    Recording.prompts, Recording.generating = [], True
    result = run(prepared, tmp_path_factory.mktemp("reference"), mapper=recording)
    return result, corpus_bytes(result), list(Recording.prompts)


def test_builtin_styles_match_the_config_names():
    assert tuple(STYLE_TEMPLATES) == AUGMENT_STYLES
    assert all("{text}" in t for t in STYLE_TEMPLATES.values())


def test_same_seed_same_bytes_whatever_the_batch_another_seed_other_texts(prepared, reference, tmp_path):
    first, expected, _ = reference
    assert first.texts > 0 and len(first.units) == 3
    assert corpus_bytes(run(prepared, tmp_path / "again")) == expected
    assert corpus_bytes(run(prepared, tmp_path / "one-by-one", batch_size=1)) == expected, "batching changed tokens"
    other = corpus_bytes(run(prepared, tmp_path / "other", seed=1))
    texts = [json.loads(line)["text"] for line in expected.decode().splitlines()]
    other_texts = [json.loads(line)["text"] for line in other.decode().splitlines()]
    assert sum(a != b for a, b in zip(texts, other_texts, strict=True)) > len(texts) // 2
    copies = {}
    for line in expected.decode().splitlines():
        row = json.loads(line)
        copies.setdefault((row["source_key"], row["style"]), []).append(row["text"])
    assert all(len(set(v)) == COPIES for v in copies.values()), "the copies of a document should differ"


def test_output_is_a_corpus_of_one_text_per_train_document_style_and_copy(prepared, reference):
    result = reference[0]
    split = split_of(prepared)
    assert split["heldout"] and split["task"] and split["train"]
    # the documents the data step itself held out (its record beside the shards) are the ones skipped here
    shards = json.loads((Path(prepared[1].domain.train).parent / "corpus.json").read_text())
    assert shards["heldout_documents"] == len(split["heldout"]) == result.heldout_skipped
    assert shards["removed_for_leakage"] == len(split["task"]) == result.leakage_skipped
    expected = len(split["train"]) * len(STYLES) * COPIES
    assert result.empty == 0 and result.texts == expected
    assert (result.documents, result.heldout_skipped, result.leakage_skipped) == (
        len(DOMAIN) + len(TASK), len(split["heldout"]), len(split["task"]))
    ds = load_documents(result.corpus)
    assert len(ds) == expected
    units, _, _ = corpus_units(result.corpus, text_field="text", field="data.domain", txt_unit="file",
                               unit_bytes=unit_bytes(16))
    assert sum(len(u.segments) for u in units) == 3
    rows = [json.loads(line) for p in sorted(Path(result.corpus).glob("*.jsonl")) for line in p.open()]
    assert {(r["source_key"], r["style"], r["copy"]) for r in rows} == {
        (f"{text_key(t):016x}", s, c) for t in split["train"] for s in STYLES for c in range(COPIES)}
    assert {(r["generator"], r["seed"]) for r in rows} == {(prepared[0]["model"]["source"], 0)}
    manifest = json.loads((Path(result.output) / MANIFEST).read_text())
    assert manifest["texts"] == expected and manifest["tokens"] == result.tokens > 0
    assert manifest["styles"] == {s: STYLE_TEMPLATES[s] for s in STYLES}
    assert manifest["data"]["heldout_fraction"] == prepared[1].domain.heldout_fraction


def test_generator_never_sees_heldout_or_task_texts(prepared, reference, tmp_path):
    split = split_of(prepared)
    guarded = [normalize_text(t) for t in split["heldout"] + split["task"]]
    seen = [normalize_text(p) for p in reference[2]]
    assert len(seen) == len(split["train"]) * len(STYLES) * COPIES
    assert all(any(normalize_text(t) in p for p in seen) for t in split["train"])
    leaked = [t for t in guarded if any(t in p for p in seen)]
    assert not leaked, f"the generator saw held-out or task validation/test texts: {leaked}"

    def unguarded(worker, args, items):  # the same job with the guard off: the check above would catch it
        (spec,) = args
        return map_in_process(Recording, (dataclasses.replace(spec, threshold=0, banned=()),), items)

    Recording.prompts, Recording.generating = [], False
    try:
        run(prepared, tmp_path / "unguarded", mapper=unguarded)
    finally:
        Recording.generating = True
    seen = [normalize_text(p) for p in Recording.prompts]
    assert all(any(t in p for p in seen) for t in guarded)


def test_a_user_template_gets_the_document_cut_to_max_input_tokens(prepared, tmp_path, tokenizer):
    split = split_of(prepared)
    Recording.prompts, Recording.generating = [], False
    try:
        result = run(prepared, tmp_path / "glossary", mapper=recording, styles=["glossary"], copies=1,
                     templates={"glossary": "Terms of {text} -> glossary:"}, max_input_tokens=4)
    finally:
        Recording.generating = True
    cut = [tokenizer.decode(tokenizer(t)["input_ids"][:4]) for t in split["train"]]
    assert sorted(Recording.prompts) == sorted(f"Terms of {c} -> glossary:" for c in cut)
    assert result.styles == {"glossary": "Terms of {text} -> glossary:"} and result.texts == len(split["train"])


class Crashing(AugmentWorker):
    def run(self, index, unit):
        if index == 2:
            raise RuntimeError("killed")
        return super().run(index, unit)


def test_a_rerun_redoes_only_the_units_that_did_not_finish(prepared, reference, tmp_path):
    reference = reference[1]
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="killed"):
        run(prepared, out, mapper=lambda worker, args, items: map_in_process(Crashing, args, items))
    texts = out / "texts"
    assert sorted(p.name for p in texts.glob("unit_*")) == [
        "unit_00000.done", "unit_00000.jsonl", "unit_00001.done", "unit_00001.jsonl"]
    dispatched = []

    def counting(worker, args, items):
        dispatched.append([item["index"] for item in items])
        return map_in_process(worker, args, items)

    result = run(prepared, out, mapper=counting)
    assert dispatched == [[2]] and result.resumed_units == 2
    assert corpus_bytes(result) == reference
    # a unit whose output went missing is redone alone; the others are not touched
    stamps = {p.name: p.stat().st_mtime_ns for p in texts.iterdir()}
    (texts / "unit_00001.jsonl").unlink()
    dispatched.clear()
    run(prepared, out, mapper=counting)
    assert dispatched == [[1]] and corpus_bytes(result) == reference
    assert all(p.stat().st_mtime_ns == stamps[p.name] for p in texts.iterdir() if "00001" not in p.name)
    dispatched.clear()
    run(prepared, out, mapper=counting)
    assert dispatched == [], "a finished job starts no worker"
    dispatched.clear()
    changed = run(prepared, out, mapper=counting, styles=["summary"], copies=1)  # other settings: all redone
    assert dispatched == [[0, 1, 2]] and changed.resumed_units == 0 and corpus_bytes(changed) != reference


@pytest.mark.parametrize(("setting", "message"), [
    ({"styles": ["paraphrse"]}, "augment.styles: 'paraphrse' is neither built in nor in augment.templates (did you "
                                "mean 'paraphrase'?)"),
    ({"styles": ["glossary"], "templates": {"glossary": "List the terms."}}, "augment.templates.glossary: no {text}"),
    ({"styles": ["glossary"], "templates": {"glossary": " "}}, "augment.templates.glossary: empty"),
    ({"copies": 0}, "augment.copies: 0 is out of range, must be >= 1"),
    ({"max_new_tokens": 0}, "augment.max_new_tokens: 0 is out of range, must be >= 1"),
    ({"temperature": -0.5}, "augment.temperature: -0.5 is out of range, must be >= 0"),
    ({"top_p": 0}, "augment.top_p: 0.0 is out of range, must be > 0 and <= 1"),
    ({"top_p": 1.2}, "augment.top_p: 1.2 is out of range, must be > 0 and <= 1"),
])
def test_bad_settings_are_one_line_each(prepared, tmp_path, capsys, setting, message):
    raw, _, _ = prepared
    with pytest.raises(ConfigError) as err:
        config_from_dict({**raw, "augment": {**raw["augment"], **setting}})
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**raw, "augment": {**raw["augment"], **setting}}))
    assert main(["augment", str(path)]) == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith(f"raycpt: error: {message}") and stderr.count("\n") == 1


def test_a_generator_that_cannot_load_or_generate_fails_before_any_work(prepared, tmp_path, capsys):
    from transformers import DistilBertConfig

    encoder = tmp_path / "encoder"
    DistilBertConfig(n_layers=1, dim=8, hidden_dim=16, n_heads=2).save_pretrained(encoder)
    raw, _, root = prepared
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({**raw, "name": "bad-generator"}))
    for setting, message in ((f"augment.model={tmp_path / 'missing'}", f"augment.model '{tmp_path / 'missing'}': "
                              "no such model directory"),
                             (f"augment.model={encoder}", f"augment.model '{encoder}': a 'distilbert' model is not "
                              "a causal LM"),
                             ("augment.max_new_tokens=512", "augment.max_new_tokens=512 leaves no room for a prompt")):
        assert main(["augment", str(path), "--set", setting]) == 2
        stderr = capsys.readouterr().err
        assert stderr.startswith(f"raycpt: error: {message}") and stderr.count("\n") == 1, stderr
    assert not (root / "runs" / "bad-generator" / "augment").exists()


def test_one_and_two_ray_workers_and_the_cli_write_the_in_process_bytes(prepared, reference, tmp_path, local_ray,
                                                                       capsys):
    from raycpt.edge.data import RayDataMapper

    reference = reference[1]
    for workers in (1, 2):
        with RayDataMapper(workers=workers) as mapper:
            assert corpus_bytes(run(prepared, tmp_path / f"ray-{workers}", mapper=mapper)) == reference, workers
    raw, _, _ = prepared
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({**raw, "augment": {**raw["augment"], "output": str(tmp_path / "cli")}}))
    assert main(["augment", str(path)]) == 0
    out = capsys.readouterr().out
    assert "Augmented corpus: " in out and str(tmp_path / "cli" / "texts") in out.replace("\n", "")
    assert corpus_bytes(type("R", (), {"corpus": str(tmp_path / "cli" / "texts")})) == reference


def test_one_config_rewrites_then_prepares_and_trains_on_the_rewrites(prepared, reference, tmp_path, capsys):
    """data.synthetic: augment: `prepare` runs the augment stage first (the bytes `raycpt augment` writes), then
    the data step prepares the rewrites as the synthetic corpus and `train` draws its domain side from them; the
    stage again redoes nothing. Before the stage, the data step names what to run."""
    raw, _, _ = prepared
    one = {**raw, "name": "one-config", "data": {**raw["data"], "synthetic": "augment"},
           "train": {**raw["train"], "synthetic_ratio": 1.0, "steps": 2, "batch_size": 2, "eval_every": 2}}
    cfg = config_from_dict(one)
    with pytest.raises(InputError, match=r"^data.synthetic: augment: .* holds no rewrites yet; run `raycpt augment"):
        prepare_experiment(cfg)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(one))
    assert main(["validate", str(path)]) == 0
    assert "data.synthetic: augment: to be written by the augment stage" in capsys.readouterr().out
    assert main(["prepare", str(path), "--no-ray"]) == 0
    texts = cfg.experiment_dir() / "augment" / "texts"
    assert corpus_bytes(type("R", (), {"corpus": str(texts)})) == reference[1]
    manifest = prepare_experiment(cfg)
    assert manifest.synthetic is not None and manifest.synthetic.train_tokens > 0
    stamps = {p.name: p.stat().st_mtime_ns for p in texts.iterdir()}
    capsys.readouterr()
    assert main(["train", str(path), "--no-ray"]) == 0
    out = capsys.readouterr().out
    units = len(list(texts.glob("unit_*.done")))
    assert f"{units} unit(s) done by an earlier run" in out and "synthetic 1.00 of the domain side" in out, out
    assert {p.name: p.stat().st_mtime_ns for p in texts.iterdir()} == stamps, "the stage again rewrote units"
