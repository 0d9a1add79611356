"""The data step on Ray Data gives exactly the blocks of the in-process path, with one worker or two."""

import numpy as np
import pytest

from raycpt.core.data.blocks import load_blocks, mixture_plan, prepare_corpus
from tests.conftest import write_jsonl
from tests.test_shards import documents, markers


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=True, log_to_driver=False)
    yield
    ray.shutdown()


def test_one_and_two_ray_workers_and_no_ray_pack_the_same_blocks(tmp_path, tokenizer, ray_cluster, monkeypatch):
    from raycpt.edge.data import RayDataMapper

    texts = documents(900)
    path = write_jsonl(tmp_path / "d.jsonl", texts)
    leaked = texts[::50]
    kwargs = dict(text_field="text", block_size=16, heldout_fraction=0.1, heldout_blocks=6, test_blocks=6,
                  max_tokens=0, seed=5, exclude_texts=leaked, field="data.domain", shards=4, unit_mb=0.01,
                  dedup="exact")
    runs, seen = {}, []
    for name, workers in (("no ray", None), ("1 worker", 1), ("2 workers", 2)):
        monkeypatch.setenv("RAYCPT_CACHE", str(tmp_path / name.replace(" ", "-")))
        if workers is None:
            runs[name] = prepare_corpus(str(path), tokenizer, **kwargs)
            continue
        with RayDataMapper(workers=workers) as ray_data:
            def mapper(worker, args, items, ray_data=ray_data):
                seen.append(len(items))
                return ray_data(worker, args, items)

            runs[name] = prepare_corpus(str(path), tokenizer, mapper=mapper, **kwargs)
    assert seen and min(seen) >= 4, "the Ray runs spread several units and buckets"
    reference = runs["no ray"]
    assert reference.removed_for_leakage == len(leaked) and reference.shards == 4
    assert not markers(tokenizer, np.asarray(load_blocks(reference.train))) & set(range(0, 900, 50))
    for name in ("1 worker", "2 workers"):
        corpus = runs[name]
        assert (corpus.documents, corpus.removed_for_leakage, corpus.train_tokens, corpus.tail_tokens_dropped) == (
            reference.documents, reference.removed_for_leakage, reference.train_tokens,
            reference.tail_tokens_dropped)
        for part in ("train", "heldout", "test"):
            np.testing.assert_array_equal(np.asarray(load_blocks(getattr(corpus, part))),
                                          np.asarray(load_blocks(getattr(reference, part))), err_msg=name)
        # the mixture draws the same blocks in the same order from either
        is_domain, index = mixture_plan(64, 1.0, len(load_blocks(corpus.train)), 0, seed=1)
        np.testing.assert_array_equal(load_blocks(corpus.train)[index], load_blocks(reference.train)[index])
