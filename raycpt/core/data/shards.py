"""A corpus of any size -> hash-assigned train / held-out documents, tokenised and packed into `.npy` shards, in two
stages that any number of workers can run (sequentially here; `raycpt.edge.data` runs them on Ray Data):

1. `UnitWorker` (one per *read unit*, see raycpt.core.data.sources: a byte range of a .jsonl / .txt file, some row
   groups of a parquet file, a whole csv / json file, a contiguous slice of a hub dataset): read the documents, drop
   downstream texts (by the hash of their normalised text), hash each document, tokenise it with the exact encoder
   the driver chose, and spill `(u, key, position, tokens)` into one file per *bucket* (`key % buckets`).
2. `BucketWorker` (one per bucket): read that bucket's spills from every unit, order the documents by `u` (a seeded
   hash of the normalised text), drop exact duplicates when asked (the first in file order stays), pack the
   training documents (u >= threshold) into `block_size` blocks -> `train-<bucket>.npy` (its tail < one block is
   dropped and counted) and keep the held-out documents (u < threshold) for the validation / test blocks.

So a document's split depends on its text and the seed alone (appending documents moves none), the blocks (as a
multiset, and in global order: shards in bucket order) do not depend on how many workers ran or in what order, and
memory is bounded by one unit or one bucket, not by the corpus. Each unit and bucket writes a done-record after its
files; a killed prepare resumes from them (`.npy` shards are checked against their recorded sha256).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from raycpt.core.data.sources import Unit, read_unit
from raycpt.core.data.tokenize import BackendOnly, encoder_by_name

BUCKET_BYTES = 64 * 2**20
"""Input bytes per bucket (shard) when data.shards is 0: one bucket's tokens are in memory at once."""
HIST_BINS = 4096
"""Resolution of the held-out threshold when a small corpus needs more than heldout_fraction held out."""
STOP_ENV = "RAYCPT_PREPARE_EXIT_AFTER_UNITS"
"""Tests only: the process exits (os._exit(137), like a kill) right after this many units were written, so the
resume test needs no race with a watcher."""
DOC_BATCH = 2048
"""Documents tokenised per encoder call inside a unit."""


# ---------------------------------------------------------------------------------------------------------------
# Hashes: identity, split and bucket of a document


def normalize_text(text: str) -> str:
    """Case- and whitespace-insensitive form used to match downstream texts and duplicates."""
    return " ".join(text.split()).lower()


def text_key(text: str) -> int:
    """64-bit identity of a document's normalised text (same text after normalisation = same key)."""
    return int.from_bytes(hashlib.blake2b(normalize_text(text).encode(), digest_size=8).digest(), "little")


def split_hash(key: int, seed: int) -> int:
    """`u` as a 64-bit integer: a document is held out when u / 2**64 < the threshold (seeded, per document)."""
    return int.from_bytes(hashlib.blake2b(key.to_bytes(8, "little"), digest_size=8,
                                          salt=int(seed).to_bytes(16, "little", signed=True)).digest(), "little")


def threshold_u(fraction: float) -> int:
    return min(2**64 - 1, int(fraction * 2**64))


# ---------------------------------------------------------------------------------------------------------------
# Stage 1: one unit -> per-bucket spills


@dataclass(frozen=True)
class ShardSpec:
    """Everything both stages need, the same on every worker (picklable)."""

    work_dir: str
    buckets: int
    seed: int
    text_field: str
    txt_unit: str
    field: str
    tokenizer: str
    """The model source the tokenizer loads from (a local dir after resolution)."""
    trust_remote_code: bool
    encoder: str
    """The encoder name the driver verified (raycpt.core.data.tokenize.choose_encoder)."""
    eos: int
    banned: tuple[int, ...]
    """Keys (text_key) of downstream validation / test texts, dropped wherever they occur."""
    dedup: bool
    block_size: int
    backend: str = ""
    """The tokenizer's Rust backend as JSON (raycpt.core.data.tokenize.backend_json): workers encode with it, without
    loading transformers; '' when the encoder is the tokenizer itself (`transformers`)."""
    threads: int = 0
    """Encoder threads per worker (tiktoken's core releases the GIL); 0 = OMP_NUM_THREADS where set (Ray sets it to
    an actor's CPUs), else every CPU this process may use."""
    stop_after_tokens: int = 0
    """A streamed hub source: stop reading once a unit has this many tokens (0 = read it all)."""


