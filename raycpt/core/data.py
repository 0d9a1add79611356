"""Corpora -> tokenised, packed blocks (cached); the domain/general mixture; held-out splits; the labelled task.

Flow (`prepare_corpus`, called by `raycpt.core.prepare.prepare_experiment`): read documents -> drop any
downstream-test text (leakage guard) -> split documents into
train / held-out (seeded, fixed before any trial) -> tokenise once (raycpt.core.tokenize: the fastest encoder that
reproduces the tokenizer's ids) with EOS after each document -> cut the whole stream into `block_size` blocks
(only the stream's tail is dropped) -> `.npy` files in the cache, keyed by tokenizer + the split's datasets
fingerprints + block size. Trials memory-map those files; nothing is re-tokenised per trial.
"""

from __future__ import annotations

import bz2
import csv
import dataclasses
import glob
import hashlib
import io
import json
import os
import re
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raycpt.core.errors import InputError
from raycpt.core.packaged import cache_dir, packaged_file
from raycpt.core.tokenize import VERIFY_CHARACTERS, VERIFY_DOCUMENTS, token_stream

PACKAGED_CORPORA = ("rotten-tomatoes", "news")
FILE_LOADERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet",
                ".csv": "csv"}
TXT_UNITS = {"file": "document", "paragraph": "paragraph", "line": "line"}
"""data.txt_unit -> the datasets text loader's `sample_by`: what one document of a .txt corpus is."""
HUB_KEYS = ("path", "name", "split", "revision")
"""Keys of a hub source written as a mapping, e.g. {path: wikitext, name: wikitext-2-raw-v1, split: train}."""


def source_text(source: str | dict) -> str:
    """A source as messages name it: the string, or 'wikitext (name=wikitext-2-raw-v1, split=train)'."""
    if isinstance(source, dict):
        rest = ", ".join(f"{k}={source[k]}" for k in HUB_KEYS[1:] if source.get(k))
        return f"{source.get('path')}" + (f" ({rest})" if rest else "")
    return source


# ---------------------------------------------------------------------------------------------------------------
# Reading sources


