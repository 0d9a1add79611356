"""The bad-input catalogue: every case is rejected by `raycpt validate` and by `raycpt sweep` before Ray starts,
with exit code 2 and one line on stderr naming the field or file and what is allowed, and no traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from raycpt.cli import main
from tests.conftest import DOMAIN_SENTENCES, GENERAL_SENTENCES, write_jsonl


@pytest.fixture()
def inputs(tmp_path, tiny_gpt2_dir):
    domain = write_jsonl(tmp_path / "domain.jsonl", [f"{s} {i}" for i in range(30) for s in DOMAIN_SENTENCES])
    general = write_jsonl(tmp_path / "general.jsonl", [f"{s} {i}" for i in range(30) for s in GENERAL_SENTENCES])
    labels = ["pos", "neg"] * 30
    task = write_jsonl(tmp_path / "task.jsonl", [f"labelled review {i}" for i in range(60)], label=labels)
    base = {"name": "bad", "storage_path": str(tmp_path / "runs"), "model": {"source": tiny_gpt2_dir},
            "data": {"domain": str(domain), "general": str(general), "block_size": 16, "heldout_blocks": 2},
            "train": {"steps": 2, "eval_every": 1},
            "eval": {"task": str(task), "label_field": "label", "train_size": 20, "val_size": 10,
                     "test_size": 10},
            "search": {"space": {"train.lr": {"loguniform": [1e-4, 1e-3]}}, "num_samples": 1}}
    return tmp_path, base


def _write(tmp_path: Path, cfg: dict | str) -> str:
    path = tmp_path / "case.yaml"
    path.write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg))
    return str(path)


def _set(cfg: dict, dotted: str, value) -> dict:
    cfg = json.loads(json.dumps(cfg))
    section, _, key = dotted.partition(".")
    if key:
        cfg.setdefault(section, {})[key] = value
    else:
        cfg[section] = value
    return cfg


def _corpus(tmp_path: Path, name: str, content: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(content)
    return str(path)


# (case id, how to break the base config, text the one-line error must contain)
CASES = [
    # configs
    ("unknown section", lambda t, c: _set(c, "trian", {"lr": 1}), "trian: unknown section (did you mean 'train'?)"),
    ("unknown field", lambda t, c: _set(c, "train.lrr", 1e-3), "train.lrr: unknown field (did you mean 'lr'?)"),
    ("wrong type", lambda t, c: _set(c, "train.steps", "many"), "train.steps: expected an integer"),
    ("bool type", lambda t, c: _set(c, "train.compile", "maybe"), "train.compile: expected true/false"),
    ("lr out of range", lambda t, c: _set(c, "train.lr", 0), "train.lr: 0.0 is out of range, must be > 0"),
    ("mix ratio over 1", lambda t, c: _set(c, "train.mix_ratio", 1.5), "train.mix_ratio: 1.5 is out of range"),
    ("precision choice", lambda t, c: _set(c, "train.precision", "fp8"), "train.precision: 'fp8' is not allowed"),
    ("missing domain", lambda t, c: _set(c, "data.domain", ""), "data.domain: required"),
    ("hub mapping unknown key", lambda t, c: _set(c, "data.domain", {"path": "wikitext", "nmae": "raw"}),
     "data.domain.nmae: unknown key (did you mean 'name'?)"),
    ("txt unit choice", lambda t, c: _set(c, "data.txt_unit", "paragraphs"), "data.txt_unit: 'paragraphs' is not"),
    ("dedup choice", lambda t, c: _set(c, "data.dedup", "fuzzy"), "data.dedup: 'fuzzy' is not allowed"),
    ("read unit size", lambda t, c: _set(c, "data.unit_mb", 0), "data.unit_mb: 0.0 is out of range, must be > 0"),
    ("stream without a cap", lambda t, c: _set(c, "data.streaming", True),
     "data.streaming: a streamed corpus needs data.max_tokens"),
    ("bad distribution", lambda t, c: _set(c, "search", {"space": {"train.lr": {"logunifrom": [1, 2]}}}),
     "unknown distribution 'logunifrom' (did you mean 'loguniform'?)"),
    ("inverted range", lambda t, c: _set(c, "search", {"space": {"train.lr": {"loguniform": [1e-3, 1e-5]}}}),
     "need 0 < low < high"),
    ("not sweepable", lambda t, c: _set(c, "search", {"space": {"model.source": {"choice": ["a"]}}}),
     "search.space.model.source: not a sweepable field"),
    # every value a distribution can produce passes the field's own checks, alone and in the worst combination
    ("space choice lr negative", lambda t, c: _set(c, "search", {"space": {"train.lr": {"choice": [-1e-4, 3e-4]}}}),
     "search.space.train.lr: choice value -0.0001 is out of range, must be > 0 and <= 1"),
    ("space choice steps zero", lambda t, c: _set(c, "search", {"space": {"train.steps": {"choice": [0, 8]}}}),
     "search.space.train.steps: choice value 0 is out of range, must be >= 1"),
    ("space uniform end", lambda t, c: _set(c, "search", {"space": {"train.mix_ratio": {"uniform": [0.6, 1.5]}}}),
     "search.space.train.mix_ratio: uniform value 1.5 is out of range, must be >= 0 and <= 1"),
    ("space warmup over steps", lambda t, c: _set(c, "search", {"space": {"train.warmup_steps": {"grid": [1, 5]}}}),
     "search.space.train.warmup_steps: grid value 5 is more than train.steps=2"),
    ("space worst combination", lambda t, c: _set(_set(c, "train", {"steps": 8, "warmup_steps": 1}), "search", {
        "space": {"train.steps": {"choice": [2, 8]}, "train.warmup_steps": {"choice": [1, 4]}}}),
     "search.space.train.warmup_steps: choice value 4 is more than train.steps=2"),
    ("yaml syntax", lambda t, c: "data:\n  domain: a.txt\ntrain: [unclosed\n", "YAML syntax error"),
    ("top level list", lambda t, c: "- a\n- b\n", "expected a mapping of sections"),
    ("no replay data", lambda t, c: _set(_set(c, "data.general", ""), "train.mix_ratio", 0.5),
     "train.mix_ratio: below 1 needs general replay data"),
    # corpora
    ("missing corpus", lambda t, c: _set(c, "data.domain", str(t / "nope.jsonl")), "no such file or directory"),
    ("empty corpus", lambda t, c: _set(c, "data.domain", _corpus(t, "empty.txt", b"")), "the file is empty"),
    ("not utf-8", lambda t, c: _set(c, "data.domain", _corpus(t, "latin.txt", "caf\xe9\n".encode("latin-1") * 50)),
     "not UTF-8"),
    ("shorter than a block", lambda t, c: _set(c, "data.domain", _corpus(t, "short.txt", b"tiny\ntext\n")),
     "too short"),
    ("unknown text field", lambda t, c: _set(c, "data.text_field", "body"), "no text field 'body'"),
    ("unsupported type", lambda t, c: _set(c, "data.domain", _corpus(t, "doc.docx", b"xx")), "unsupported file type"),
    # labels
    ("one class", lambda t, c: _set(c, "eval.task", str(write_jsonl(t / "one.jsonl", [f"x {i}" for i in range(40)],
                                                                    label=["a"] * 40))), "at least 2 classes"),
    ("missing label field", lambda t, c: _set(c, "eval.label_field", "sentiment"), "no label field 'sentiment'"),
    ("block size swept", lambda t, c: _set(c, "search.space", {"data.block_size": {"choice": [32, 64]}}),
     "search.space.data.block_size: not sweepable"),
    ("validation split too big", lambda t, c: _set(c, "eval.val_size", 500), "eval.val_size=500"),
    ("probe train split too big", lambda t, c: _set(c, "eval.train_size", 300),
     "eval.train_size=300: only 40 labelled texts remain"),
    ("unknown label", lambda t, c: _set(c, "eval.labels", ["pos", "neutral"]), "eval.labels: ['neutral'] not found"),
    ("test split too big", lambda t, c: _set(c, "eval.test_size", 500), "eval.test_size=500"),
    # models
    ("missing model path", lambda t, c: _set(c, "model.source", str(t / "no-model")), "no such model directory"),
    ("hub id offline", lambda t, c: _set(c, "model.source", "nonexistent-org/nonexistent-model"),
     "model.source 'nonexistent-org/nonexistent-model'"),
    ("unknown packaged model", lambda t, c: _set(c, "model.source", "packaged:gpt5"), "unknown packaged model"),
    ("block over max positions", lambda t, c: _set(c, "data.block_size", 1024), "over the model's maximum of 512"),
    # resources and storage
    ("too many workers", lambda t, c: _set(_set(c, "resources", {"num_workers": 64}), "train.global_batch_size", 64),
     "one trial needs 64 CPUs"),
    ("storage not writable", lambda t, c: _set(c, "storage_path", _corpus(t, "a-file", b"x") + "/runs"),
     "storage_path"),
    ("unknown accelerator", lambda t, c: _set(_set(c, "resources.use_gpu", True), "resources.accelerator_type",
                                              "h100"), "resources.accelerator_type: 'h100' is not known (did you mean"),
    ("accelerator without gpu", lambda t, c: _set(c, "resources.accelerator_type", "H100"),
     "resources.accelerator_type: H100 is a GPU but resources.use_gpu is false"),
    ("checkpoint policy choice", lambda t, c: _set(c, "checkpoint.keep_weights", "best"),
     "checkpoint.keep_weights: 'best' is not allowed"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_rejected_with_one_line_and_exit_2(case, inputs, capsys, monkeypatch):
    import ray

    _, breaker, expected = case
    tmp_path, base = inputs
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a hub id fails fast, as on a machine without network
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    config = _write(tmp_path, breaker(tmp_path, base))
    for command in ("validate", "sweep"):
        assert main([command, config]) == 2, command
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0, err
        assert err.startswith("raycpt: error: ") and expected in err, err
        assert "Traceback" not in err
        assert not ray.is_initialized()  # rejected before Ray starts


def test_the_catalogue_is_large_enough():
    assert len(CASES) >= 25


def test_good_inputs_pass_validate(inputs, capsys):
    tmp_path, base = inputs
    assert main(["validate", _write(tmp_path, base)]) == 0
    assert "OK:" in capsys.readouterr().out