@dataclass
class UnitResult:
    unit: int
    documents: int
    removed_for_leakage: int
    tokens: int
    """Tokens including one EOS per document."""
    bytes: int
    seconds: float
    heldout_tokens_at: list[int] = field(default_factory=list)
    """Tokens (EOS included) per bin of u over [0, 1) in HIST_BINS bins: where a held-out threshold would land."""
    buckets: list[int] = field(default_factory=list)
    """The buckets this unit spilled documents into."""


def unit_dir(spec: ShardSpec, index: int) -> Path:
    return Path(spec.work_dir) / "units" / f"u{index:06d}"


class UnitWorker:
    """Stage 1 for any unit; the tokenizer and its encoder are built once per worker, not per unit."""

    def __init__(self, spec: ShardSpec) -> None:
        self.spec = spec
        if spec.backend and not spec.encoder.startswith("transformers"):
            tokenizer = BackendOnly.from_json(spec.backend)
        else:
            from raycpt.core.model.loading import load_tokenizer  # imports torch: only a slow tokenizer's workers pay

            tokenizer = load_tokenizer(spec.tokenizer, spec.trust_remote_code)
        threads = spec.threads or int(os.environ.get("OMP_NUM_THREADS") or 0)
        self.encode = encoder_by_name(tokenizer, spec.encoder, threads=threads)
        self.banned = frozenset(spec.banned)

    def __call__(self, item: dict) -> dict:
        index, unit = int(item["index"]), Unit(item["kind"], tuple(map(tuple, item["segments"])), item["bytes"])
        return asdict(self.run(index, unit))

    def run(self, index: int, unit: Unit) -> UnitResult:
        spec, out = self.spec, unit_dir(self.spec, index)
        done = out / "done.json"
        if done.exists():
            result = UnitResult(**json.loads(done.read_text()))
            if all((out / f"b{b:05d}.npz").exists() for b in result.buckets):
                return result  # else its spills were freed after a finished prepare: read it again
        start = time.perf_counter()
        out.mkdir(parents=True, exist_ok=True)
        keys, parts, lengths = [], [], []
        removed = 0
        batch: list[str] = []

        def encode(texts: list[str]) -> int:
            flat, lens = self.encode(texts)
            parts.append(flat.astype(np.int32))
            lengths.append(lens.astype(np.int64))
            return len(flat) + len(lens)

        encoded = 0

        for text in read_unit(unit, text_field=spec.text_field, field=spec.field, txt_unit=spec.txt_unit):
            key = text_key(text)
            if key in self.banned:
                removed += 1
                continue
            keys.append(key)
            batch.append(text)
            if len(batch) >= DOC_BATCH:
                encoded += encode(batch)
                batch = []
                if spec.stop_after_tokens and encoded >= spec.stop_after_tokens:
                    break
        if batch:
            encode(batch)
        key_arr = np.array(keys, dtype=np.uint64)
        u_arr = np.array([split_hash(k, spec.seed) for k in keys], dtype=np.uint64)
        # the documents' place in the corpus (unit, row): file order, however the corpus was cut into units
        pos_arr = (np.uint64(index) << np.uint64(32)) + np.arange(len(keys), dtype=np.uint64)
        lens = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
        flat = np.concatenate(parts) if parts else np.zeros(0, np.int32)
        offsets = np.concatenate([[0], np.cumsum(lens)])
        bucket_of = (key_arr % np.uint64(spec.buckets)).astype(np.int64)
        for bucket in np.unique(bucket_of):
            rows = np.flatnonzero(bucket_of == bucket)
            tokens = np.concatenate([flat[offsets[i]:offsets[i + 1]] for i in rows])
            _save_npz(out / f"b{int(bucket):05d}.npz", u=u_arr[rows], key=key_arr[rows], pos=pos_arr[rows],
                      lengths=lens[rows], tokens=tokens)
        bins = (u_arr >> np.uint64(64 - 12)).astype(np.int64)  # HIST_BINS = 2**12
        hist = np.bincount(bins, weights=lens + 1, minlength=HIST_BINS).astype(np.int64)
        result = UnitResult(index, len(keys), removed, int(lens.sum() + len(lens)), unit.bytes,
                            round(time.perf_counter() - start, 3), hist.tolist(), np.unique(bucket_of).tolist())
        _write_atomic(done, json.dumps(asdict(result)))
        _maybe_exit_for_test(Path(spec.work_dir))
        return result


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    os.replace(tmp, path)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _maybe_exit_for_test(work_dir: Path) -> None:
    limit = os.environ.get(STOP_ENV)
    if limit and len(list((work_dir / "units").glob("*/done.json"))) >= int(limit):
        os._exit(137)


