"""Reading corpora: local files (txt / jsonl / json / parquet / csv, dirs and globs), packaged corpora and hub
datasets, as a `datasets.Dataset` (`load_documents`, for the labelled task and checks) or as *read units* (`Unit`,
`plan_units`, `read_unit`): pieces of a corpus cut from file sizes alone, each read on its own, in order, by
whichever worker gets it (raycpt.core.data.shards)."""

from __future__ import annotations

import bz2
import csv
import glob
import io
import json
import math
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from raycpt.core.errors import InputError
from raycpt.core.packaged import cache_dir, packaged_file

UNIT_BYTES = 16 * 2**20
"""Default input bytes per read unit (data.unit_mb): a unit's documents and tokens are in memory at once."""
SPLITTABLE = {"jsonl", "txt-line"}
"""Read kinds a unit may cut at any line boundary (a byte range); the others are read whole (or by row group)."""
PACKAGED_CORPORA = ("rotten-tomatoes", "news")
FILE_LOADERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet",
                ".csv": "csv"}
TXT_UNITS = {"file": "document", "paragraph": "paragraph", "line": "line"}
"""data.txt_unit -> the datasets text loader's `sample_by`: what one document of a .txt corpus is."""
HUB_KEYS = ("path", "name", "split", "revision")
"""Keys of a hub source written as a mapping, e.g. {path: wikitext, name: wikitext-2-raw-v1, split: train}."""


def unit_bytes(unit_mb: float) -> int:
    """data.unit_mb as input bytes per read unit (at least one)."""
    return max(1, int(unit_mb * 2**20))


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
                   txt_unit: str = "file", split: str = "train", streaming: bool = False):
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
        return _hub_documents(source["path"], {"split": split, **given}, text_field, field, streaming)
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
        return _hub_documents(source, {"split": split}, text_field, field, streaming)
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


def _hub_documents(path: str, options: dict[str, str], text_field: str, field: str, streaming: bool = False):
    """A hub dataset's split (`options`: split and, where given, name and revision); with `streaming`, an
    IterableDataset of {"text": ...} read lazily (data.streaming, capped by data.max_tokens)."""
    import datasets

    label = source_text({"path": path, **options})
    try:
        ds = datasets.load_dataset(path, **options, **({"streaming": True} if streaming else {}))
        if streaming:
            return ds.map(lambda row: {"text": row.get(text_field)})
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
# Read units


@dataclass(frozen=True)
class Unit:
    """What one stage-1 task reads: `kind` says how, `segments` what ((path, start, end): a byte range of a
    line-based file, a row-group range of parquet, (path, 0, -1) a whole file; for `hub`, (source json, index,
    count) of its contiguous shards)."""

    kind: str
    segments: tuple[tuple[str, int, int], ...]
    bytes: int


