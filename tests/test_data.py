import numpy as np
import pytest

from raycpt.core.data.blocks import (
    load_blocks,
    load_task,
    mixture_plan,
    normalize_text,
    pack_blocks,
    prepare_corpus,
    worker_positions,
)
from raycpt.core.data.sources import load_documents
from raycpt.core.errors import InputError
from tests.conftest import write_jsonl


def test_packing_keeps_every_token_and_puts_eos_between_documents(tmp_path, tokenizer):
    texts = [f"document number {i} " + "word " * (i % 7) for i in range(50)]
    expected = []
    for text in texts:
        expected += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    blocks = pack_blocks(np.asarray(expected, dtype=np.int32), 16)
    assert blocks.shape == (len(expected) // 16, 16)
    # the whole stream in order, only its final partial block dropped (< block_size tokens lost)
    assert blocks.reshape(-1).tolist() == expected[: blocks.size]
    assert len(expected) - blocks.size < 16
    assert (blocks == tokenizer.eos_token_id).sum() == expected[: blocks.size].count(tokenizer.eos_token_id)


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 0.77, 1.0])
def test_mixture_matches_ratio_at_every_step_and_is_deterministic(ratio):
    is_domain, index = mixture_plan(1000, ratio, n_domain=37, n_general=53, seed=3, window=8)
    for end in (32, 96, 512, 1000):  # after whole steps of 8 blocks
        assert abs(is_domain[:end].mean() - ratio) <= 0.5 / end + 1e-12
    again = mixture_plan(1000, ratio, n_domain=37, n_general=53, seed=3, window=8)
    assert np.array_equal(is_domain, again[0]) and np.array_equal(index, again[1])
    assert index[is_domain].max(initial=0) < 37 and index[~is_domain].max(initial=0) < 53
    other_seed = mixture_plan(1000, ratio, n_domain=37, n_general=53, seed=4, window=8)
    if 0 < ratio < 1:
        assert not np.array_equal(is_domain, other_seed[0])


def test_mixture_reads_each_corpus_once_per_pass():
    # whole windows (a plan's stratification is per window of the global batch: 200 = 25 x 8)
    is_domain, index = mixture_plan(200, 0.5, n_domain=100, n_general=100, seed=0, window=8)
    assert sorted(index[is_domain]) == list(range(100))


def test_workers_get_disjoint_shards_covering_the_global_batch():
    seen = []
    for step in range(3):
        for micro in range(2):
            for rank in range(4):
                pos = worker_positions(step, micro, rank=rank, world_size=4, batch_size=5, grad_accum=2)
                seen += list(range(pos.start, pos.stop))
    assert sorted(seen) == list(range(3 * 2 * 4 * 5))


def test_prepare_corpus_guards_leakage_and_fixes_heldout(tmp_path, tokenizer):
    texts = [f"Review {i}: the movie was {'great' if i % 2 else 'dull'} and long." for i in range(400)]
    path = write_jsonl(tmp_path / "domain.jsonl", texts)
    leaked = ["  REVIEW 3: the movie was great and LONG. ", "Review 10: the movie was dull and long."]
    kwargs = dict(text_field="text", block_size=16, heldout_fraction=0.1, heldout_blocks=4, test_blocks=3,
                  max_tokens=0, seed=0, field="data.domain")
    corpus = prepare_corpus(str(path), tokenizer, exclude_texts=leaked, **kwargs)
    assert corpus.removed_for_leakage == 2
    assert corpus.documents == 398
    everything = " ".join(tokenizer.decode(np.asarray(load_blocks(p)).reshape(-1).tolist())
                          for p in (corpus.train, corpus.heldout, corpus.test))
    assert "Review 3:" not in everything and "Review 10:" not in everything and "Review 11:" in everything
    heldout, test = np.load(corpus.heldout), np.load(corpus.test)
    assert heldout.shape == (4, 16) and test.shape == (3, 16)
    assert not {tuple(b) for b in heldout} & {tuple(b) for b in test}, "validation and test blocks are distinct"
    again = prepare_corpus(str(path), tokenizer, exclude_texts=leaked, **kwargs)
    assert again == corpus  # served from the cache, same fixed held-out set


def test_leaked_test_texts_never_reach_training_blocks(tmp_path, tokenizer):
    texts = [f"unique sentence number {i} about cinema" for i in range(200)]
    path = write_jsonl(tmp_path / "d.jsonl", texts)
    leaked = texts[:20]
    corpus = prepare_corpus(str(path), tokenizer, exclude_texts=leaked, text_field="text", block_size=8,
                            heldout_fraction=0.1, heldout_blocks=2, test_blocks=2, max_tokens=0, seed=1,
                            field="data.domain")
    stream = tokenizer.decode(np.asarray(load_blocks(corpus.train)).reshape(-1).tolist())
    assert not any(t in stream for t in leaked)