def _packaged_parquet(name: str) -> Path:
    """Convert a packaged corpus once into a parquet file with a `text` column (and `label` where labelled)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    target = cache_dir("corpora") / f"{name}.parquet"
    if target.exists():
        return target
    if name == "rotten-tomatoes":
        with bz2.open(packaged_file("rotten-tomatoes-csv"), "rt", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        table = pa.table({"text": [r["text"] for r in rows], "label": [r["category"] for r in rows],
                          "movie": [r["movie_name"] for r in rows]})
    else:  # news
        with zipfile.ZipFile(packaged_file("news-zip")) as archive, archive.open("NewsArticles.csv") as raw:
            rows = list(csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8", errors="replace")))
        texts = [f"{r['title'].strip()}\n\n{r['text'].strip()}".strip() for r in rows]
        table = pa.table({"text": [t for t in texts if t]})
    tmp = target.with_suffix(".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, target)
    return target


def _source_files(source: str, field: str) -> tuple[str, list[str]]:
    """(datasets loader name, files) for a local source, or raise InputError naming the problem."""
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(str(f) for f in path.rglob("*") if f.suffix.lower() in FILE_LOADERS and f.is_file())
    elif any(ch in source for ch in "*?["):
        files = sorted(f for f in glob.glob(os.path.expanduser(source), recursive=True) if os.path.isfile(f))
    elif path.is_file():
        files = [str(path)]
    else:
        raise InputError(f"{field} '{source}': no such file or directory; check the path")
    if not files:
        raise InputError(f"{field} '{source}': no .txt/.jsonl/.json/.parquet/.csv files found there")
    loaders = {FILE_LOADERS.get(Path(f).suffix.lower()) for f in files}
    if None in loaders:
        raise InputError(f"{field} '{source}': unsupported file type; use .txt, .jsonl, .json, .parquet or .csv")
    if len(loaders) > 1:
        raise InputError(f"{field} '{source}': mixes file types {sorted(loaders)}; point it at one type")
    return loaders.pop(), files


def load_documents(source: str | dict, text_field: str = "text", field: str = "data.domain", *,
                   txt_unit: str = "file", split: str = "train"):
    """A `datasets.Dataset` with the source's rows (the text in column `text_field`), file-backed and cached.
    A .txt corpus gives one document per file, per blank-line separated paragraph or per line (`txt_unit`); a hub
    source is a dataset id (its `split`) or a mapping {path, name, split, revision} (HUB_KEYS)."""
    import datasets

    datasets.disable_progress_bars()
    if isinstance(source, dict):
        text_field = source.get("text_field") or text_field  # this source's own column
        given = {k: source[k] for k in HUB_KEYS[1:] if source.get(k)}
        if not given and _is_local(source["path"]):
            return load_documents(source["path"], text_field, field, txt_unit=txt_unit, split=split)
        return _hub_documents(source["path"], {"split": split, **given}, text_field, field)
    if source.startswith("packaged:"):
        name = source.split(":", 1)[1]
        if name not in PACKAGED_CORPORA:
            raise InputError(f"{field} '{source}': unknown packaged corpus; valid: "
                             + ", ".join(f"packaged:{n}" for n in PACKAGED_CORPORA))
        loader, files, text_field = "parquet", [str(_packaged_parquet(name))], "text"
    elif _is_local(source):
        loader, files = _source_files(source, field)
        for f in files:
            if os.path.getsize(f) == 0:
                raise InputError(f"{field} '{f}': the file is empty; give a corpus with text in it")
    else:
        return _hub_documents(source, {"split": split}, text_field, field)
    try:
        ds = datasets.load_dataset(loader, data_files=files, split="train", cache_dir=str(cache_dir("datasets")),
                                   **({"sample_by": TXT_UNITS[txt_unit]} if loader == "text" else {}))
    except Exception as err:
        message = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        cause: BaseException | None = err
        while cause is not None:  # datasets wraps the reader's error in DatasetGenerationError
            if isinstance(cause, UnicodeDecodeError) or "utf-8" in str(cause).lower():
                raise InputError(f"{field} '{source}': not UTF-8 text; re-encode it as UTF-8") from None
            cause = cause.__cause__ or cause.__context__
        raise InputError(f"{field} '{source}': cannot read it as {loader} ({message})") from None
    if loader == "text":
        text_field = "text"
        if txt_unit == "paragraph":  # the blank lines around a paragraph are not part of it
            ds = ds.map(lambda b: {"text": [t.strip("\n") for t in b["text"]]}, batched=True)
    return _check_text_field(ds, source, text_field, field)


def _is_local(source: str) -> bool:
    """A local file, dir or glob rather than a hub dataset id."""
    return (os.path.exists(os.path.expanduser(source)) or any(ch in source for ch in "*?[")
            or Path(source).suffix.lower() in FILE_LOADERS or source.startswith((".", "/", "~")))


def _hub_documents(path: str, options: dict[str, str], text_field: str, field: str):
    """A hub dataset's split (`options`: split and, where given, name and revision)."""
    import datasets

    label = source_text({"path": path, **options})
    try:
        ds = datasets.load_dataset(path, **options)
    except Exception as err:  # hub errors come in many types; report the first line
        raise InputError(f"{field} '{label}': not a local file and cannot load it as a hub dataset "
                         f"({(str(err).splitlines() or [type(err).__name__])[0][:200]}); check the path, name, "
                         "split or network") from None
    return _check_text_field(ds, label, text_field, field)


def _check_text_field(ds, source: str, text_field: str, field: str):
    if text_field not in ds.column_names:
        setting = "eval.text_field" if field.startswith("eval.") else "data.text_field"
        raise InputError(f"{field} '{source}': no text field '{text_field}' (columns: {', '.join(ds.column_names)})"
                         f"; set {setting}, or text_field in this source's mapping ({{path: ..., text_field: ...}})")
    if len(ds) == 0:
        raise InputError(f"{field} '{source}': no documents in it")
    if text_field != "text":
        ds = ds.rename_column(text_field, "text") if "text" not in ds.column_names else ds.map(
            lambda b: {"text": b[text_field]}, batched=True)
    return ds.filter(lambda b: [isinstance(t, str) and bool(t.strip()) for t in b["text"]], batched=True)


