import numpy as np
import pytest

from raycpt.core.data import (
    load_documents,
    load_task,
    mixture_plan,
    normalize_text,
    pack_blocks,
    prepare_corpus,
    tokenize_documents,
    worker_positions,
)
from raycpt.core.errors import InputError
from tests.conftest import write_jsonl


def test_packing_keeps_every_token_and_puts_eos_between_documents(tmp_path, tokenizer):
    texts = [f"document number {i} " + "word " * (i % 7) for i in range(50)]
    ds = load_documents(str(write_jsonl(tmp_path / "docs.jsonl", texts)))
    stream, _ = tokenize_documents(ds, tokenizer)
    expected = []
    for text in texts:
        expected += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    blocks = pack_blocks(stream, 16)
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
    is_domain, index = mixture_plan(200, 0.5, n_domain=100, n_general=100, seed=0)
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
    kwargs = dict(text_field="text", block_size=16, heldout_fraction=0.1, heldout_blocks=4, max_tokens=0, seed=0,
                  field="data.domain")
    corpus = prepare_corpus(str(path), tokenizer, exclude_texts=leaked, **kwargs)
    assert corpus.removed_for_leakage == 2
    assert corpus.documents == 398
    ds = load_documents(str(path))
    remaining = {normalize_text(t) for t in ds["text"]} - {normalize_text(t) for t in leaked}
    assert all(normalize_text(t) in remaining for t in texts if normalize_text(t) not in map(normalize_text, leaked))
    heldout = np.load(corpus.heldout)
    assert heldout.shape == (4, 16)
    again = prepare_corpus(str(path), tokenizer, exclude_texts=leaked, **kwargs)
    assert again == corpus  # served from the cache, same fixed held-out set


def test_leaked_test_texts_never_reach_training_blocks(tmp_path, tokenizer):
    texts = [f"unique sentence number {i} about cinema" for i in range(200)]
    path = write_jsonl(tmp_path / "d.jsonl", texts)
    leaked = texts[:20]
    corpus = prepare_corpus(str(path), tokenizer, exclude_texts=leaked, text_field="text", block_size=8,
                            heldout_fraction=0.1, heldout_blocks=2, max_tokens=0, seed=1, field="data.domain")
    stream = tokenizer.decode(np.load(corpus.train).reshape(-1).tolist())
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
                       heldout_fraction=0.5, heldout_blocks=1, max_tokens=0, seed=0, field="data.domain")


def test_task_split_and_errors(tmp_path):
    texts = [f"text {i}" for i in range(100)]
    labels = ["pos" if i % 2 else "neg" for i in range(100)]
    path = write_jsonl(tmp_path / "task.jsonl", texts, label=labels)
    task = load_task(str(path), text_field="text", label_field="label", labels=[], train_size=40, test_size=30,
                     seed=0)
    assert len(task.train_texts) == 40 and len(task.test_texts) == 30
    assert not set(task.train_texts) & set(task.test_texts)
    assert task.classes == ["neg", "pos"]
    with pytest.raises(InputError, match="no label field 'y'"):
        load_task(str(path), text_field="text", label_field="y", labels=[], train_size=0, test_size=10, seed=0)
    one_class = write_jsonl(tmp_path / "one.jsonl", texts, label=["a"] * 100)
    with pytest.raises(InputError, match="at least 2 classes"):
        load_task(str(one_class), text_field="text", label_field="label", labels=[], train_size=0, test_size=10,
                  seed=0)
    with pytest.raises(InputError, match="eval.test_size=500"):
        load_task(str(path), text_field="text", label_field="label", labels=[], train_size=0, test_size=500, seed=0)