# ---------------------------------------------------------------------------------------------------------------
# Stage 2: one bucket -> a training shard + its held-out documents


@dataclass
class BucketResult:
    bucket: int
    shard: str
    """File name of the training shard in the work dir (int32 [blocks, block_size])."""
    sha256: str
    blocks: int
    train_documents: int
    heldout_documents: int
    duplicates_removed: int
    tail_tokens_dropped: int
    """Training tokens after the shard's last whole block (not trained on)."""
    seconds: float


class BucketWorker:
    """Stage 2 for any bucket: order by u, drop duplicates, pack training documents, keep held-out ones."""

    def __init__(self, spec: ShardSpec, threshold: int, units: int) -> None:
        self.spec, self.threshold, self.units = spec, np.uint64(threshold), units

    def __call__(self, item: dict) -> dict:
        return asdict(self.run(int(item["bucket"])))

    def run(self, bucket: int) -> BucketResult:
        spec, work = self.spec, Path(self.spec.work_dir)
        done = work / "buckets" / f"b{bucket:05d}.json"
        if done.exists():
            result = BucketResult(**json.loads(done.read_text()))
            if (work / result.shard).exists() and file_sha256(work / result.shard) == result.sha256:
                return result
        start = time.perf_counter()
        loaded = [np.load(p) for i in range(self.units)
                  if (p := unit_dir(spec, i) / f"b{bucket:05d}.npz").exists()]
        u, key, pos, lengths = (np.concatenate([d[name] for d in loaded]) if loaded else np.zeros(0, np.uint64)
                                for name in ("u", "key", "pos", "lengths"))
        lengths = lengths.astype(np.int64)
        flat = np.concatenate([d["tokens"] for d in loaded]) if loaded else np.zeros(0, np.int32)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        order = np.lexsort((pos, u))  # by u; ties (the same normalised text) in file order: the first one is kept
        duplicates = 0
        if spec.dedup and len(order):
            first = np.ones(len(order), dtype=bool)
            first[1:] = key[order][1:] != key[order][:-1]
            duplicates = int((~first).sum())
            order = order[first]
        held = u[order] < self.threshold
        train_rows, heldout_rows = order[~held], order[held]
        stream = _with_eos(flat, offsets, train_rows, spec.eos)
        n_blocks = len(stream) // spec.block_size
        shard = f"train-{bucket:05d}.npy"
        _save_npy(work / shard, stream[: n_blocks * spec.block_size].reshape(n_blocks, spec.block_size))
        _save_npz(work / "buckets" / f"heldout-{bucket:05d}.npz", u=u[heldout_rows],
                  lengths=lengths[heldout_rows], tokens=_with_eos(flat, offsets, heldout_rows, spec.eos))
        result = BucketResult(bucket, shard, file_sha256(work / shard), n_blocks, len(train_rows),
                              len(heldout_rows), duplicates, len(stream) - n_blocks * spec.block_size,
                              round(time.perf_counter() - start, 3))
        _write_atomic(done, json.dumps(asdict(result)))
        return result