@pytest.mark.parametrize("content,message", [
    ("", "the file is empty"),
    ('{"body": "x"}\n', "no text field 'text'"),
])
def test_bad_corpora_are_rejected_clearly(tmp_path, content, message):
    path = tmp_path / "c.jsonl"
    path.write_text(content)
    with pytest.raises(InputError, match=message):
        load_documents(str(path))


def test_missing_corpus_and_non_utf8(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_documents(str(tmp_path / "nope.txt"))
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1") * 10)
    with pytest.raises(InputError, match="not UTF-8"):
        load_documents(str(bad))


def test_corpus_shorter_than_one_block(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "short.jsonl", ["tiny", "text"])
    with pytest.raises(InputError, match="shorter than one block"):
        prepare_corpus(str(path), tokenizer, exclude_texts=[], text_field="text", block_size=64,
                       heldout_fraction=0.5, heldout_blocks=1, test_blocks=1, max_tokens=0, seed=0,
                       field="data.domain")


def test_task_splits_are_disjoint_deduplicated_and_errors_are_clear(tmp_path):
    texts = [f"text {i}" for i in range(100)] + ["TEXT 5 ", "text   7"]  # two normalised duplicates
    labels = ["pos" if i % 2 else "neg" for i in range(102)]
    path = write_jsonl(tmp_path / "task.jsonl", texts, label=labels)
    task = load_task(str(path), text_field="text", label_field="label", labels=[], train_size=40, val_size=20,
                     test_size=30, seed=0)
    assert (len(task.train_texts), len(task.val_texts), len(task.test_texts)) == (40, 20, 30)
    splits = [{normalize_text(t) for t in part} for part in (task.train_texts, task.val_texts, task.test_texts)]
    assert not (splits[0] & splits[1] or splits[0] & splits[2] or splits[1] & splits[2])
    assert task.duplicates_removed == 2
    assert task.classes == ["neg", "pos"]
    again = load_task(str(path), text_field="text", label_field="label", labels=[], train_size=40, val_size=20,
                      test_size=30, seed=0)
    assert again == task, "fixed by the seed"
    explicit_test = write_jsonl(tmp_path / "test.jsonl", ["Text 3", "a new text"], label=["pos", "neg"])
    with_file = load_task(str(path), text_field="text", label_field="label", labels=[], train_size=0, val_size=20,
                          test_size=0, seed=0, test_source=str(explicit_test))
    assert with_file.test_texts == ["Text 3", "a new text"] and with_file.duplicates_removed == 3
    assert "text 3" not in {normalize_text(t) for t in with_file.train_texts + with_file.val_texts}
    common = dict(text_field="text", labels=[], val_size=10, seed=0)
    with pytest.raises(InputError, match="no label field 'y'"):
        load_task(str(path), label_field="y", train_size=0, test_size=10, **common)
    one_class = write_jsonl(tmp_path / "one.jsonl", texts, label=["a"] * 102)
    with pytest.raises(InputError, match="at least 2 classes"):
        load_task(str(one_class), label_field="label", train_size=0, test_size=10, **common)
    with pytest.raises(InputError, match="eval.test_size=500"):
        load_task(str(path), label_field="label", train_size=0, test_size=500, **common)
    with pytest.raises(InputError, match="eval.train_size=90: only 60"):
        load_task(str(path), label_field="label", train_size=90, test_size=30, **common)


def test_validation_and_test_texts_never_reach_any_prepared_block(tmp_path, tiny_gpt2_dir, tokenizer):
    """The prepared corpus itself (decoded blocks of train, validation and test), not the source file."""
    from raycpt.core.config import config_from_dict
    from raycpt.core.prepare import prepare_experiment

    reviews = [f"Review number {i} says the film is {'great' if i % 2 else 'dull'}." for i in range(300)]
    corpus = write_jsonl(tmp_path / "corpus.jsonl", reviews)
    task_path = write_jsonl(tmp_path / "task.jsonl", reviews[:120], label=["pos" if i % 2 else "neg"
                                                                         for i in range(120)])
    cfg = config_from_dict({"name": "leak", "storage_path": str(tmp_path / "runs"), "model": {"source": tiny_gpt2_dir},
                            "data": {"domain": str(corpus), "block_size": 16, "heldout_blocks": 4},
                            "train": {"mix_ratio": 1.0},
                            "eval": {"task": str(task_path), "train_size": 40, "val_size": 30, "test_size": 30}})
    manifest = prepare_experiment(cfg)
    protected = manifest.task.val_texts + manifest.task.test_texts
    assert manifest.domain.removed_for_leakage == len(protected) == 60
    blocks = " ".join(tokenizer.decode(np.asarray(load_blocks(p)).reshape(-1).tolist())
                      for p in (manifest.domain.train, manifest.domain.heldout, manifest.domain.test))
    assert not [t for t in protected if t in blocks]
    assert sum(t in blocks for t in manifest.task.train_texts) > 30  # probe-train texts may stay in CPT data


# -- .txt corpora: what one document is ----------------------------------------------------------------------------


def _txt_folder(tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    files = {}
    for i in range(3):  # 3 files x 2 paragraphs x 2 lines
        text = (f"Chapter {i} opens on a quiet street.\nThe rain has stopped.\n\n"
                f"In chapter {i} the detective returns.\nShe finds the letter.\n")
        (folder / f"part{i}.txt").write_text(text)
        files[i] = text
    return folder, files


@pytest.mark.parametrize("unit,documents", [("file", 3), ("paragraph", 6), ("line", 12)])
def test_txt_unit_makes_one_document_per_file_by_default_and_eos_only_between_documents(tmp_path, tokenizer, unit,
                                                                                          documents):
    from raycpt.core.config import load_config

    folder, files = _txt_folder(tmp_path)
    cfg = load_config(None, [f"data.domain={folder}", "train.mix_ratio=1"]
                      + ([f"data.txt_unit={unit}"] if unit != "file" else []))
    assert cfg.data.txt_unit == unit  # "file" is the default
    ds = load_documents(str(folder), txt_unit=cfg.data.txt_unit)
    assert len(ds) == documents
    eos = tokenizer.eos_token_id
    stream = np.asarray([i for text in ds["text"] for i in [*tokenizer(text)["input_ids"], eos]])
    assert int((stream == eos).sum()) == documents and stream[-1] == eos  # one EOS after each document, no more
    pieces = [tokenizer.decode(p) for p in np.split(stream, np.flatnonzero(stream == eos) + 1)[:-1]]
    if unit == "file":  # each file whole, its blank line and line breaks inside one document
        assert sorted(p.removesuffix(tokenizer.eos_token) for p in pieces) == sorted(files.values())
    elif unit == "paragraph":
        assert all("\n\n" not in p and p.count("\n") == 1 for p in pieces)
    corpus = prepare_corpus(str(folder), tokenizer, exclude_texts=[], text_field="text", block_size=8,
                            heldout_fraction=0.34, heldout_blocks=1, test_blocks=1, max_tokens=0, seed=0,
                            field="data.domain", txt_unit=unit)
    assert corpus.documents == documents


def test_one_txt_file_says_how_to_split_it(tmp_path, tokenizer):
    book = tmp_path / "book.txt"
    book.write_text("\n\n".join(f"Paragraph {i} of a long book, with enough words to fill blocks." for i in range(40)))
    kwargs = dict(exclude_texts=[], text_field="text", block_size=8, heldout_fraction=0.1, heldout_blocks=1,
                  test_blocks=1, max_tokens=0, seed=0, field="data.domain")
    with pytest.raises(InputError, match="only 1 non-empty document.*data.txt_unit=paragraph"):
        prepare_corpus(str(book), tokenizer, **kwargs)
    assert prepare_corpus(str(book), tokenizer, txt_unit="paragraph", **kwargs).documents == 40


# -- hub sources: the mapping form, the split a test task reads, ClassLabel names ---------------------------------


class FakeHub:
    """Stands in for datasets.load_dataset (the hub is out of reach here): records each call, serves local rows."""

    def __init__(self, splits):
        self.calls, self.splits = [], splits

    def __call__(self, path, **kwargs):
        self.calls.append((path, kwargs))
        return self.splits[kwargs.get("split", "train")]


def test_hub_source_as_a_mapping_passes_name_split_and_revision(monkeypatch):
    import datasets

    from raycpt.core.config import load_config
    from raycpt.core.errors import ConfigError

    cfg = load_config(None, ["data.domain={path: wikitext, name: wikitext-2-raw-v1, split: validation, "
                             "revision: main}", "data.general=org/news", "train.mix_ratio=0.5"])
    assert cfg.data.domain == {"path": "wikitext", "name": "wikitext-2-raw-v1", "split": "validation",
                               "revision": "main"}
    assert cfg.data.general == "org/news"  # the string form is unchanged
    with pytest.raises(ConfigError, match=r"data.domain.nmae: unknown key \(did you mean 'name'\?\)"):
        load_config(None, ["data.domain={path: wikitext, nmae: wikitext-2-raw-v1}", "train.mix_ratio=1"])
    with pytest.raises(ConfigError, match="data.domain: a hub mapping needs path"):
        load_config(None, ["data.domain={name: wikitext-2-raw-v1}", "train.mix_ratio=1"])
    rows = datasets.Dataset.from_dict({"text": ["A first article.", "", "A second article."]})
    hub = FakeHub({"validation": rows, "train": rows})
    monkeypatch.setattr(datasets, "load_dataset", hub)
    assert load_documents(cfg.data.domain)["text"] == ["A first article.", "A second article."]
    assert hub.calls[-1] == ("wikitext", {"split": "validation", "name": "wikitext-2-raw-v1", "revision": "main"})
    load_documents(cfg.data.general, field="data.general")
    assert hub.calls[-1] == ("org/news", {"split": "train"})


def test_hub_task_reads_the_named_splits_and_class_label_names(monkeypatch):
    import datasets

    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})

    def split(name, n):
        rows = {"text": [f"{name} review {i}" for i in range(n)], "label": [i % 2 for i in range(n)]}
        return datasets.Dataset.from_dict(rows, features=features)

    hub = FakeHub({"train": split("train", 80), "test": split("test", 30), "validation": split("validation", 20)})
    monkeypatch.setattr(datasets, "load_dataset", hub)
    common = dict(text_field="text", label_field="label", labels=[], train_size=0, val_size=10, test_size=10, seed=0)
    task = load_task("imdb", test_source="imdb", **common)
    assert ("imdb", {"split": "test"}) in hub.calls and ("imdb", {"split": "train"}) in hub.calls
    assert all(t.startswith("test review") for t in task.test_texts) and len(task.test_texts) == 30
    assert set(task.train_labels) == set(task.test_labels) == {"neg", "pos"}  # names, not 0/1
    task = load_task({"path": "imdb", "revision": "v2"}, test_source={"path": "imdb", "split": "validation"},
                     **common)
    assert ("imdb", {"split": "validation"}) in hub.calls[-2:]
    assert ("imdb", {"split": "train", "revision": "v2"}) in hub.calls[-2:]
    assert all(t.startswith("validation review") for t in task.test_texts)


