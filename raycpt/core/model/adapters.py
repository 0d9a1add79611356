"""LoRA / DoRA continued pre-training with PEFT (`train.method: lora`): wrap, unwrap, merge.

The loop calls `apply_lora` after loading the weights and setting dropout, before DDP / compile wrap the model:
the released weights are frozen and PEFT injects adapters into the decoder's linear layers (optionally training the
embeddings and LM head fully too, `train.lora_train_embeddings`), so only the adapter's params reach the optimizer
(`build_optimizer` keeps params that require grad).

Checkpoints of a LoRA run hold the adapter only, in PEFT's own format, next to the run's config, whose
`model.source` names the frozen base (saved, loaded and merged by raycpt.core.train.checkpoint: `save_adapter`,
`load_adapter_weights`, `load_merged`). Resume rebuilds base + `apply_lora` from the config and loads the adapter's
weights into it, so the optimizer's params line up with the saved state. The export merges the adapter into the
base weights (`merge_for_export`): a plain HF model that loads without PEFT. `export.adapter` also copies the
adapter as saved: `PeftModel.from_pretrained(base, "export/adapter")` loads it onto the base.
"""

from __future__ import annotations

import warnings

from torch import nn

from raycpt.core.config import TrainConfig
from raycpt.core.errors import InputError

ALL_LINEAR = "all-linear"
"""PEFT's shorthand: every linear layer but the output head."""
_PEFT_NOISE = (".*fan_in_fan_out.*", ".*is_gradient_checkpointing.*")
"""PEFT warnings that say nothing actionable here: GPT-2's Conv1D layers get fan_in_fan_out set for them, and
PEFT reads a deprecated transformers attribute."""


def _module_name(model: nn.Module, module: nn.Module | None) -> str | None:
    return next((name for name, m in model.named_modules() if m is module), None) if module is not None else None


def lora_config(model: nn.Module, t: TrainConfig):
    """The `peft.LoraConfig` of `train.lora_*` for this model."""
    from peft import LoraConfig  # deferred: only LoRA runs pay PEFT's import

    targets = list(t.lora_target_modules)
    modules_to_save, tie = None, False
    if t.lora_train_embeddings:
        embed = _module_name(model, model.get_input_embeddings())
        head = _module_name(model, model.get_output_embeddings())
        modules_to_save = [n for n in (embed, head) if n]
        head_module = model.get_output_embeddings()
        # A tied head shares the embedding matrix: PEFT must train one copy for both (ensure_weight_tying), or the
        # merged export would save a head the trained model never used.
        tie = head_module is not None and head_module.weight is model.get_input_embeddings().weight
    return LoraConfig(r=t.lora_rank, lora_alpha=t.lora_alpha, lora_dropout=t.lora_dropout, use_dora=t.lora_dora,
                      target_modules=ALL_LINEAR if not targets or targets == [ALL_LINEAR] else targets,
                      modules_to_save=modules_to_save, ensure_weight_tying=tie, bias="none", task_type="CAUSAL_LM")


def apply_lora(model: nn.Module, t: TrainConfig) -> nn.Module:
    """`model` (a HF causal LM) wrapped by PEFT with `train.lora_*`: the base weights frozen, adapters trainable.
    Returns the PeftModel the loop trains; InputError (one line) when the target modules match nothing."""
    from peft import get_peft_model  # deferred: only LoRA runs pay PEFT's import

    with warnings.catch_warnings():
        for message in _PEFT_NOISE:
            warnings.filterwarnings("ignore", message=message)
        try:
            return get_peft_model(model, lora_config(model, t))
        except ValueError as err:
            raise InputError(f"train.lora_target_modules: {t.lora_target_modules} ({str(err).splitlines()[0][:160]}"
                             "); name linear layers of the model, e.g. [q_proj, v_proj], or leave it empty for all "
                             "linear layers") from None


def peft_model_of(model: nn.Module) -> nn.Module | None:
    """The PeftModel inside DDP / torch.compile wrappers, or None for a full-weight model."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    # duck-typed, so full-weight runs never import PEFT: PeftModel is what has these two
    return model if callable(getattr(type(model), "get_base_model", None)) and hasattr(model, "peft_config") else None


def unwrap(model: nn.Module) -> nn.Module:
    """The HF model inside DDP / torch.compile / PEFT wrappers (FSDP2 shards the HF model in place: no wrapper;
    PEFT injects its adapter layers into the HF model in place, so this one computes with them)."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    peft_model = peft_model_of(model)
    return peft_model.get_base_model() if peft_model is not None else model


def trainable_params(model: nn.Module) -> int:
    """Parameters that train (and take gradients and optimizer state)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def shadowed_params(model: nn.Module) -> set[int]:
    """ids of params that are held but never computed with: the frozen originals PEFT keeps beside the trained
    copies of `modules_to_save` (the embeddings and head under lora_train_embeddings)."""
    return {id(p) for module in model.modules() if hasattr(module, "original_module")
            and hasattr(module, "modules_to_save") for p in module.original_module.parameters()}


def merge_for_export(model: nn.Module) -> nn.Module:
    """The adapter merged into full weights (`merge_and_unload`): a plain transformers model that saves with
    save_pretrained and reloads with AutoModelForCausalLM, without PEFT. A full-weight model comes back as is."""
    peft_model = peft_model_of(model)
    return model if peft_model is None else peft_model.merge_and_unload()