def _with_eos(flat: np.ndarray, offsets: np.ndarray, rows: np.ndarray, eos: int) -> np.ndarray:
    """The rows' tokens in this order, EOS after each, as one int32 stream."""
    if not len(rows):
        return np.zeros(0, np.int32)
    pieces = []
    eos_arr = np.array([eos], dtype=np.int32)
    for i in rows:
        pieces.append(flat[offsets[i]:offsets[i + 1]])
        pieces.append(eos_arr)
    return np.concatenate(pieces).astype(np.int32, copy=False)


def _save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, np.ascontiguousarray(array, dtype=np.int32))
    os.replace(tmp, path)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def choose_threshold(hists: Iterable[list[int]], fraction: float, min_tokens: int) -> int:
    """The held-out threshold on u: `fraction`, raised (to a bin edge) only when the documents below it hold fewer
    than `min_tokens` tokens, so a small corpus still gets one validation and one test block."""
    total = np.zeros(HIST_BINS, dtype=np.int64)
    for hist in hists:
        total += np.asarray(hist, dtype=np.int64)
    edge = fraction * HIST_BINS
    full = int(math.floor(edge))
    below = int(total[:full].sum()) + (int(total[full] * (edge - full)) if full < HIST_BINS else 0)
    if below >= min_tokens:
        return threshold_u(fraction)
    cumulative = np.cumsum(total)
    reach = int(np.searchsorted(cumulative, min_tokens)) + 1  # first bin edge with enough tokens below it
    return threshold_u(min(1.0, max(fraction, reach / HIST_BINS)))


# ---------------------------------------------------------------------------------------------------------------
# Reading shards


class ShardedBlocks:
    """All training shards as one read-only [n_blocks, block_size] array (memory-mapped; a global block index maps
    to (shard, row)), capped at `limit` blocks. Supports len, int / slice / integer-array indexing."""

    def __init__(self, paths: list[str], limit: int = 0) -> None:
        self.shards = [np.load(p, mmap_mode="r") for p in paths]
        sizes = np.array([len(s) for s in self.shards], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(sizes)])
        total = int(self.starts[-1])
        self.length = min(total, limit) if limit else total
        width = next((s.shape[1] for s in self.shards if s.ndim == 2), 0)
        self.shape = (self.length, width)
        self.dtype = np.dtype(np.int32)

    def __len__(self) -> int:
        return self.length

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self[np.arange(*index.indices(self.length))]
        if np.isscalar(index):
            i = int(index) + (self.length if int(index) < 0 else 0)
            if not 0 <= i < self.length:
                raise IndexError(f"block {index} out of range for {self.length} blocks")
            shard = int(np.searchsorted(self.starts, i, side="right")) - 1
            return np.asarray(self.shards[shard][i - self.starts[shard]])
        rows = np.asarray(index, dtype=np.int64)
        rows = np.where(rows < 0, rows + self.length, rows)
        if rows.size and (rows.min() < 0 or rows.max() >= self.length):
            raise IndexError(f"block index out of range for {self.length} blocks")
        out = np.empty((*rows.shape, self.shape[1]), dtype=np.int32)
        flat_rows, flat_out = rows.reshape(-1), out.reshape(-1, self.shape[1])
        which = np.searchsorted(self.starts, flat_rows, side="right") - 1
        for shard in np.unique(which):
            pick = np.flatnonzero(which == shard)
            flat_out[pick] = self.shards[shard][flat_rows[pick] - self.starts[shard]]
        return out

    def __array__(self, dtype=None, copy=None):
        return self[np.arange(self.length)] if dtype is None else self[np.arange(self.length)].astype(dtype)


# ---------------------------------------------------------------------------------------------------------------
# The driver: both stages through a mapper


Mapper = Callable[[type, tuple, list[dict]], Iterator[dict]]
"""(worker class, its constructor args, items) -> results as they finish, in any order. `map_in_process` runs them
here; `raycpt.edge.data.RayDataMapper` on Ray Data."""


def map_in_process(worker: type, args: tuple, items: list[dict]) -> Iterator[dict]:
    instance = worker(*args)
    for item in items:
        yield instance(item)


