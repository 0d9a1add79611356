"""Documents -> one token stream (EOS after each document), as fast as the tokenizer allows, never different.

The reference is the Hugging Face tokenizer itself: `tokenizer(texts, add_special_tokens=False)`. Two faster
encoders may stand in for it:
- `tiktoken`, for byte-level BPE tokenizers (GPT-2, SmolLM2, Llama 3, ...: no normalizer, a ByteLevel
  pre-tokenizer or a regex Split + ByteLevel): the same vocabulary, merges (as ranks) and pre-tokenizer regex, run by
  tiktoken's BPE core, ~2-3x faster than `tokenizers` on this machine;
- the `tokenizers` backend's `encode_batch_fast` (no offsets, no attention mask, no BatchEncoding).
Each candidate must give exactly the reference's ids on a sample of documents spread over the corpus, or it is not
used. Documents the candidate cannot encode exactly by construction (they contain an added token such as
`<|endoftext|>`, which HF matches inside text, or a byte the vocabulary lacks) go to the reference one by one.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain

import numpy as np

# GPT-2's pre-tokenizer regex: what `ByteLevel(use_regex=True)` splits on.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
VERIFY_DOCUMENTS = 256
VERIFY_CHARACTERS = 256_000  # the reference encodes the sample: keep its cost to a few % of a corpus
Ragged = tuple[np.ndarray, np.ndarray]
"""A batch's ids, all documents concatenated (int64), and each document's length: no per-document arrays."""
Encoder = Callable[[list[str]], Ragged]


def to_ragged(rows: list[list[int]]) -> Ragged:
    lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    return np.fromiter(chain.from_iterable(rows), dtype=np.int64, count=int(lengths.sum())), lengths


def split_rows(flat: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
    """One array (a view) per document."""
    return np.split(flat, np.cumsum(lengths)[:-1]) if len(lengths) else []


def to_rows(batch: Ragged) -> list[list[int]]:
    return [row.tolist() for row in split_rows(*batch)]


def reference_encoder(tokenizer) -> Encoder:
    """The tokenizer as users call it: the ids every other encoder must reproduce."""
    return lambda texts: to_ragged(tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
                                   if texts else [])


def backend_encoder(tokenizer) -> Encoder | None:
    """The Rust `tokenizers` backend without offsets/attention masks (fast tokenizers only)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    encode = getattr(backend, "encode_batch_fast", None)
    if encode is None:
        return None
    return lambda texts: to_ragged([e.ids for e in encode(texts, add_special_tokens=False)])


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, used by every ByteLevel vocabulary."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def _byte_level_pattern(pre_tokenizer: dict | None) -> str | None:
    """The split regex of a byte-level pre-tokenizer tiktoken can run exactly, or None."""
    if not pre_tokenizer:
        return None
    if pre_tokenizer.get("type") == "ByteLevel":
        if pre_tokenizer.get("add_prefix_space") or not pre_tokenizer.get("use_regex", True):
            return None
        return GPT2_PATTERN
    steps = pre_tokenizer.get("pretokenizers") if pre_tokenizer.get("type") == "Sequence" else None
    if steps and len(steps) == 2:
        split, byte_level = steps
        if (split.get("type") == "Split" and split.get("behavior") == "Isolated" and not split.get("invert")
                and "Regex" in (split.get("pattern") or {}) and byte_level.get("type") == "ByteLevel"
                and not byte_level.get("add_prefix_space") and not byte_level.get("use_regex", True)):
            return split["pattern"]["Regex"]
    return None


