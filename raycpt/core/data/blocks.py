"""Corpora -> tokenised, packed blocks (cached); the domain/general(/synthetic) mixture; held-out splits; the
labelled task.

Flow (`prepare_corpus`, called by `raycpt.core.prepare.prepare_experiment`): cut the source into read units ->
per unit: drop any downstream validation/test text (leakage guard), give each document its split by a seeded hash
of its normalised text (train / held-out, fixed before any trial, stable when documents are added), tokenise once
(raycpt.core.data.tokenize: the fastest encoder that reproduces the tokenizer's ids) -> per hash bucket: order, drop
exact duplicates (data.dedup), EOS after each document, pack into `block_size` blocks -> `.npy` shards in the cache
(raycpt.core.data.shards), keyed by the source files, tokenizer, block size and split settings. Trials memory-map the
shards as one array; nothing is re-tokenised per trial.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raycpt.core.data.shards import (
    BUCKET_BYTES,
    Mapper,
    ShardedBlocks,
    ShardSpec,
    UnitResult,
    build_shards,
    heldout_prefix,
    map_in_process,
    normalize_text,
    text_key,
)
from raycpt.core.data.sources import (
    UNIT_BYTES,
    Unit,
    corpus_units,
    load_documents,
    read_unit,
    source_text,
    unit_bytes,
)
from raycpt.core.data.tokenize import VERIFY_CHARACTERS, VERIFY_DOCUMENTS, backend_json, choose_encoder
from raycpt.core.errors import InputError
from raycpt.core.files import write_json
from raycpt.core.packaged import cache_dir

# ---------------------------------------------------------------------------------------------------------------
# Leakage guard, tokenising and packing


def pack_blocks(stream: np.ndarray, block_size: int) -> np.ndarray:
    """Cut a whole stream into [n_blocks, block_size] (the held-out documents'); only its final partial block is
    dropped, not a tail per map batch as run_clm's group_texts does."""
    n_blocks = len(stream) // block_size
    return np.ascontiguousarray(stream[: n_blocks * block_size], dtype=np.int32).reshape(n_blocks, block_size)


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = tokenizer.get_vocab()
    digest = hashlib.sha256(repr(sorted(vocab.items())).encode()).hexdigest()[:16]
    return f"{type(tokenizer).__name__}-{digest}-eos{tokenizer.eos_token_id}"


@dataclass
class PreparedCorpus:
    train: str
    """The training blocks: a shard list (.json, read by `load_blocks` as one memory-mapped [n, block_size] view)."""
    heldout: str
    """Path of the fixed held-out validation blocks (ASHA, selection, every trial's eval/*_ppl)."""
    test: str
    """Path of the fixed held-out test blocks (scored for the winner and the base model only)."""
    documents: int
    removed_for_leakage: int
    train_tokens: int
    heldout_tokens: int
    test_tokens: int
    tokenized_by: str = "?"
    """The encoder that produced the ids (core.data.tokenize: tiktoken | tokenizers | transformers), all exact."""
    shards: int = 0
    duplicates_removed: int = 0
    """Exact duplicates (same normalised text) dropped with data.dedup=exact."""
    tail_tokens_dropped: int = 0
    """Training tokens after each shard's last whole block, not trained on."""
    heldout_fraction: float = 0.0
    """The share of u held out (data.heldout_fraction, raised only when a small corpus needed it)."""
    input_bytes: int = 0
    input_tokens: int = 0
    """Every token read (one EOS per document): training blocks + held-out documents + shard tails (+ duplicates
    dropped by data.dedup)."""
    prepare_seconds: float = 0.0
    """Wall time of tokenising and packing when the shards were built; with tokens_per_s, the throughput."""
    tokens_per_s: float = 0.0


TIMING_FIELDS = ("tokenized_by", "prepare_seconds", "tokens_per_s")
"""PreparedCorpus fields that say how it was made, not what it is (left out of the manifest's fingerprint)."""


def _encoder_sample(units: list[Unit], *, text_field: str, field: str, txt_unit: str) -> list[str]:
    """Documents spread over the corpus (the first ones of up to 8 evenly spaced units) to verify the encoder."""
    picks = sorted(set(np.linspace(0, len(units) - 1, num=min(len(units), 8)).astype(int).tolist()))
    sample: list[str] = []
    per_unit, chars = -(-VERIFY_DOCUMENTS // len(picks)), VERIFY_CHARACTERS // len(picks)
    for index in picks:
        taken = 0
        for text in read_unit(units[index], text_field=text_field, field=field, txt_unit=txt_unit):
            sample.append(text[:chars])
            taken += 1
            if taken >= per_unit or sum(map(len, sample)) >= chars * (picks.index(index) + 1):
                break
    return sample


def prepare_corpus(source: str | dict, tokenizer, *, text_field: str, block_size: int,
                   heldout_fraction: float, heldout_blocks: int, test_blocks: int, max_tokens: int, seed: int,
                   exclude_texts: list[str], field: str, txt_unit: str = "file", dedup: str = "none",
                   shards: int = 0, unit_mb: float = UNIT_BYTES / 2**20, streaming: bool = False,
                   tokenizer_source: str = "", trust_remote_code: bool = False, mapper: Mapper = map_in_process,
                   on_unit: Callable[[UnitResult | None, int], None] | None = None) -> PreparedCorpus:
    """Read, guard, split (by hash), tokenise and pack one corpus into cached shards (raycpt.core.data.shards), with
    the stages run by `mapper` (in this process, or on Ray Data; workers load the tokenizer from `tokenizer_source`,
    default its name_or_path); returns where the blocks are."""
    label = source_text(source)
    bytes_per_unit = unit_bytes(unit_mb)
    units, text_field, identity = corpus_units(source, text_field=text_field, field=field, txt_unit=txt_unit,
                                               unit_bytes=bytes_per_unit, streaming=streaming)
    sample = _encoder_sample(units, text_field=text_field, field=field, txt_unit=txt_unit)
    if not sample:
        raise InputError(f"{field} '{label}': no documents in it")
    encoder, _ = choose_encoder(tokenizer, sample)
    banned = tuple(sorted({text_key(t) for t in exclude_texts}))
    buckets = shards or max(1, math.ceil(sum(u.bytes for u in units) / BUCKET_BYTES))
    stop = int(max_tokens / (1 - heldout_fraction)) + 2 * block_size if streaming and max_tokens else 0
    key = hashlib.sha256(json.dumps([identity, tokenizer_fingerprint(tokenizer), block_size, seed, text_field,
                                     txt_unit, hashlib.sha256(repr(banned).encode()).hexdigest(), dedup, buckets,
                                     bytes_per_unit, stop, heldout_fraction]).encode()).hexdigest()[:20]
    work = cache_dir("blocks", key)
    spec = ShardSpec(str(work), buckets, seed, text_field, txt_unit, field,
                     tokenizer_source or tokenizer.name_or_path, trust_remote_code,
                     encoder, int(tokenizer.eos_token_id), banned, dedup == "exact", block_size,
                     backend=backend_json(tokenizer), stop_after_tokens=stop)
    corpus = build_shards(spec, units, heldout_fraction=heldout_fraction, mapper=mapper, on_unit=on_unit)
    if corpus.documents < 2:
        hint = ("; a .txt file is one document by default: set data.txt_unit=paragraph or line to split it"
                if label.lower().endswith((".txt", ".text")) else "")
        if corpus.tokens < 2 * block_size:
            raise InputError(f"{field} '{label}': too short, {corpus.tokens} tokens in all, need at least "
                             f"{2 * block_size} (one training and one held-out block of {block_size}); add text "
                             "or lower data.block_size")
        raise InputError(f"{field} '{label}': only {corpus.documents} non-empty document(s); need at least 2 to "
                         f"hold one out for perplexity{hint}")
    n_train = min(corpus.blocks, max_tokens // block_size) if max_tokens else corpus.blocks
    if n_train == 0 or corpus.heldout_documents == 0:
        what = "training" if n_train == 0 else "held-out"
        raise InputError(f"{field} '{label}': too short, its {what} part is shorter than one block of "
                         f"{block_size} tokens; add text or lower data.block_size / raise data.heldout_fraction")
    train_view = work / f"train-max{max_tokens}.json"
    if not train_view.exists():
        write_json(train_view, {"shards": [str(work / s) for s in corpus.shards], "limit": n_train,
                                "sha256": corpus.shard_sha256})
    # validation and test blocks, cut once per (heldout_blocks, test_blocks) from the held-out documents: a later
    # prepare of the same corpus reads the two small files instead of every bucket's held-out documents again
    val_path, test_path = (work / f"{name}-of-{heldout_blocks}+{test_blocks}.npy" for name in ("heldout", "test"))
    if not (val_path.exists() and test_path.exists()):
        stream = heldout_prefix(work, corpus.buckets, (heldout_blocks + test_blocks) * block_size)
        heldout = pack_blocks(stream, block_size)
        if len(heldout) < 2:
            raise InputError(f"{field} '{label}': its held-out part packs into {len(heldout)} block(s) of "
                             f"{block_size} tokens; validation and test need one each: raise data.heldout_fraction "
                             "or add text")
        # validation first, test after it: each gets its share when the held-out part is short
        n_val = min(heldout_blocks, max(1, len(heldout) * heldout_blocks // (heldout_blocks + test_blocks)))
        for path, part in ((val_path, heldout[:n_val]), (test_path, heldout[n_val:n_val + test_blocks])):
            np.save(path.with_suffix(".tmp.npy"), part)
            os.replace(path.with_suffix(".tmp.npy"), path)
    val, test = np.load(val_path, mmap_mode="r"), np.load(test_path, mmap_mode="r")
    seconds = corpus.seconds  # as recorded when the shards were built (a cached corpus keeps its throughput)
    return PreparedCorpus(train=str(train_view), heldout=str(val_path), test=str(test_path), documents=corpus.documents,
                          removed_for_leakage=corpus.removed_for_leakage, train_tokens=n_train * block_size,
                          heldout_tokens=int(val.size), test_tokens=int(test.size), tokenized_by=encoder,
                          shards=len(corpus.shards), duplicates_removed=corpus.duplicates_removed,
                          tail_tokens_dropped=corpus.tail_tokens_dropped, heldout_fraction=corpus.threshold,
                          input_bytes=corpus.input_bytes, input_tokens=corpus.tokens, prepare_seconds=seconds,
                          tokens_per_s=round(corpus.tokens / seconds, 1) if seconds else 0.0)


def check_corpus_start(units: list[Unit], tokenizer, block_size: int, source: str, field: str, *, text_field: str,
                       txt_unit: str) -> int:
    """Fail early when a corpus cannot give one held-out document and one training and one held-out block,
    reading its read units in order only until it is clear that it can (a gigabyte corpus is not read whole).
    Returns how many documents were read."""
    needed, have, documents, batch, chars = 2 * block_size, 0, 0, [], 0

    def tokens(texts: list[str]) -> int:
        return sum(len(ids) + 1 for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"])

    for unit in units:
        for text in read_unit(unit, text_field=text_field, field=field, txt_unit=txt_unit):
            documents += 1
            batch.append(text)
            chars += len(text)
            if len(batch) == 256 or chars >= 2**20:  # tokenise in batches, large documents sooner
                have, batch, chars = have + tokens(batch), [], 0
            if documents >= 2 and have >= needed:
                return documents
    have += tokens(batch) if batch else 0
    if have < needed:
        raise InputError(f"{field} '{source}': too short, {have} tokens in all, need at least {needed} (one "
                         f"training and one held-out block of {block_size}); add text or lower data.block_size")
    if documents < 2:
        hint = ("; a .txt file is one document by default: set data.txt_unit=paragraph or line to split it"
                if str(source).lower().endswith((".txt", ".text")) else "")
        raise InputError(f"{field} '{source}': only {documents} non-empty document(s); need at least 2 to hold one "
                         f"out for perplexity{hint}")
    return documents


def load_blocks(path: str) -> np.ndarray | ShardedBlocks:
    """Blocks as a read-only [n, block_size] array: one .npy memory-mapped, or a shard list (.json) as one view."""
    if str(path).endswith(".json"):
        view = json.loads(Path(path).read_text())
        return ShardedBlocks(view["shards"], view.get("limit", 0))
    return np.load(path, mmap_mode="r")


# ---------------------------------------------------------------------------------------------------------------
# Mixture


def mixture_plan(num_blocks: int, mix_ratio: float, n_domain: int, n_general: int, seed: int, window: int = 64
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Which corpus and which block each global training position draws: (is_domain[bool], index[int]).

    Stratified: every `window` positions (the trainer passes its global batch) hold round(mix_ratio * window)
    domain blocks with the rounding error carried forward, so the realised share after any whole step is within
    half a block of mix_ratio; inside a window, positions are shuffled by the seed. Deterministic in its
    arguments, so a resumed run or another worker rebuilds the same plan. Each corpus is read in a seeded random
    order, re-shuffled after each full pass: no block repeats within a pass.

    Prefix-stable: a plan of N positions is the first N positions of any longer plan with the same arguments, so a
    run extended to more steps (`raycpt extend`) continues the stream it trained on. Each part draws from its own
    seeded stream (the windows from [seed, 0], the domain corpus's passes from [seed, 1], the general one's from
    [seed, 2]), always in whole windows and whole passes, so how far a plan goes never changes its earlier draws.
    """
    windows = -(-num_blocks // window)
    # error diffusion across windows: the cumulative count is round(mix_ratio * end) at every window end (rint:
    # half to even, as Python's round)
    counts = np.diff(np.rint(mix_ratio * (np.arange(1, windows + 1) * window)).astype(np.int64), prepend=0)
    # one row of uniforms per window: row k is the k-th draw of the stream however many rows follow
    order = np.random.default_rng([seed, 0]).random((windows, window)).argsort(axis=1, kind="stable")
    chosen = np.arange(window)[None, :] < counts[:, None]  # the first count_k shuffled slots of window k
    is_domain = np.zeros((windows, window), dtype=bool)
    is_domain[np.nonzero(chosen)[0], order[chosen]] = True
    is_domain = is_domain.reshape(-1)[:num_blocks]
    index = np.zeros(num_blocks, dtype=np.int64)
    for stream, mask, n in ((1, is_domain, n_domain), (2, ~is_domain, n_general)):
        needed = int(mask.sum())
        if needed == 0:
            continue
        if n == 0:
            raise InputError("train.mix_ratio needs blocks from a corpus that has none; check data.general")
        rng = np.random.default_rng([seed, stream])
        index[mask] = np.concatenate([rng.permutation(n) for _ in range(-(-needed // n))])[:needed]
    return is_domain, index


def synthetic_plan(num_blocks: int, mix_ratio: float, n_domain: int, n_general: int, seed: int, window: int = 64,
                   *, synthetic_ratio: float, n_synthetic: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`mixture_plan` with a share of its domain side drawn from a third corpus, the synthetic one (data.synthetic,
    the rewrites `raycpt augment` wrote): (is_domain[bool], is_synthetic[bool], index[int]).

    is_domain keeps its meaning, the domain side of the mixture (real + synthetic; train.mix_ratio of it), and is
    mixture_plan's own. is_synthetic marks the domain-side positions that draw from the synthetic corpus:
    train.synthetic_ratio of the domain side, exactly as mixture_plan realises mix_ratio: the cumulative synthetic
    count is round(synthetic_ratio x cumulative domain-side count) at every window end (the rounding error carried
    forward), and within a window the synthetic positions are the first of a seeded shuffle of that window's
    domain-side positions. So of all positions, mix_ratio x synthetic_ratio are synthetic, mix_ratio x (1 -
    synthetic_ratio) real domain and 1 - mix_ratio general. index: general positions keep mixture_plan's; the real
    domain positions take the domain corpus's stream in order (its first draws, so each of its passes still reads
    every block once); the synthetic ones read the synthetic corpus in seeded passes, re-shuffled after each.

    synthetic_ratio 0 is mixture_plan itself (no synthetic position, nothing else drawn): the same plan bit for bit.
    Prefix-stable like mixture_plan: the plan is built on whole windows and cut to num_blocks, and its two new
    parts draw from their own streams (the window shuffles from [seed, 3], the synthetic corpus's passes from
    [seed, 4]), leaving mixture_plan's streams [seed, 0..2] as they were.
    """
    if synthetic_ratio == 0:
        is_domain, index = mixture_plan(num_blocks, mix_ratio, n_domain, n_general, seed, window)
        return is_domain, np.zeros(num_blocks, dtype=bool), index
    windows = -(-num_blocks // window)
    # whole windows: the last window's synthetic share must not depend on where the plan stops
    is_domain, index = mixture_plan(windows * window, mix_ratio, n_domain, n_general, seed, window)
    side = is_domain.reshape(windows, window)
    domain_side = np.cumsum(side.sum(axis=1))  # cumulative domain-side count at each window end
    counts = np.diff(np.rint(synthetic_ratio * domain_side).astype(np.int64), prepend=0)  # <= the window's side
    keys = np.random.default_rng([seed, 3]).random((windows, window))  # row k: the k-th draw of the stream
    keys[~side] = 2.0  # general slots sort after every domain-side one
    order = keys.argsort(axis=1, kind="stable")
    chosen = np.arange(window)[None, :] < counts[:, None]
    is_synthetic = np.zeros((windows, window), dtype=bool)
    is_synthetic[np.nonzero(chosen)[0], order[chosen]] = True
    is_synthetic = is_synthetic.reshape(-1)
    positions = np.flatnonzero(is_domain)
    real = positions[~is_synthetic[positions]]
    index[real] = index[positions][:len(real)]  # the domain stream's first draws, in order
    synthetic = np.flatnonzero(is_synthetic)
    if len(synthetic):
        if n_synthetic == 0:
            raise InputError("train.synthetic_ratio needs blocks from the synthetic corpus, which has none; check "
                             "data.synthetic")
        rng = np.random.default_rng([seed, 4])
        index[synthetic] = np.concatenate([rng.permutation(n_synthetic)
                                           for _ in range(-(-len(synthetic) // n_synthetic))])[:len(synthetic)]
    return is_domain[:num_blocks], is_synthetic[:num_blocks], index[:num_blocks]


MIXTURE_SEED_STRIDE = 1_000_003
"""A prime that keeps (data.seed, train.seed) pairs apart when combined into the mixture's one seed."""


def mixture_seed(data_seed: int, train_seed: int) -> int:
    """The mixture plan's seed: a function of both seeds, so either changes the data order."""
    return data_seed * MIXTURE_SEED_STRIDE + train_seed


def worker_positions(step: int, micro: int, *, rank: int, world_size: int, batch_size: int, grad_accum: int
                     ) -> slice:
    """Global plan positions of one worker's micro-batch: workers take disjoint, interleaved shards."""
    start = ((step * grad_accum + micro) * world_size + rank) * batch_size
    return slice(start, start + batch_size)


# ---------------------------------------------------------------------------------------------------------------
# Labelled downstream task


@dataclass
class Task:
    """The labelled task in three fixed, disjoint splits: the probe trains on `train`, trials and the selection
    rule see `val`, and only the winner and the base model are scored once on `test`."""

    train_texts: list[str]
    train_labels: list[str]
    val_texts: list[str]
    val_labels: list[str]
    test_texts: list[str]
    test_labels: list[str]
    duplicates_removed: int = 0
    """Texts dropped because their normalised form was already in the task (so no text is in two splits)."""

    @property
    def classes(self) -> list[str]:
        return sorted(set(self.train_labels) | set(self.val_labels) | set(self.test_labels))

    def heldout_texts(self) -> list[str]:
        """Texts that must never reach CPT data: validation and test."""
        return self.val_texts + self.test_texts

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _labelled(source: str | dict, text_field: str, label_field: str, labels: list[str], field: str,
              split: str = "train") -> tuple[list[str], list[str]]:
    """(texts, labels as strings) of a labelled source; a hub source's `split` unless it names one. Integer class
    ids of a ClassLabel column come out as their names ('pos', not '1')."""
    if isinstance(source, str) and source.startswith("packaged:rotten-tomatoes"):
        text_field, label_field = "text", "label"
    ds = load_documents(source, text_field, field=field, split=split)
    source = source_text(source)
    if label_field not in ds.column_names:
        raise InputError(f"{field} '{source}': no label field '{label_field}' (columns: "
                         f"{', '.join(c for c in ds.column_names if c != 'text')}); set eval.label_field")
    feature = ds.features.get(label_field)
    if hasattr(feature, "int2str"):  # datasets.ClassLabel
        raw_labels = [feature.int2str(int(x)) if x is not None and x >= 0 else str(x) for x in ds[label_field]]
    else:
        raw_labels = [str(x) for x in ds[label_field]]
    texts = ds["text"]
    if labels:
        missing = sorted(set(labels) - set(raw_labels))
        if missing:
            raise InputError(f"eval.labels: {missing} not found in '{source}' (labels there: "
                             f"{sorted(set(raw_labels))[:10]})")
        keep = [i for i, y in enumerate(raw_labels) if y in set(labels)]
        texts, raw_labels = [texts[i] for i in keep], [raw_labels[i] for i in keep]
    if len(set(raw_labels)) < 2:
        raise InputError(f"{field} '{source}': needs at least 2 classes in '{label_field}', found "
                         f"{sorted(set(raw_labels))}")
    return texts, raw_labels


def _dedupe(texts: list[str], labels: list[str], seen: set[str]) -> tuple[list[str], list[str], int]:
    """Drop texts whose normalised form is in `seen` (updated as it goes): first occurrence wins."""
    kept_texts, kept_labels = [], []
    for text, label in zip(texts, labels, strict=True):
        key = normalize_text(text)
        if key not in seen:
            seen.add(key)
            kept_texts.append(text)
            kept_labels.append(label)
    return kept_texts, kept_labels, len(texts) - len(kept_texts)


def load_task(source: str, *, text_field: str, label_field: str, labels: list[str], train_size: int,
              val_size: int, test_size: int, seed: int, test_source: str = "") -> Task:
    """The labelled task in seeded probe-train / validation / test splits, fixed for the whole sweep (or an
    explicit test file, `test_source`). Normalised duplicates are removed first (counted), so no text is in two
    splits; the validation and test texts are removed from the CPT corpus."""
    seen: set[str] = set()
    test_texts: list[str] = []
    test_labels: list[str] = []
    removed = 0
    if test_source:
        test_texts, test_labels = _labelled(test_source, text_field, label_field, labels, "eval.test_task",
                                            split="test")
        test_texts, test_labels, removed = _dedupe(test_texts, test_labels, seen)
    texts, raw_labels = _labelled(source, text_field, label_field, labels, "eval.task")
    texts, raw_labels, dropped = _dedupe(texts, raw_labels, seen)
    removed += dropped
    order = np.random.default_rng(seed).permutation(len(texts))
    own_test = 0 if test_source else test_size
    if own_test + val_size + 2 > len(order):
        raise InputError(f"eval.task '{source}': {len(order)} distinct labelled texts, too few for "
                         f"eval.val_size={val_size}" + (f" + eval.test_size={test_size}" if own_test else "")
                         + " + a probe train split; lower them")
    test, val, rest = order[:own_test], order[own_test:own_test + val_size], order[own_test + val_size:]
    if train_size and train_size > len(rest):
        raise InputError(f"eval.train_size={train_size}: only {len(rest)} labelled texts remain after the "
                         f"validation and test splits; lower eval.train_size (0 = all that remain)")
    train = rest[:train_size] if train_size else rest

    def pick(rows) -> tuple[list[str], list[str]]:
        return [texts[i] for i in rows], [raw_labels[i] for i in rows]

    if not test_source:
        test_texts, test_labels = pick(test)
    task = Task(*pick(train), *pick(val), test_texts, test_labels, duplicates_removed=removed)
    for name, ys in (("train", task.train_labels), ("val", task.val_labels), ("test", task.test_labels)):
        if len(set(ys)) < 2:
            raise InputError(f"eval.task '{source}': its {name} split has fewer than 2 classes; raise "
                             f"eval.{name}_size or change eval.seed")
    return task