def plan_units(kind: str, files: list[str], unit_bytes: int) -> list[Unit]:
    """Cut local files into units of about `unit_bytes` from their sizes alone (no reading but parquet footers)."""
    units: list[Unit] = []
    small: list[tuple[str, int, int]] = []
    small_bytes = 0

    def flush() -> None:
        nonlocal small, small_bytes
        if small:
            units.append(Unit(kind, tuple(small), small_bytes))
        small, small_bytes = [], 0

    for path in files:
        size = os.path.getsize(path)
        if kind == "parquet":
            import pyarrow.parquet as pq

            meta = pq.ParquetFile(path).metadata
            start, acc = 0, 0
            for rg in range(meta.num_row_groups):
                acc += meta.row_group(rg).total_byte_size
                if acc >= unit_bytes and rg + 1 < meta.num_row_groups:
                    units.append(Unit(kind, ((path, start, rg + 1),), acc))
                    start, acc = rg + 1, 0
            units.append(Unit(kind, ((path, start, meta.num_row_groups),), acc or size))
        elif kind in SPLITTABLE and size > unit_bytes:
            flush()
            pieces = math.ceil(size / unit_bytes)
            edges = [size * i // pieces for i in range(pieces + 1)]
            units.extend(Unit(kind, ((path, a, b),), b - a) for a, b in zip(edges, edges[1:], strict=False))
        else:  # small files travel together, whole
            if small_bytes + size > unit_bytes:
                flush()
            small.append((path, 0, -1))
            small_bytes += size
    flush()
    return units


def _lines(path: str, start: int, end: int) -> Iterator[bytes]:
    """The lines that *begin* in [start, end) (end -1: the whole file): adjacent ranges read each line once."""
    with open(path, "rb") as fh:
        if start > 0:
            fh.seek(start - 1)
            if fh.read(1) != b"\n":
                fh.readline()  # the line that began before `start` belongs to the previous range
        while end < 0 or fh.tell() < end:
            line = fh.readline()
            if not line:
                return
            yield line


def _decode(raw: bytes, path: str, field: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{field} '{path}': not UTF-8 text; re-encode it as UTF-8") from None


def read_unit(unit: Unit, *, text_field: str, field: str, txt_unit: str) -> Iterator[str]:
    """The documents of one unit, in file order (empty and non-text rows skipped)."""
    for path, start, end in unit.segments:
        if unit.kind == "jsonl":
            for number, line in enumerate(_lines(path, start, end)):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as err:
                    raise InputError(f"{field} '{path}': a line near byte {start} is not JSON ({err}); fix it or "
                                     "remove it") from None
                text = row.get(text_field) if isinstance(row, dict) else None
                if isinstance(text, str) and text.strip():
                    yield text
                del number
        elif unit.kind == "txt-line":
            for line in _lines(path, start, end):
                text = _decode(line, path, field).rstrip("\n").rstrip("\r")
                if text.strip():
                    yield text
        elif unit.kind == "txt":
            with open(path, "rb") as fh:
                whole = _decode(fh.read(), path, field)
            pieces = [whole] if txt_unit == "file" else [p.strip("\n") for p in whole.split("\n\n")]
            yield from (p for p in pieces if p.strip())
        elif unit.kind == "parquet":
            import pyarrow.parquet as pq

            table = pq.ParquetFile(path).read_row_groups(list(range(start, end)), columns=[text_field])
            for batch in table.column(text_field).chunks:
                yield from (t for t in batch.to_pylist() if isinstance(t, str) and t.strip())
        elif unit.kind in ("datasets", "hub", "hub-stream"):
            yield from _datasets_unit(unit.kind, path, start, end, text_field, field, txt_unit)
        else:
            raise ValueError(f"unknown unit kind {unit.kind}")


def _datasets_unit(kind: str, path: str, index: int, count: int, text_field: str, field: str, txt_unit: str
                   ) -> Iterator[str]:
    """Formats read through `datasets` (csv, json arrays; hub datasets): a whole file, or one contiguous shard."""
    source = json.loads(path) if kind != "datasets" else path
    ds = load_documents(source, text_field, field, txt_unit=txt_unit, streaming=kind == "hub-stream")
    if kind == "hub-stream":  # an IterableDataset, already reduced to `text`: read in order until told to stop
        yield from (row["text"] for row in ds if isinstance(row["text"], str) and row["text"].strip())
        return
    if kind == "hub" and count > 1:
        ds = ds.shard(num_shards=count, index=index, contiguous=True)
    for batch in ds.select_columns(["text"]).iter(batch_size=1000):
        yield from batch["text"]


def corpus_units(source: str | dict, *, text_field: str, field: str, txt_unit: str, unit_bytes: int,
                 streaming: bool = False) -> tuple[list[Unit], str, list]:
    """(read units, the text field they read, the source's identity for the cache key). Checks what can be checked
    without reading the corpus: paths, empty files, file types, and the text field in the first record."""
    if isinstance(source, dict) and not any(source.get(k) for k in HUB_KEYS[1:]) and _is_local(source["path"]):
        text_field = source.get("text_field") or text_field
        source = source["path"]
    if isinstance(source, str) and source.startswith("packaged:"):
        name = source.split(":", 1)[1]
        if name not in PACKAGED_CORPORA:
            raise InputError(f"{field} '{source}': unknown packaged corpus; valid: "
                             + ", ".join(f"packaged:{n}" for n in PACKAGED_CORPORA))
        path = str(_packaged_parquet(name))
        return plan_units("parquet", [path], unit_bytes), "text", [path, os.path.getsize(path)]
    if isinstance(source, str) and _is_local(source):
        loader, files = _source_files(source, field)
        for f in files:
            if os.path.getsize(f) == 0:
                raise InputError(f"{field} '{f}': the file is empty; give a corpus with text in it")
        identity = [[os.path.abspath(f), os.path.getsize(f), os.stat(f).st_mtime_ns] for f in files]
        if loader == "text":
            kind = "txt-line" if txt_unit == "line" else "txt"
        elif loader == "parquet":
            kind = "parquet"
            _check_columns(files[0], _parquet_columns(files[0]), text_field, field)
        elif loader == "json" and all(f.lower().endswith(".jsonl") for f in files):
            kind = "jsonl"
            first = _first_json_record(files[0], field)
            if first is not None:
                _check_columns(files[0], list(first), text_field, field)
        else:  # csv, and .json files (a JSON array or JSON lines): read whole, through datasets
            kind = "datasets"
            load_documents(files[0], text_field, field, txt_unit=txt_unit)  # checks the field and the format
        return plan_units(kind, files, unit_bytes), text_field, identity
    spec = json.dumps(source)
    if streaming:
        return [Unit("hub-stream", ((spec, 0, 1),), 0)], text_field, [spec, "streaming"]
    ds = load_documents(source, text_field, field, txt_unit=txt_unit)  # downloads once; checks the text field
    count = max(1, math.ceil(ds.data.nbytes / unit_bytes))
    units = [Unit("hub", ((spec, i, count),), ds.data.nbytes // count) for i in range(count)]
    return units, text_field, [spec, ds._fingerprint]


def _parquet_columns(path: str) -> list[str]:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).schema_arrow.names


def _first_json_record(path: str, field: str) -> dict | None:
    with open(path, "rb") as fh:
        for line in fh:
            if line.strip():
                try:
                    row = json.loads(line)
                except ValueError as err:
                    raise InputError(f"{field} '{path}': its first line is not JSON ({err}); give JSON lines "
                                     "(one object per line)") from None
                return row if isinstance(row, dict) else {}
    return None


def _check_columns(path: str, columns: list[str], text_field: str, field: str) -> None:
    if text_field not in columns:
        setting = "eval.text_field" if field.startswith("eval.") else "data.text_field"
        raise InputError(f"{field} '{path}': no text field '{text_field}' (columns: {', '.join(columns)}); set "
                         f"{setting}, or text_field in this source's mapping ({{path: ..., text_field: ...}})")


