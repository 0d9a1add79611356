"""Synthetic rewriting of a small domain corpus (`raycpt augment`; WRAP, arXiv 2401.16380; EntiGraph, arXiv
2409.07431): a generator LM rewrites each training document in a few styles, `copies` times each, into a jsonl
corpus that `raycpt.core.data.sources` reads like any other (`<output>/texts`, one `unit_XXXXX.jsonl` per read unit).

Per read unit of the domain corpus (the units the data step cut, `data.unit_mb`), `AugmentWorker`:
1. reads its documents and drops every one that is not in the domain TRAIN split: the held-out documents (the
   seeded hash of their normalised text below the threshold the data step chose and recorded in the data manifest,
   `PreparedCorpus.heldout_fraction`; so the data step runs first) and the downstream task's validation / test texts
   (by the same text key the data step drops them by). The generator never sees them;
2. fills each style's prompt with the document (cut to `max_input_tokens`), wrapped in the generator's chat
   template when it has one, and samples `copies` rewrites with HF `generate`: each rewrite draws its tokens from its
   own `torch.Generator`, seeded from (augment.seed, the document's text key, style, copy), through a logits
   processor that samples (temperature, top-p; Gumbel-max in float64) and hands `generate` a one-hot
   choice, so a rewrite does not depend on which prompts share its batch or which worker ran the unit (tests check
   that batch sizes 1, 4 and 5, and 1 and 2 Ray workers, give the same bytes; in principle the last-bit differences
   of batched kernels can flip a near-tie, about one token in a million: `_RowSampler`);
3. writes the unit's records (`text`, and provenance `source_key`, `style`, `copy`, `generator`, `seed`)
   atomically, then a done marker (`unit_XXXXX.done`, its counts and the settings' key): a rerun skips every unit
   whose marker has the same key, so a killed job resumes per unit, and changed settings redo them all.

`augment_corpus` plans the units, skips the finished ones, maps the rest (`raycpt.core.data.shards.map_in_process` here,
`raycpt.edge.data.RayDataMapper` on Ray Data: one model per actor) and writes `augment.json`. Generation runs
with HF `generate` only: vLLM is not used (not implemented), even where it is installed.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from raycpt.core.config import AUGMENT_MANIFEST, AUGMENT_TEXTS, ExperimentConfig
from raycpt.core.data.shards import Mapper, map_in_process, split_hash, text_key, threshold_u
from raycpt.core.data.sources import Unit, corpus_units, read_unit, source_text, unit_bytes
from raycpt.core.errors import InputError
from raycpt.core.files import write_json
from raycpt.core.model.loading import load_model, load_tokenizer, max_positions, padded_batch, resolve_model_source
from raycpt.core.prepare import MANIFEST_FILE, Manifest, load_eval_task

STYLE_TEMPLATES = {
    "paraphrase": "Paraphrase the following text in clear, high-quality English, in the style of an encyclopedia "
                  "article. Keep every fact and name; add nothing.\n\nText:\n{text}\n\nParaphrase:\n",
    "qa": "Turn the following text into questions and answers that together cover all of its facts, each as a line "
          "'Question: ...' followed by a line 'Answer: ...'.\n\nText:\n{text}\n\nQuestions and answers:\n",
    "summary": "Summarise the following text in a few sentences, keeping its key facts, names and terms.\n\nText:\n"
               "{text}\n\nSummary:\n",
    "simple": "Rewrite the following text in plain, simple language that a newcomer to the subject can follow. Keep "
              "every fact.\n\nText:\n{text}\n\nRewritten:\n",
    "entities": "List the important entities (people, places, objects, concepts) of the following text, then explain "
                "in prose how they relate to each other according to the text.\n\nText:\n{text}\n\nEntities and "
                "how they relate:\n",
}
"""The built-in styles (augment.styles; their names are config.AUGMENT_STYLES). `entities` is a one-pass nod to
EntiGraph, not its two-stage entity-pair generation."""
MANIFEST = AUGMENT_MANIFEST
TEXTS_DIR = AUGMENT_TEXTS
"""The corpus dir inside the output: only `unit_XXXXX.jsonl` files (markers end in .done, which sources skip)."""


def unit_stem(index: int) -> str:
    return f"unit_{index:05d}"


def sample_seed(seed: int, key: int, style: str, copy: int) -> int:
    """The seed of one rewrite: (augment.seed, the document's text key, style, copy) hashed to 63 bits."""
    digest = hashlib.blake2b(f"{seed}:{key:016x}:{style}:{copy}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


# ---------------------------------------------------------------------------------------------------------------
# Checks before any generation


def generator_source(cfg: ExperimentConfig) -> tuple[str, str]:
    """(the generator's source as configured, the config field that named it)."""
    return (cfg.augment.model, "augment.model") if cfg.augment.model else (cfg.model.source, "model.source")


def check_generator(cfg: ExperimentConfig) -> str:
    """The generator resolves, its config loads, it is a causal LM, its tokenizer loads and max_new_tokens leaves
    room for a prompt in its positions. Returns the resolved source (a local dir, or a hub id); InputError, one
    line naming the field, otherwise."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    source, where = generator_source(cfg)
    trust = cfg.model.trust_remote_code
    try:
        resolved = resolve_model_source(source)
        model_config = AutoConfig.from_pretrained(resolved, trust_remote_code=trust)
    except InputError as err:
        raise InputError(str(err).replace("model.source", where, 1)) from None
    except (OSError, ValueError) as err:
        reason = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
        raise InputError(f"{where} '{source}': cannot load the generator's config ({reason}); give a local model "
                         "dir, a reachable hub id or packaged:smollm2-135m") from None
    kind = getattr(model_config, "model_type", "?")
    if kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and "AutoModelForCausalLM" not in (
            getattr(model_config, "auto_map", None) or {}):
        raise InputError(f"{where} '{source}': a '{kind}' model is not a causal LM (AutoModelForCausalLM cannot "
                         "load it), so it cannot generate rewrites; give a decoder LM such as packaged:smollm2-135m")
    try:
        load_tokenizer(resolved, trust)
    except InputError as err:
        raise InputError(str(err).replace(f"model.source '{resolved}'", f"{where} '{source}'", 1)) from None
    limit = max_positions(model_config)
    if limit is not None and cfg.augment.max_new_tokens >= limit:
        raise InputError(f"augment.max_new_tokens={cfg.augment.max_new_tokens} leaves no room for a prompt in the "
                         f"generator's {limit} positions; set it below {limit}")
    return resolved


# ---------------------------------------------------------------------------------------------------------------
# One unit


@dataclass(frozen=True)
class AugmentSpec:
    """Everything a worker needs, the same on every worker (picklable)."""

    texts_dir: str
    generator: str
    """The source the worker loads (a local dir after resolution, or a hub id)."""
    generator_name: str
    """The generator as configured (the records' `generator`)."""
    trust_remote_code: bool
    styles: tuple[tuple[str, str], ...]
    """(name, template) per style, in augment.styles order."""
    copies: int
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    max_input_tokens: int
    batch_size: int
    chat: bool
    text_field: str
    field: str
    txt_unit: str
    split_seed: int
    """data.seed: the seed of the held-out split."""
    threshold: int
    """A document is held out (never rewritten) when split_hash(key, split_seed) < threshold."""
    banned: tuple[int, ...]
    """Text keys of the downstream validation / test texts."""
    key: str = ""
    """Hash of every setting the output depends on (`spec_key`): a done marker with another key is redone."""
    device: str = ""
    """'' = CUDA when this process sees a GPU, else CPU."""


def spec_key(spec: AugmentSpec) -> str:
    """What the records depend on: all but where they go, how they are batched and on what device (and the key)."""
    raw = {k: v for k, v in asdict(spec).items() if k not in ("texts_dir", "batch_size", "device", "key")}
    return hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class AugmentUnit:
    """What one unit did (its done marker holds it)."""

    unit: int
    documents: int
    """Documents read."""
    heldout: int
    """Skipped: in the held-out split (validation / test blocks)."""
    leakage: int
    """Skipped: a downstream validation / test text."""
    texts: int
    """Rewrites written."""
    empty: int
    """Rewrites that decoded to whitespace only (not written)."""
    tokens: int
    """Tokens generated (an end-of-sequence token counted; padding after it not)."""
    bytes: int
    """Input bytes of the unit."""
    seconds: float
    key: str = ""


class _RowSampler:
    """A logits processor that samples each row's next token with that row's own torch.Generator and returns scores
    that make greedy decoding pick it. HF's own sampling draws from one global RNG for the whole batch, so a row's
    tokens would depend on its batch; these do not.

    Gumbel-max (argmax of logits / temperature + Gumbel noise, over the top-p nucleus), in float64 on the logits'
    device: a batched forward pass gives a row logits that differ from its unbatched ones in the last bits (left
    padding, other matmul shapes: ~3e-7 for the tiny test model), which would move an inverse-CDF draw across a token
    boundary every few dozen tokens over a flat 50k vocabulary; the winner of a Gumbel-max only changes when its
    lead over the runner-up is below that difference (about one token in a million). The generators live on the
    logits' device, so the same seed samples other tokens on CUDA than on the CPU (the logits differ there anyway)."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float) -> None:
        self.seeds, self.temperature, self.top_p = seeds, temperature, top_p
        self.generators: list[torch.Generator] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.temperature == 0:
            return scores  # greedy: generate's argmax
        if not self.generators:
            self.generators = [torch.Generator(scores.device).manual_seed(s) for s in self.seeds]
        x = scores.double() / self.temperature
        if self.top_p < 1:  # drop the tokens whose higher-ranked mass already reaches top_p (the first never)
            p, order = torch.softmax(x.float(), dim=-1).sort(dim=-1, descending=True, stable=True)
            drop = (p.cumsum(-1) - p) >= self.top_p
            x = x.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        noise = torch.stack([torch.rand(x.shape[-1], generator=g, dtype=torch.float64, device=scores.device)
                             for g in self.generators])
        choice = (x - torch.log(-torch.log(noise.clamp(min=1e-300)))).argmax(dim=-1)
        out = torch.full_like(scores, float("-inf"))
        out[torch.arange(len(choice), device=scores.device), choice] = 0.0
        return out


class AugmentWorker:
    """One unit of the domain corpus -> its rewrites; the generator and its tokenizer load once per worker."""

    def __init__(self, spec: AugmentSpec) -> None:
        from transformers import GenerationConfig

        self.spec = spec
        self.device = torch.device(spec.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = load_tokenizer(spec.generator, spec.trust_remote_code)
        dtype = "bfloat16" if self.device.type == "cuda" else "float32"
        self.model = load_model(spec.generator, dtype, spec.trust_remote_code).eval().to(self.device)
        own = self.model.generation_config.eos_token_id if self.model.generation_config else None
        eos = {self.tokenizer.eos_token_id, *(own if isinstance(own, list) else [own] if own is not None else [])}
        self.eos = sorted(e for e in eos if e is not None)
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos[0]
        # the model's own generation defaults (repetition penalty, sampling, ...) must not change the rewrites
        self.model.generation_config = GenerationConfig()
        self.config = GenerationConfig(max_new_tokens=spec.max_new_tokens, do_sample=False, num_beams=1,
                                       pad_token_id=self.pad, eos_token_id=self.eos)
        self.limit = max_positions(self.model.config)
        self.chat = spec.chat and bool(getattr(self.tokenizer, "chat_template", None))
        self.budgets: dict[str, int] = {}

    def __call__(self, item: dict) -> dict:
        index, unit = int(item["index"]), Unit(item["kind"], tuple(map(tuple, item["segments"])), item["bytes"])
        return asdict(self.run(index, unit))

    def wrap(self, prompt: str) -> str:
        """The prompt as the generator reads it: a user turn of its chat template, when it has one and chat is on."""
        if not self.chat:
            return prompt
        return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                  add_generation_prompt=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=not self.chat, verbose=False)["input_ids"]

    def fit(self, document: str, template: str) -> str:
        """The document cut to max_input_tokens, and to what the generator's positions leave for it."""
        if template not in self.budgets:
            budget = self.spec.max_input_tokens
            if self.limit:
                overhead = len(self.encode(self.wrap(template.replace("{text}", ""))))
                budget = min(budget, self.limit - self.spec.max_new_tokens - overhead)
                if budget < 1:
                    raise InputError(f"augment: the '{template[:40]}...' prompt and augment.max_new_tokens="
                                     f"{self.spec.max_new_tokens} fill the generator's {self.limit} positions; lower "
                                     "augment.max_new_tokens or shorten the template")
            self.budgets[template] = budget
        budget = self.budgets[template]
        ids = self.tokenizer(document, add_special_tokens=False, verbose=False)["input_ids"]
        return document if len(ids) <= budget else self.tokenizer.decode(ids[:budget])

    @torch.no_grad()
    def generate(self, prompts: list[str], seeds: list[int]) -> list[tuple[str, int]]:
        """(text, tokens generated) for each prompt (the document already in it), sampled with its seed. Longest
        prompts first, `batch_size` at a time, left-padded; the order of the answers is the order of the prompts."""
        from transformers import LogitsProcessorList

        encoded = [self.encode(self.wrap(p)) for p in prompts]
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        out: list[tuple[str, int]] = [("", 0)] * len(encoded)
        eos = torch.tensor(self.eos)
        for start in range(0, len(order), self.spec.batch_size):
            rows = order[start:start + self.spec.batch_size]
            ids, mask = padded_batch([encoded[i] for i in rows], self.pad, left=True)
            sampler = _RowSampler([seeds[i] for i in rows], self.spec.temperature, self.spec.top_p)
            generated = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                            generation_config=self.config,
                                            logits_processor=LogitsProcessorList([sampler])).cpu()
            for row, i in enumerate(rows):
                new = generated[row, ids.shape[1]:]
                ended = torch.isin(new, eos).nonzero()
                length = int(ended[0]) + 1 if len(ended) else len(new)
                out[i] = (self.tokenizer.decode(new[:length], skip_special_tokens=True).strip(), length)
        return out

    def run(self, index: int, unit: Unit) -> AugmentUnit:
        spec, texts_dir = self.spec, Path(self.spec.texts_dir)
        finished = read_done(texts_dir, index, spec.key)
        if finished is not None:
            return finished
        start = time.perf_counter()
        banned = frozenset(spec.banned)
        documents = heldout = leakage = 0
        prompts: list[str] = []
        meta: list[tuple[int, str, int, int]] = []  # (document key, style, copy, seed) of each prompt
        for text in read_unit(unit, text_field=spec.text_field, field=spec.field, txt_unit=spec.txt_unit):
            documents += 1
            key = text_key(text)
            if key in banned:  # a downstream validation / test text
                leakage += 1
                continue
            if split_hash(key, spec.split_seed) < spec.threshold:  # held out: validation / test blocks
                heldout += 1
                continue
            for style, template in spec.styles:
                prompt = template.replace("{text}", self.fit(text, template))
                for copy in range(spec.copies):
                    prompts.append(prompt)
                    meta.append((key, style, copy, sample_seed(spec.seed, key, style, copy)))
        answers = self.generate(prompts, [m[3] for m in meta]) if prompts else []
        lines = [json.dumps({"text": text, "source_key": f"{key:016x}", "style": style, "copy": copy,
                             "generator": spec.generator_name, "seed": spec.seed}, ensure_ascii=False)
                 for (text, _), (key, style, copy, _) in zip(answers, meta, strict=True) if text]
        path = texts_dir / f"{unit_stem(index)}.jsonl"
        if lines:  # an empty file would not read as a corpus: a unit with nothing to rewrite leaves its marker only
            _write_atomic(path, "\n".join(lines) + "\n")
        else:
            path.unlink(missing_ok=True)
        result = AugmentUnit(index, documents, heldout, leakage, len(lines), len(answers) - len(lines),
                             sum(n for _, n in answers), unit.bytes, round(time.perf_counter() - start, 3), spec.key)
        _write_atomic(texts_dir / f"{unit_stem(index)}.done", json.dumps(asdict(result)))
        return result


def read_done(texts_dir: Path, index: int, key: str) -> AugmentUnit | None:
    """The unit's result when it finished with these settings (its marker has `key`, its texts are there)."""
    marker = texts_dir / f"{unit_stem(index)}.done"
    if not marker.exists():
        return None
    result = AugmentUnit(**json.loads(marker.read_text()))
    if result.key != key or (result.texts and not (texts_dir / f"{unit_stem(index)}.jsonl").exists()):
        return None
    return result


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------
# The driver


@dataclass
class AugmentResult:
    """What `augment_corpus` did; `augment.json` holds it with the settings."""

    output: str
    corpus: str
    """The jsonl corpus dir (`<output>/texts`): give it wherever a corpus is read (sources.load_documents)."""
    generator: str
    styles: dict[str, str]
    """name -> template."""
    units: list[AugmentUnit] = field(default_factory=list)
    resumed_units: int = 0
    """Units finished by an earlier run with the same settings (not redone)."""
    documents: int = 0
    heldout_skipped: int = 0
    leakage_skipped: int = 0
    texts: int = 0
    empty: int = 0
    tokens: int = 0
    seconds: float = 0.0
    """Wall time of this run."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """One line for the terminal: what was written, from what, where."""
        resumed = f", {self.resumed_units} unit(s) done by an earlier run" if self.resumed_units else ""
        return (f"Augmented corpus: {self.texts:,} texts, {self.tokens:,} generated tokens, from {self.documents:,} "
                f"documents ({self.heldout_skipped} held-out and {self.leakage_skipped} downstream validation/test "
                f"texts skipped); {self.seconds:.1f} s{resumed}; in {self.corpus} (manifest "
                f"{Path(self.output) / MANIFEST})")


def without_synthetic(cfg: ExperimentConfig) -> ExperimentConfig:
    """The config the augment stage prepares and reads with: no synthetic corpus (with `data.synthetic: augment` it
    is the stage's own output), so its data step fixes the same held-out split without needing the rewrites."""
    return replace(cfg, data=replace(cfg.data, synthetic=""))


def output_dir(cfg: ExperimentConfig) -> Path:
    """augment.output, default <experiment dir>/augment."""
    return cfg.augment_dir()


def load_manifest(cfg: ExperimentConfig) -> Manifest:
    """The data manifest of the prepared experiment (the held-out threshold is read from it)."""
    path = cfg.experiment_dir() / MANIFEST_FILE
    if not path.exists():
        raise InputError(f"{path}: no data manifest; the data step must run first (`raycpt augment CONFIG` runs it, "
                         "as does `raycpt sweep`)")
    return Manifest.load(cfg.experiment_dir())


def build_spec(cfg: ExperimentConfig, manifest: Manifest, generator: str) -> tuple[AugmentSpec, list[Unit]]:
    """The spec every worker gets and the domain corpus's read units (the data step's: same data.unit_mb)."""
    a, d = cfg.augment, cfg.data
    if d.streaming:
        raise InputError("data.streaming: augment reads the whole domain corpus; rewrite a corpus that fits on disk "
                         "(a small domain corpus is what augment is for), with data.streaming=false")
    units, text_field, _ = corpus_units(d.domain, text_field=d.text_field, field="data.domain", txt_unit=d.txt_unit,
                                        unit_bytes=unit_bytes(d.unit_mb))
    task = load_eval_task(cfg)
    banned = tuple(sorted({text_key(t) for t in task.heldout_texts()})) if task else ()
    styles = tuple((name, a.templates.get(name) or STYLE_TEMPLATES[name]) for name in a.styles)
    spec = AugmentSpec(str(output_dir(cfg) / TEXTS_DIR), generator, generator_source(cfg)[0],
                       cfg.model.trust_remote_code, styles, a.copies, a.max_new_tokens, a.temperature, a.top_p, a.seed,
                       a.max_input_tokens, a.batch_size, a.chat, text_field, "data.domain", d.txt_unit, d.seed,
                       threshold_u(manifest.domain.heldout_fraction), banned)
    return AugmentSpec(**{**asdict(spec), "key": spec_key(spec)}), units


def _unit_from_row(raw: dict) -> AugmentUnit:
    """A result row (Ray Data may hand back numpy scalars) as plain Python."""
    kinds = {f.name: f.type for f in fields(AugmentUnit)}
    cast = {"int": int, "float": float, "str": str}
    return AugmentUnit(**{name: cast[kinds[name]](raw[name]) for name in kinds})


def augment_corpus(cfg: ExperimentConfig, *, mapper: Mapper = map_in_process,
                   on_unit: Callable[[AugmentUnit | None, int, bool], None] | None = None,
                   manifest: Manifest | None = None, generator: str | None = None) -> AugmentResult:
    """Rewrite the domain corpus's training documents unit by unit (skipping units finished with the same
    settings) and write `augment.json`. `manifest`: the prepared data (default: the experiment dir's); `generator`:
    the resolved generator (default: checked here); `on_unit(result, units, resumed)` hears of the start (result
    None) and of every unit, the ones finished by an earlier run first (resumed True)."""
    started = time.perf_counter()
    manifest = manifest or load_manifest(cfg)
    generator = generator or check_generator(cfg)
    spec, units = build_spec(cfg, manifest, generator)
    out, texts_dir = output_dir(cfg), Path(spec.texts_dir)
    texts_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*texts_dir.glob("unit_*.jsonl"), *texts_dir.glob("unit_*.done")]:
        if int(stale.name[5:10]) >= len(units):  # from a run that cut the corpus into more units
            stale.unlink()
    results = [r for i in range(len(units)) if (r := read_done(texts_dir, i, spec.key)) is not None]
    if on_unit:
        on_unit(None, len(units), False)
        for result in results:
            on_unit(result, len(units), True)
    resumed = len(results)
    done = {r.unit for r in results}
    for index in set(range(len(units))) - done:  # another run's output (other settings, or half written): not mixed in
        for suffix in (".jsonl", ".done"):
            (texts_dir / f"{unit_stem(index)}{suffix}").unlink(missing_ok=True)
    items = [{"index": i, "kind": u.kind, "segments": [list(s) for s in u.segments], "bytes": u.bytes}
             for i, u in enumerate(units) if i not in done]
    for raw in mapper(AugmentWorker, (spec,), items) if items else ():
        result = _unit_from_row(raw)
        results.append(result)
        if on_unit:
            on_unit(result, len(units), False)
    results.sort(key=lambda r: r.unit)
    summary = AugmentResult(
        output=str(out), corpus=str(texts_dir), generator=spec.generator_name, styles=dict(spec.styles),
        units=results, resumed_units=resumed, documents=sum(r.documents for r in results),
        heldout_skipped=sum(r.heldout for r in results), leakage_skipped=sum(r.leakage for r in results),
        texts=sum(r.texts for r in results), empty=sum(r.empty for r in results),
        tokens=sum(r.tokens for r in results), seconds=round(time.perf_counter() - started, 3))
    write_json(out / MANIFEST, {**summary.to_dict(), "generator_source": generator, "key": spec.key,
                                "config": asdict(cfg.augment),
                                "data": {"domain": source_text(cfg.data.domain), "text_field": spec.text_field,
                                         "seed": cfg.data.seed, "unit_mb": cfg.data.unit_mb,
                                         "heldout_fraction": manifest.domain.heldout_fraction}})
    return summary