@dataclass
class TiktokenBPE:
    """A byte-level BPE tokenizer's vocabulary and merges run by tiktoken; ids mapped back to the tokenizer's."""

    encoding: object
    rank_to_id: np.ndarray
    """tiktoken rank -> tokenizer id (-1: a byte the tokenizer's vocabulary lacks)."""
    added: re.Pattern | None
    """Added tokens HF matches inside raw text; documents containing one go to the reference."""
    threads: int

    @classmethod
    def from_tokenizer(cls, tokenizer) -> TiktokenBPE | None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            return None
        try:
            import tiktoken
        except ImportError:
            return None
        spec = json.loads(backend.to_str())
        model, pattern = spec.get("model") or {}, _byte_level_pattern(spec.get("pre_tokenizer"))
        if (pattern is None or spec.get("normalizer") or model.get("type") != "BPE" or model.get("dropout")
                or model.get("byte_fallback") or model.get("continuing_subword_prefix")
                or model.get("end_of_word_suffix")):
            return None
        to_latin1 = {ord(char): byte for byte, char in _bytes_to_unicode().items()}
        known = dict.fromkeys(to_latin1)  # str.translate deletes these: what is left is not a byte-level char

        def to_bytes(token: str) -> bytes | None:
            return None if token.translate(known) else token.translate(to_latin1).encode("latin-1")

        # Single bytes first, then each merge's result ranked by its merge's position: tiktoken merges the adjacent
        # pair whose result ranks lowest, which is the tokenizer's lowest merge (checked on a sample below).
        ranks = {bytes([byte]): byte for byte in range(256)}
        for index, merge in enumerate(model.get("merges") or []):
            left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
            left_bytes, right_bytes = to_bytes(left), to_bytes(right)
            if left_bytes is None or right_bytes is None:
                return None
            ranks.setdefault(left_bytes + right_bytes, 256 + index)
        rank_to_id = np.full(max(ranks.values()) + 1, -1, dtype=np.int64)
        for token, token_id in (model.get("vocab") or {}).items():
            token_bytes = to_bytes(token)
            if token_bytes is not None and token_bytes in ranks:
                rank_to_id[ranks[token_bytes]] = token_id
        try:
            encoding = tiktoken.Encoding("raycpt-byte-level-bpe", pat_str=pattern, mergeable_ranks=ranks,
                                         special_tokens={})
        except Exception:  # a regex tiktoken's engine does not accept
            return None
        added = [token.content for token in tokenizer.added_tokens_decoder.values()]
        return cls(encoding, rank_to_id, re.compile("|".join(map(re.escape, added))) if added else None,
                   threads=max(1, len(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else 1)

    def encode_ranks(self, texts: list[str]) -> list[list[int]]:
        """tiktoken ranks per text; the texts are split into one contiguous chunk per thread (tiktoken's core
        releases the GIL; a future per text costs more than it saves on short documents)."""
        encode = self.encoding.encode_ordinary
        if self.threads == 1 or len(texts) < 2 * self.threads:
            return [encode(text) for text in texts]
        size = -(-len(texts) // self.threads)
        with ThreadPoolExecutor(self.threads) as pool:
            chunks = pool.map(lambda start: [encode(text) for text in texts[start:start + size]],
                              range(0, len(texts), size))
            return list(chain.from_iterable(chunks))

    def encoder(self, reference: Encoder) -> Encoder:
        def encode(texts: list[str]) -> Ragged:
            ranks, lengths = to_ragged(self.encode_ranks(texts))
            flat = self.rank_to_id[ranks]
            ends = np.cumsum(lengths)
            unknown = set((np.searchsorted(ends, np.flatnonzero(flat < 0), side="right")).tolist())
            exceptions = sorted(unknown | ({i for i, text in enumerate(texts) if self.added.search(text)}
                                           if self.added is not None else set()))
            if not exceptions:
                return flat, lengths
            rows = split_rows(flat, lengths)
            redone_flat, redone_lengths = reference([texts[i] for i in exceptions])
            for i, row in zip(exceptions, split_rows(redone_flat, redone_lengths), strict=True):
                rows[i] = row
            lengths[exceptions] = redone_lengths
            return np.concatenate(rows), lengths

        return encode


@functools.lru_cache(maxsize=4)
def _tiktoken_for(tokenizer) -> TiktokenBPE | None:
    """Built once per tokenizer and process (~0.3 s for a 49k vocabulary); each corpus split reuses it."""
    return TiktokenBPE.from_tokenizer(tokenizer)


def choose_encoder(tokenizer, sample: list[str]) -> tuple[str, Encoder]:
    """The fastest encoder that reproduces the reference's ids on `sample`: (its name, the encoder). When a faster
    one is passed over, the name says why (e.g. "tokenizers (tiktoken: ids differ on the sample)") and a warning is
    logged, so a slow prepare is never a mystery."""
    reference = reference_encoder(tokenizer)
    if not sample:  # nothing to check a candidate on (and nothing to encode)
        return "transformers", reference
    expected = to_rows(reference(sample))
    try:
        tiktoken_bpe = _tiktoken_for(tokenizer)
    except TypeError:  # an unhashable tokenizer class: build it each time
        tiktoken_bpe = TiktokenBPE.from_tokenizer(tokenizer)
    candidates = [("tiktoken", tiktoken_bpe.encoder(reference) if tiktoken_bpe else None,
                   "not a plain byte-level BPE tokenizer, or tiktoken is not installed"),
                  ("tokenizers", backend_encoder(tokenizer), "no fast (Rust) tokenizer backend")]
    passed_over = []
    for name, encoder, unavailable in candidates:
        if encoder is None:
            passed_over.append(f"{name}: {unavailable}")
        elif to_rows(encoder(sample)) != expected:
            passed_over.append(f"{name}: ids differ from the tokenizer's on the sample")
        else:
            break
    else:
        name, encoder = "transformers", reference
    if passed_over:
        name = f"{name} ({'; '.join(passed_over)})"
        logging.getLogger("raycpt").warning("tokenising with %s", name)
    return name, encoder


@dataclass
class BackendOnly:
    """A fast tokenizer's Rust backend and added tokens, rebuilt from the driver's JSON (`backend_json`) in a worker
    without transformers or torch (~0.3 GiB less per worker). For fast tokenizers the backend's ids are the
    tokenizer's own: transformers calls the same `encode_batch`."""

    backend_tokenizer: object

    @property
    def added_tokens_decoder(self) -> dict:
        return self.backend_tokenizer.get_added_tokens_decoder()

    @classmethod
    def from_json(cls, text: str) -> BackendOnly:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_str(text))


def backend_json(tokenizer) -> str:
    """The tokenizer's Rust backend as JSON ('' for a slow tokenizer): what a worker needs to encode as it does."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend.to_str() if backend is not None else ""


def encoder_by_name(tokenizer, name: str, threads: int = 0) -> Encoder:
    """The encoder `choose_encoder` named (its first word: tiktoken | tokenizers | transformers), built again in
    another process from the tokenizer or a `BackendOnly`; `threads` caps tiktoken's threads (0 = every CPU this
    process may use)."""
    if isinstance(tokenizer, BackendOnly):
        encode = tokenizer.backend_tokenizer.encode_batch
        reference = lambda texts: to_ragged([e.ids for e in encode(texts, add_special_tokens=False)])  # noqa: E731
    else:
        reference = reference_encoder(tokenizer)
    kind = name.split()[0] if name else "transformers"
    if kind == "tiktoken":
        bpe = TiktokenBPE.from_tokenizer(tokenizer)
        if bpe is None:
            raise RuntimeError("tiktoken was verified on the driver but is not usable in this worker: install "
                               "the same tiktoken on every node")
        if threads:
            bpe.threads = threads
        return bpe.encoder(reference)
    if kind == "tokenizers":
        return backend_encoder(tokenizer) or reference
    return reference