@dataclass
class ShardedCorpus:
    """The stage outputs the corpus manifest is written from."""

    shards: list[str]
    shard_sha256: list[str]
    blocks: int
    documents: int
    removed_for_leakage: int
    duplicates_removed: int
    tail_tokens_dropped: int
    heldout_documents: int
    input_bytes: int
    tokens: int
    seconds: float
    threshold: float
    """The held-out fraction actually used (data.heldout_fraction unless the corpus was too small for it)."""
    buckets: int

    def to_dict(self) -> dict:
        return asdict(self)


def build_shards(spec: ShardSpec, units: list[Unit], *, heldout_fraction: float, mapper: Mapper = map_in_process,
                 on_unit: Callable[[UnitResult | None, int], None] | None = None) -> ShardedCorpus:
    """Both stages; resumes from whatever a killed earlier call left in spec.work_dir. `on_unit(result,
    input_bytes)` hears of the start (result None) and of each finished unit (input_bytes: all units')."""
    work = Path(spec.work_dir)
    record = work / "corpus.json"
    if record.exists():
        corpus = ShardedCorpus(**json.loads(record.read_text()))
        if all((work / s).exists() for s in corpus.shards):
            return corpus
    (work / "buckets").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    items = [{"index": i, "kind": u.kind, "segments": [list(s) for s in u.segments], "bytes": u.bytes}
             for i, u in enumerate(units)]
    unit_results = []
    input_bytes = sum(u.bytes for u in units)
    if on_unit:
        on_unit(None, input_bytes)  # the start
    for raw in mapper(UnitWorker, (spec,), items):
        result = UnitResult(**raw)
        unit_results.append(result)
        if on_unit:
            on_unit(result, input_bytes)
    threshold = choose_threshold((r.heldout_tokens_at for r in unit_results), heldout_fraction,
                                 2 * spec.block_size)
    buckets = [BucketResult(**raw) for raw in mapper(BucketWorker, (spec, threshold, len(units)),
                                                     [{"bucket": b} for b in range(spec.buckets)])]
    buckets.sort(key=lambda b: b.bucket)
    corpus = ShardedCorpus(
        shards=[b.shard for b in buckets], shard_sha256=[b.sha256 for b in buckets],
        blocks=sum(b.blocks for b in buckets), documents=sum(r.documents for r in unit_results) - sum(
            b.duplicates_removed for b in buckets),
        removed_for_leakage=sum(r.removed_for_leakage for r in unit_results),
        duplicates_removed=sum(b.duplicates_removed for b in buckets),
        tail_tokens_dropped=sum(b.tail_tokens_dropped for b in buckets),
        heldout_documents=sum(b.heldout_documents for b in buckets), input_bytes=input_bytes,
        tokens=sum(r.tokens for r in unit_results), seconds=round(time.perf_counter() - started, 3),
        threshold=threshold / 2**64, buckets=spec.buckets)
    _write_atomic(record, json.dumps(corpus.to_dict()))
    for path in (work / "units").glob("*/*.npz"):  # the spills are no longer needed: free the disk
        path.unlink()
    return corpus


def heldout_prefix(work: Path, buckets: int, tokens: int) -> np.ndarray:
    """The held-out documents of every bucket merged by u (lowest first), EOS-joined, until `tokens` tokens (all
    of them when they are fewer): what validation and test blocks are cut from."""
    us, pieces = [], []
    for bucket in range(buckets):
        path = work / "buckets" / f"heldout-{bucket:05d}.npz"
        if not path.exists():
            continue
        data = np.load(path)
        lengths = data["lengths"].astype(np.int64) + 1
        keep = int(np.searchsorted(np.cumsum(lengths), tokens)) + 1  # this bucket alone never needs more
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        for i in range(min(keep, len(lengths))):
            us.append(int(data["u"][i]))
            pieces.append(data["tokens"][offsets[i]:offsets[i + 1]])
    order = sorted(range(len(us)), key=lambda i: us[i])
    out, total = [], 0
    for i in order:
        if total >= tokens:
            break
        out.append(pieces[i])
        total += len(pieces[i])
    return np.concatenate(out).astype(np.int32) if out else np.zeros(0, np.int32)
