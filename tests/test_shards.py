"""The sharded data step without Ray: the same blocks however the corpus is cut into units or the work is ordered,
a document's split fixed by its text, duplicates and leaked texts gone, a killed prepare resumed."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from raycpt.core.data.blocks import load_blocks, prepare_corpus
from raycpt.core.data.shards import STOP_ENV, ShardedBlocks, map_in_process
from raycpt.core.data.sources import plan_units, read_unit
from raycpt.core.errors import InputError
from tests.conftest import ROOT, write_jsonl

WORDS = "river stone cloud engine lantern orchard violin harbor meadow signal canyon ember".split()


def documents(n: int, start: int = 0) -> list[str]:
    """Distinct documents of varied length, each starting with its own marker `docN` and longer than a block (so
    no document lies wholly in a shard's dropped tail)."""
    return [f"doc{i} " + " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(20 + i % 23)) + "."
            for i in range(start, start + n)]


def prepare(path, tokenizer, **overrides):
    kwargs = dict(text_field="text", block_size=16, heldout_fraction=0.1, heldout_blocks=400, test_blocks=400,
                  max_tokens=0, seed=3, exclude_texts=[], field="data.domain")
    return prepare_corpus(str(path), tokenizer, **{**kwargs, **overrides})


def arrays(corpus) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (np.asarray(load_blocks(corpus.train)), np.load(corpus.heldout), np.load(corpus.test))


def markers(tokenizer, *parts: np.ndarray) -> set[int]:
    text = " ".join(tokenizer.decode(part.reshape(-1).tolist()) for part in parts)
    return {int(m) for m in re.findall(r"doc(\d+)\b", text)}


def in_reverse(worker, args, items):
    """A mapper that finishes the work in the opposite order (as a busy cluster might)."""
    return map_in_process(worker, args, list(reversed(items)))


def test_blocks_do_not_depend_on_unit_size_shards_order_or_the_cache(tmp_path, tokenizer, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", documents(600))
    runs = []
    for i, (unit_mb, mapper) in enumerate([(16, map_in_process), (0.002, map_in_process), (0.003, in_reverse)]):
        monkeypatch.setenv("RAYCPT_CACHE", str(tmp_path / f"cache{i}"))
        corpus = prepare(path, tokenizer, unit_mb=unit_mb, shards=4, mapper=mapper)
        runs.append(arrays(corpus))
    assert runs[0][0].shape[0] > 40 and runs[0][1].shape[0] > 0
    for other in runs[1:]:
        for mine, theirs in zip(runs[0], other, strict=True):
            np.testing.assert_array_equal(mine, theirs)  # same blocks, same global order


def test_every_document_lands_in_exactly_one_split_and_no_token_is_lost_but_shard_tails(tmp_path, tokenizer):
    texts = documents(500)
    corpus = prepare(write_jsonl(tmp_path / "d.jsonl", texts), tokenizer, shards=3, unit_mb=0.004)
    train, heldout, test = arrays(corpus)
    assert corpus.shards == 3
    trained, held = markers(tokenizer, train), markers(tokenizer, heldout, test)
    assert trained | held == set(range(500)) and not trained & held
    assert 0.04 < len(held) / 500 < 0.2  # heldout_fraction 0.1 of the documents, by hash
    expected_tokens = sum(len(tokenizer(texts[i])["input_ids"]) + 1 for i in trained)
    assert train.size + corpus.tail_tokens_dropped == expected_tokens
    assert corpus.tail_tokens_dropped < 3 * 16  # at most one partial block per shard


def test_a_documents_split_does_not_move_when_documents_are_appended(tmp_path, tokenizer, monkeypatch):
    old = documents(300)
    monkeypatch.setenv("RAYCPT_CACHE", str(tmp_path / "a"))
    before = arrays(prepare(write_jsonl(tmp_path / "a.jsonl", old), tokenizer))
    monkeypatch.setenv("RAYCPT_CACHE", str(tmp_path / "b"))
    after = arrays(prepare(write_jsonl(tmp_path / "b.jsonl", old + documents(300, start=300)), tokenizer))
    held_before, held_after = markers(tokenizer, *before[1:]), markers(tokenizer, *after[1:])
    assert held_before and held_after & set(range(300)) == held_before
    assert markers(tokenizer, after[0]) & set(range(300)) == set(range(300)) - held_before
    assert held_after - set(range(300)), "some new documents are held out too"


def test_leaked_texts_are_absent_from_every_shard(tmp_path, tokenizer):
    texts = documents(400)
    leaked = [texts[i].upper() + "  " for i in range(0, 400, 9)]  # case and spacing do not hide a leak
    corpus = prepare(write_jsonl(tmp_path / "d.jsonl", texts), tokenizer, exclude_texts=leaked, shards=5,
                     unit_mb=0.003)
    assert corpus.removed_for_leakage == len(leaked) == 45
    assert not markers(tokenizer, *arrays(corpus)) & set(range(0, 400, 9))


def test_exact_dedup_counts_and_drops_the_repeats(tmp_path, tokenizer):
    unique = documents(120)
    repeats = [unique[i].upper() for i in range(0, 30)] + [f"  {unique[i]}\n" for i in range(0, 10)]
    path = write_jsonl(tmp_path / "d.jsonl", unique + repeats)
    kept = prepare(path, tokenizer, dedup="none", shards=2, unit_mb=0.002)
    deduped = prepare(path, tokenizer, dedup="exact", shards=2, unit_mb=0.002)
    assert (kept.documents, kept.duplicates_removed) == (160, 0)
    assert (deduped.documents, deduped.duplicates_removed) == (120, 40)
    train = tokenizer.decode(np.asarray(load_blocks(deduped.train)).reshape(-1).tolist())
    assert not any(re.search(rf"DOC{i}\b", train) for i in range(30)), "the first occurrence is the one kept"
    assert markers(tokenizer, *arrays(deduped)) == set(range(120))


def test_a_killed_prepare_resumes_from_its_units_and_gives_the_same_corpus(tmp_path, tokenizer, tiny_gpt2_dir):
    path = write_jsonl(tmp_path / "d.jsonl", documents(400))
    script = ("import sys, json; from transformers import AutoTokenizer\n"
              "from raycpt.core.data.blocks import prepare_corpus\n"
              "tok = AutoTokenizer.from_pretrained(sys.argv[1])\n"
              "c = prepare_corpus(sys.argv[2], tok, text_field='text', block_size=16, heldout_fraction=0.1, "
              "heldout_blocks=4, test_blocks=4, max_tokens=0, seed=3, exclude_texts=[], field='data.domain', "
              "shards=3, unit_mb=0.003)\nprint(json.dumps(c.__dict__))\n")
    env = {**os.environ, "RAYCPT_CACHE": str(tmp_path / "killed"), "PYTHONPATH": str(ROOT)}
    killed = subprocess.run([sys.executable, "-c", script, tiny_gpt2_dir, str(path)], env={**env, STOP_ENV: "3"},
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == 137, killed.stderr[-2000:]
    done = sorted((tmp_path / "killed").rglob("units/*/done.json"))
    assert len(done) == 3
    stamps = {p: p.stat().st_mtime_ns for p in done}
    resumed = subprocess.run([sys.executable, "-c", script, tiny_gpt2_dir, str(path)], env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert all(p.stat().st_mtime_ns == stamp for p, stamp in stamps.items()), "finished units are not redone"
    fresh = subprocess.run([sys.executable, "-c", script, tiny_gpt2_dir, str(path)],
                           env={**env, "RAYCPT_CACHE": str(tmp_path / "fresh")}, capture_output=True, text=True,
                           timeout=300)
    first, second = (json.loads(run.stdout.strip().splitlines()[-1]) for run in (resumed, fresh))
    for key in ("prepare_seconds", "tokens_per_s", "train", "heldout", "test"):
        first.pop(key), second.pop(key)
    assert first == second
    a, b = (json.loads(run.stdout.strip().splitlines()[-1]) for run in (resumed, fresh))
    for name in ("train", "heldout", "test"):
        np.testing.assert_array_equal(np.asarray(load_blocks(a[name])), np.asarray(load_blocks(b[name])))


def test_a_corrupted_shard_is_rebuilt_not_trained_on(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", documents(200))
    corpus = prepare(path, tokenizer, shards=2)
    good = np.asarray(load_blocks(corpus.train))
    shard = json.loads(open(corpus.train).read())["shards"][0]
    work = os.path.dirname(shard)
    os.remove(os.path.join(work, "corpus.json"))  # as if killed after the shards, before the record
    with open(shard, "r+b") as fh:
        fh.seek(-4, os.SEEK_END)
        fh.write(b"\xff\xff\xff\x7f")
    again = prepare(path, tokenizer, shards=2)
    np.testing.assert_array_equal(np.asarray(load_blocks(again.train)), good)


def test_units_read_every_line_once_at_any_cut(tmp_path):
    texts = [f"línea {i} – {'x' * (i % 13)} ünïcödé" for i in range(300)]
    path = tmp_path / "d.jsonl"
    with path.open("w", encoding="utf-8") as fh:
        for i, text in enumerate(texts):
            fh.write(json.dumps({"text": text}, ensure_ascii=False) + ("\r\n" if i % 5 == 0 else "\n"))
            if i % 17 == 0:
                fh.write("\n")  # blank lines are skipped
    for unit_bytes in (1, 37, 1000, 10**9):
        units = plan_units("jsonl", [str(path)], unit_bytes)
        read = [t for u in units for t in read_unit(u, text_field="text", field="data.domain", txt_unit="file")]
        assert read == texts, unit_bytes
    lines = tmp_path / "l.txt"
    lines.write_text("\n".join(texts) + "\n")
    units = plan_units("txt-line", [str(lines)], 50)
    assert len(units) > 10
    assert [t for u in units for t in read_unit(u, text_field="text", field="f", txt_unit="line")] == texts


def test_the_sharded_view_indexes_like_one_array(tmp_path):
    parts = [np.arange(i * 40, i * 40 + n * 4, dtype=np.int32).reshape(n, 4) for i, n in enumerate((3, 0, 5, 2))]
    paths = []
    for i, part in enumerate(parts):
        np.save(tmp_path / f"s{i}.npy", part)
        paths.append(str(tmp_path / f"s{i}.npy"))
    whole = np.concatenate(parts)
    view = ShardedBlocks(paths)
    assert len(view) == 10 and view.shape == (10, 4)
    for index in (0, 2, 3, 9, -1, slice(2, 7), slice(None, None, 3), np.array([9, 0, 4, 4, 2]),
                  np.array([[1, 8], [3, 5]])):
        np.testing.assert_array_equal(view[index], whole[index])
    capped = ShardedBlocks(paths, limit=6)
    np.testing.assert_array_equal(np.asarray(capped), whole[:6])
    with pytest.raises(IndexError):
        capped[np.array([6])]


def test_a_corpus_too_small_for_its_heldout_fraction_still_gets_validation_and_test(tmp_path, tokenizer):
    corpus = prepare(write_jsonl(tmp_path / "d.jsonl", documents(12)), tokenizer, heldout_fraction=0.01,
                     heldout_blocks=1, test_blocks=1)
    assert np.load(corpus.heldout).shape == (1, 16) and np.load(corpus.test).shape == (1, 16)
    assert corpus.heldout_fraction > 0.01  # raised just enough, and said so in the manifest
    with pytest.raises(InputError, match="only 1 non-empty document"):
        prepare(write_jsonl(tmp_path / "one.jsonl", [" ".join(WORDS * 20)]), tokenizer)


def test_a_streamed_hub_corpus_is_read_only_up_to_max_tokens(tmp_path, tokenizer, monkeypatch):
    import datasets

    served = []

    def rows():
        for i in range(20_000):
            served.append(i)
            yield {"body": documents(1, start=i)[0]}

    def fake_hub(path, **kwargs):  # the hub is out of reach here: a local generator stands in for it
        assert path == "org/big-corpus" and kwargs.get("streaming") is True
        return datasets.IterableDataset.from_generator(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    corpus = prepare_corpus("org/big-corpus", tokenizer, text_field="body", block_size=16, heldout_fraction=0.1,
                            heldout_blocks=2, test_blocks=2, max_tokens=20_000, seed=0, exclude_texts=[],
                            field="data.domain", streaming=True)
    assert corpus.train_tokens == 20_000  # capped
    assert corpus.documents < 10_000 and max(served) < 19_999, "the stream was not read to its end"


def test_validate_reads_only_the_start_of_a_corpus(tokenizer, monkeypatch):
    """`raycpt validate` checks a corpus has enough text from its first documents: a streamed hub corpus is not
    pulled whole, and a corpus too short for two blocks still fails."""
    import datasets

    from raycpt.core.data.blocks import check_corpus_start
    from raycpt.core.data.sources import corpus_units

    served = []

    def rows():
        for i in range(20_000):
            served.append(i)
            yield {"body": documents(1, start=i)[0]}

    monkeypatch.setattr(datasets, "load_dataset", lambda path, **kwargs: datasets.IterableDataset.from_generator(rows))
    units, text_field, _ = corpus_units("org/big-corpus", text_field="body", field="data.domain", txt_unit="file",
                                        unit_bytes=2**24, streaming=True)
    read = check_corpus_start(units, tokenizer, 128, "org/big-corpus", "data.domain", text_field=text_field,
                              txt_unit="file")
    assert read <= 256 and max(served) < 1_000
    with pytest.raises(InputError, match="too short"):
        check_corpus_start(units, tokenizer, 10**6, "org/big-corpus", "data.domain", text_field=text_field,
                           txt_unit="file")