# ---------------------------------------------------------------------------------------------------------------
# Leakage guard, tokenising and packing


def normalize_text(text: str) -> str:
    """Case- and whitespace-insensitive form used to match downstream test texts against the corpus."""
    return re.sub(r"\s+", " ", text).strip().lower()


def remove_texts(ds, texts: list[str]):
    """Drop documents whose normalised text is one of `texts`; returns (dataset, number removed)."""
    if not texts:
        return ds, 0
    banned = {normalize_text(t) for t in texts}
    kept = ds.filter(lambda b: [normalize_text(t) not in banned for t in b["text"]], batched=True)
    return kept, len(ds) - len(kept)


def tokenize_documents(ds, tokenizer, batch_size: int = 1000) -> tuple[np.ndarray, str]:
    """The documents' token stream (EOS after each, int32) and the encoder that produced it (raycpt.core.tokenize picks
    the fastest one that reproduces the tokenizer's own ids on documents spread over the corpus)."""
    texts = ds.select_columns(["text"])
    sample_at = np.unique(np.linspace(0, len(texts) - 1, num=min(len(texts), VERIFY_DOCUMENTS)).astype(int))
    sample = list(texts.select(sample_at)["text"]) if len(texts) else []
    stride = -(-sum(map(len, sample)) // VERIFY_CHARACTERS)  # long documents: fewer of them, still spread out
    sample = sample[::max(1, stride)]
    batches = (list(batch["text"]) for batch in texts.iter(batch_size=batch_size))
    return token_stream(batches, sample, tokenizer)


def pack_blocks(stream: np.ndarray, block_size: int) -> np.ndarray:
    """Cut the whole stream into [n_blocks, block_size]; only the stream's final partial block is dropped, not a
    tail per map batch as run_clm's group_texts does."""
    n_blocks = len(stream) // block_size
    return np.ascontiguousarray(stream[: n_blocks * block_size], dtype=np.int32).reshape(n_blocks, block_size)


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = tokenizer.get_vocab()
    digest = hashlib.sha256(repr(sorted(vocab.items())).encode()).hexdigest()[:16]
    return f"{type(tokenizer).__name__}-{digest}-eos{tokenizer.eos_token_id}"


@dataclass
class PreparedCorpus:
    train: str
    """Path of the packed training blocks (.npy, int32 [n, block_size])."""
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
    """The encoder that produced the ids (raycpt.core.tokenize: tiktoken | tokenizers | transformers), all exact."""


def prepare_corpus(source: str | dict, tokenizer, *, text_field: str, block_size: int, heldout_fraction: float,
                   heldout_blocks: int, test_blocks: int, max_tokens: int, seed: int, exclude_texts: list[str],
                   field: str, txt_unit: str = "file") -> PreparedCorpus:
    """Read, guard, split, tokenise and pack one corpus; returns paths of cached .npy blocks."""
    ds = load_documents(source, text_field, field, txt_unit=txt_unit)
    source = source_text(source)
    ds, removed = remove_texts(ds, exclude_texts)
    if len(ds) < 2:
        check_enough_text(ds, tokenizer, block_size, source, field)  # too little text in all says so first
        check_document_count(ds, source, field)
    split = ds.train_test_split(test_size=heldout_fraction, seed=seed, shuffle=True)
    key = hashlib.sha256("|".join([split["train"]._fingerprint, split["test"]._fingerprint,
                                   tokenizer_fingerprint(tokenizer), str(block_size)]).encode()).hexdigest()[:20]
    out = cache_dir("blocks", key)
    train_path, heldout_path = out / "train.npy", out / "heldout.npy"
    record_path = out / "tokenized.json"
    if not (train_path.exists() and heldout_path.exists()):
        record: dict[str, object] = {}
        for part, path in (("train", train_path), ("test", heldout_path)):
            start = time.perf_counter()
            stream, record["encoder"] = tokenize_documents(split[part], tokenizer)
            record[f"{part}_seconds"] = round(time.perf_counter() - start, 3)
            np.save(path.with_suffix(".tmp.npy"), pack_blocks(stream, block_size))
            os.replace(path.with_suffix(".tmp.npy"), path)
        record_path.write_text(json.dumps(record))
    tokenized_by = json.loads(record_path.read_text()).get("encoder", "?") if record_path.exists() else "?"
    train = np.load(train_path, mmap_mode="r")
    heldout = np.load(heldout_path, mmap_mode="r")
    if len(train) == 0 or len(heldout) == 0:
        what = "training" if len(train) == 0 else "held-out"
        raise InputError(f"{field} '{source}': too short, its {what} part is shorter than one block of "
                         f"{block_size} tokens; add text or lower data.block_size / raise data.heldout_fraction")
    if max_tokens and len(train) > max_tokens // block_size:
        capped = out / f"train-max{max_tokens}.npy"
        if not capped.exists():
            np.save(capped.with_suffix(".tmp.npy"), np.asarray(train[: max(1, max_tokens // block_size)]))
            os.replace(capped.with_suffix(".tmp.npy"), capped)
        train_path, train = capped, np.load(capped, mmap_mode="r")
    if len(heldout) < 2:
        raise InputError(f"{field} '{source}': its held-out part packs into {len(heldout)} block(s) of {block_size}"
                         " tokens; validation and test need one each: raise data.heldout_fraction or add text")
    # validation first, test after it: each gets its share when the held-out part is short
    n_val = min(heldout_blocks, max(1, len(heldout) * heldout_blocks // (heldout_blocks + test_blocks)))
    val, test = heldout[:n_val], heldout[n_val:n_val + test_blocks]
    paths = []
    for name, part in (("heldout", val), ("test", test)):
        fixed = out / f"{name}-{len(val)}-{len(part)}.npy"
        if not fixed.exists():
            np.save(fixed.with_suffix(".tmp.npy"), np.asarray(part))
            os.replace(fixed.with_suffix(".tmp.npy"), fixed)
        paths.append(str(fixed))
    return PreparedCorpus(train=str(train_path), heldout=paths[0], test=paths[1], documents=len(ds),
                          removed_for_leakage=removed, train_tokens=int(train.size), heldout_tokens=int(val.size),
                          test_tokens=int(test.size), tokenized_by=tokenized_by)


def check_document_count(ds, source: str, field: str) -> None:
    """Perplexity is measured on held-out documents: a corpus needs two at least."""
    if len(ds) < 2:
        hint = ("; a .txt file is one document by default: set data.txt_unit=paragraph or line to split it"
                if str(source).lower().endswith((".txt", ".text")) else "")
        raise InputError(f"{field} '{source}': only {len(ds)} non-empty document(s); need at least 2 to hold one "
                         f"out for perplexity{hint}")


def check_enough_text(ds, tokenizer, block_size: int, source: str, field: str) -> None:
    """Fail early when a corpus cannot give one training and one held-out block (tokenising only a prefix)."""
    needed, have = 2 * block_size, 0
    for start in range(0, len(ds), 256):
        texts = ds[start:start + 256]["text"]
        have += sum(len(ids) + 1 for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"])
        if have >= needed:
            return
    raise InputError(f"{field} '{source}': too short, {have} tokens in all, need at least {needed} (one training "
                     f"and one held-out block of {block_size}); add text or lower data.block_size")


def load_blocks(path: str) -> np.ndarray:
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
    order, re-shuffled after each full pass.
    """
    rng = np.random.default_rng(seed)
    is_domain = np.zeros(num_blocks, dtype=bool)
    for start in range(0, num_blocks, window):
        end = min(start + window, num_blocks)
        # error diffusion across windows: the cumulative count is round(mix_ratio * end) at every window end
        count = int(round(mix_ratio * end)) - int(round(mix_ratio * start))
        is_domain[start + rng.permutation(end - start)[:count]] = True
    index = np.zeros(num_blocks, dtype=np.int64)
    for mask, n in ((is_domain, n_domain), (~is_domain, n_general)):
        needed = int(mask.sum())
        if needed == 0:
            continue
        if n == 0:
            raise InputError("train.mix_ratio needs blocks from a corpus that has none; check data.general")
        epochs = -(-needed // n)
        index[mask] = np.concatenate([rng.permutation(n) for _ in range(epochs)])[:needed]
    return is_domain, index


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