def test_each_source_carries_its_own_text_field(tmp_path, tiny_gpt2_dir):
    """A domain jsonl keyed `content` beside a general jsonl keyed `text`: each source names its own column."""
    from raycpt.core.config import config_from_dict
    from raycpt.core.prepare import prepare_experiment

    domain = write_jsonl(tmp_path / "domain.jsonl", [f"Review {i}: a film worth seeing twice." for i in range(200)],
                         field="content")
    general = write_jsonl(tmp_path / "general.jsonl", [f"Report {i}: markets rose on Monday." for i in range(200)])
    raw = {"name": "fields", "storage_path": str(tmp_path / "runs"), "model": {"source": tiny_gpt2_dir},
           "data": {"domain": {"path": str(domain), "text_field": "content"}, "general": str(general),
                    "block_size": 16, "heldout_blocks": 2}}
    manifest = prepare_experiment(config_from_dict(raw))
    assert manifest.domain.documents == 200 and manifest.general.documents == 200
    raw["data"]["domain"] = str(domain)  # without the source's own field, the error names the settings to use
    with pytest.raises(InputError, match=r"no text field 'text'.*set data.text_field, or text_field in this source"):
        prepare_experiment(config_from_dict(raw))
    task = write_jsonl(tmp_path / "task.jsonl", [f"t {i}" for i in range(50)], field="body", label=["a", "b"] * 25)
    with pytest.raises(InputError, match="set eval.text_field"):
        load_task(str(task), text_field="text", label_field="label", labels=[], train_size=0, val_size=10,
                  test_size=10, seed=0)


@pytest.mark.parametrize("ratio,window", [(0.3, 8), (0.77, 5), (1.0, 4), (0.0, 6)])
def test_mixture_plan_is_prefix_stable_and_reads_each_pass_without_repeats(ratio, window):
    """A plan of N positions is the start of every longer one (an extended run continues the trial's stream), and
    within a corpus no block repeats before that corpus's pass is complete."""
    n_domain, n_general, longest = 23, 17, 700
    full_domain, full_index = mixture_plan(longest, ratio, n_domain, n_general, seed=11, window=window)
    for n in (1, window, 3 * window + 1, 96, 333, longest - 1):
        is_domain, index = mixture_plan(n, ratio, n_domain, n_general, seed=11, window=window)
        assert np.array_equal(is_domain, full_domain[:n]) and np.array_equal(index, full_index[:n]), n
    for mask, n in ((full_domain, n_domain), (~full_domain, n_general)):
        drawn = full_index[mask]
        for start in range(0, len(drawn), n):
            one_pass = drawn[start:start + n]
            assert len(set(one_pass.tolist())) == len(one_pass)  # no repeat within a pass
            if len(one_pass) == n:
                assert sorted(one_pass.tolist()) == list(range(n))  # each full pass reads every block once
