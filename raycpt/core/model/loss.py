"""Next-token loss of a causal LM without materialising its full logits.

The LM head's logits `[batch, seq, vocab]` dominate training memory for 128k-152k vocabularies (fp32, batch 8 x
4096 tokens: ~17-20 GB, plus as much again for their gradient). `ChunkedLinearCrossEntropy` fuses the head matmul
with the cross-entropy over chunks of rows and computes the gradients in the same pass (liger-kernel's "fused
linear cross entropy" in pure PyTorch), so at most one chunk of logits `[chunk_size, vocab]` exists at a time, in
forward and backward. `causal_lm_loss` picks between Hugging Face's own loss, this one and liger-kernel's Triton
kernel; `resolve_loss_impl` decides which one a run can use.

Distillation (`train.distill_weight`): `causal_lm_loss_and_logits` computes the same loss and, from the same forward,
the logits of the chosen rows only (the general replay rows); `distill_kl` is the per-token KL(p_base || p_model)
between those and the frozen base model's logits.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule

from raycpt.core.config import LOSS_IMPLS

IGNORE_INDEX = -100

# Config attributes that make a model's logits something other than `hidden @ W.T + b`, with their neutral value.
_LOGIT_TRANSFORMS = {
    "final_logit_softcapping": None,  # Gemma 2/3: tanh soft-capping of the logits
    "logit_scale": 1.0,  # Cohere: logits * logit_scale
    "logits_scaling": 1.0,  # Granite: logits / logits_scaling
    "lm_head_multiplier": 1.0,  # Falcon-H1: logits * lm_head_multiplier
}


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `hidden @ weight.T + bias` against `targets`, chunk by chunk.

    Forward also computes the gradients ((softmax - one_hot) / n_valid, pushed through the matmul) because
    that needs the chunk's logits, which are dropped right after; backward only scales the saved gradients by
    the incoming scalar. Use `chunked_linear_cross_entropy`, which also handles `torch.no_grad`.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, chunk_size: int = 1024, ignore_index: int = IGNORE_INDEX,
                compute_grad: tuple[bool, bool, bool] | None = None) -> torch.Tensor:
        need_h, need_w, need_b = compute_grad if compute_grad is not None else ctx.needs_input_grad[:3]
        need_b = need_b and bias is not None
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        # Under autocast the matmuls would run in bf16/fp16: the loss is meant to be exact to fp32 rounding.
        with torch.autocast(hidden.device.type, enabled=False):
            loss, grads = _chunked_forward(hidden, weight, bias, targets, chunk_size, ignore_index,
                                           need_h, need_w, need_b)
        # On ctx rather than save_for_backward: backward scales them in place and drops them (no second copy of
        # the [V, H] weight gradient), which also makes a second backward through a retained graph fail loudly.
        ctx.grads = grads
        ctx.has = (need_h, need_w, need_b)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.grads is None:
            raise RuntimeError("ChunkedLinearCrossEntropy supports one backward per forward (no retain_graph reuse)")
        saved, ctx.grads = iter(ctx.grads), None
        out: list[torch.Tensor | None] = []
        for has, dtype in zip(ctx.has, ctx.dtypes, strict=True):
            # grad_output is the scalar that scaled the loss (1, or 1/grad_accum): d(scale * loss) = scale * grad.
            out.append(next(saved).mul_(grad_output).to(dtype) if has else None)
        return (*out, None, None, None, None)


def _chunked_forward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                     chunk_size: int, ignore_index: int, need_h: bool, need_w: bool, need_b: bool
                     ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    n = hidden.shape[0]
    w = weight.float()  # a no-op for fp32 weights; bf16 ones are upcast once, not per chunk
    b = bias.float() if bias is not None else None
    targets = targets.reshape(-1).long()
    valid = targets != ignore_index
    # Kept as a tensor (no .item()): no host sync. Clamped so that all-ignored batches give 0, not 0/0.
    n_valid = valid.sum().clamp(min=1).to(torch.float32)
    inv_n = 1.0 / n_valid
    loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_h = torch.empty_like(hidden) if need_h else None  # in hidden's dtype: [N, H] fp32 would be large too
    grad_w = torch.zeros_like(w, dtype=torch.float32) if need_w else None  # accumulated over chunks: fp32
    grad_b = torch.zeros_like(b, dtype=torch.float32) if need_b else None
    any_grad = need_h or need_w or need_b
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        h_c = hidden[start:end].float()
        t_c, valid_c = targets[start:end], valid[start:end]
        safe_t = torch.where(valid_c, t_c, torch.zeros_like(t_c)).unsqueeze(1)  # -100 is not a valid index
        logits = torch.addmm(b, h_c, w.t()) if b is not None else h_c @ w.t()  # the only [chunk, V] buffer
        # Everything below works in place on `logits`: log-softmax, then softmax, then the gradient.
        logits.sub_(logits.amax(dim=1, keepdim=True))
        target_logit = logits.gather(1, safe_t).squeeze(1)
        logits.exp_()
        sum_exp = logits.sum(dim=1)
        row_loss = sum_exp.log() - target_logit  # logsumexp(z) - z_target, with z shifted by its row max
        loss_sum += torch.where(valid_c, row_loss, torch.zeros_like(row_loss)).sum()
        if not any_grad:
            continue
        logits.div_(sum_exp.unsqueeze(1))  # softmax
        logits.scatter_add_(1, safe_t, torch.full_like(target_logit, -1.0).unsqueeze(1))  # - one_hot
        logits.mul_((valid_c.to(torch.float32) * inv_n).unsqueeze(1))  # ignored rows -> 0; mean over valid
        if grad_h is not None:
            grad_h[start:end] = logits @ w
        if grad_w is not None:
            grad_w.addmm_(logits.t(), h_c)
        if grad_b is not None:
            grad_b += logits.sum(dim=0)
    grads = [g for g in (grad_h, grad_w, grad_b) if g is not None]
    return loss_sum * inv_n, grads


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                 bias: torch.Tensor | None = None, chunk_size: int = 1024,
                                 ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """`F.cross_entropy(hidden @ weight.T + bias, targets, ignore_index=ignore_index)` (mean over the targets that
    are not `ignore_index`; 0 when there are none) without the `[N, V]` logits. hidden: [N, H]; weight: [V, H];
    bias: [V] or None; targets: [N] int64. Peak extra memory: one `[chunk_size, V]` fp32 buffer plus the
    gradients of the inputs that require grad. Not twice differentiable."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"expected hidden [N, H] and weight [V, H], got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if targets.numel() != hidden.shape[0]:
        raise ValueError(f"expected {hidden.shape[0]} targets, got {targets.numel()}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    # Decided here, not from ctx.needs_input_grad: inside forward that ignores an enclosing torch.no_grad().
    grad_on = torch.is_grad_enabled()
    compute_grad = (grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
                    grad_on and bias is not None and bias.requires_grad)
    return ChunkedLinearCrossEntropy.apply(hidden, weight, bias, targets, chunk_size, ignore_index, compute_grad)


# --- causal LMs -------------------------------------------------------------------------------------------------

def _unwrap(model: nn.Module) -> nn.Module:
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def _decoder_of(model: nn.Module) -> nn.Module | None:
    """The body whose `last_hidden_state` feeds the LM head: what the causal LM's own forward calls."""
    body = getattr(model, getattr(model, "base_model_prefix", "") or "", None)
    if isinstance(body, nn.Module) and body is not model:
        return body
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        with contextlib.suppress(Exception):
            body = get_decoder()
            if isinstance(body, nn.Module) and body is not model:
                return body
    return None


def chunked_supported(model: nn.Module) -> str | None:
    """Why the fused losses ("chunked", "liger") cannot compute this model's loss, or None when they can: its
    logits must be exactly `final_hidden @ head.weight.T (+ head.bias)`."""
    inner = _unwrap(model)
    config = getattr(inner, "config", None)
    for attr, neutral in _LOGIT_TRANSFORMS.items():
        value = getattr(config, attr, None)
        if value is not None and value != neutral:
            return f"the model transforms its logits (config.{attr}={value})"
    get_head = getattr(inner, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    # Exact type: subclasses (bitsandbytes, PEFT-style wrappers) change what forward computes from .weight.
    if type(head) is not nn.Linear:
        return f"the output embedding is {type(head).__name__}, not a plain nn.Linear"
    if not head.weight.is_floating_point():
        return f"the output embedding's weight is {head.weight.dtype}"
    if _decoder_of(inner) is None:
        return f"no decoder body found on {type(inner).__name__} (base_model_prefix / get_decoder())"
    return None


@contextlib.contextmanager
def _head_returns_input(head: nn.Module, captured: list[torch.Tensor]) -> Iterator[None]:
    """Within the block, calling `head` records its input and returns it instead of computing logits."""
    def capture(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        captured.append(x)
        return x

    previous = head.__dict__.get("forward")  # accelerate's hooks, for one, set an instance-level forward
    head.forward = capture
    try:
        yield
    finally:
        if previous is None:
            del head.forward
        else:
            head.forward = previous


def _final_hidden(model: nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, nn.Linear]:
    """[B, T, H] hidden states the LM head would see, and the head."""
    inner = _unwrap(model)
    head = inner.get_output_embeddings()
    if inner is model and not isinstance(model, FSDPModule):
        out = _decoder_of(model)(input_ids=input_ids, use_cache=False)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return hidden, head
    # DDP: gradients are only all-reduced when its own forward ran (it arms the reducer), so go through the
    # wrapper and have the head hand back its input instead of the logits. Needs find_unused_parameters=False
    # for an untied head: with True, DDP would mark the head's weight unused during forward. FSDP2: the root's
    # forward hook gathers the embeddings and the head (kept gathered until backward), so the same.
    captured: list[torch.Tensor] = []
    with _head_returns_input(head, captured):
        model(input_ids=input_ids, use_cache=False)
    if len(captured) != 1:
        raise RuntimeError(f"expected the LM head to be called once in forward, it was called {len(captured)} times")
    return captured[0], head


@functools.lru_cache(maxsize=1)
def _liger_import() -> tuple[Any, str]:
    """(liger's fused loss class or None, why it is unavailable): "not installed" when the package is absent; a
    broken install (its Triton/CUDA stack fails to import) names the error, so a fallback never hides it."""
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ModuleNotFoundError as err:
        if err.name == "liger_kernel":  # the package itself is absent
            return None, "liger-kernel is not installed (pip install raycpt[gpu])"
        return None, f"liger-kernel is installed but fails to import ({type(err).__name__}: {err})"
    except Exception as err:
        return None, f"liger-kernel is installed but fails to import ({type(err).__name__}: {err})"
    return LigerFusedLinearCrossEntropyLoss, ""


def _liger_loss_class() -> Any:
    return _liger_import()[0]


def liger_available() -> bool:
    """Whether liger-kernel's fused linear cross-entropy can be imported."""
    return _liger_loss_class() is not None


def liger_unavailable_reason() -> str:
    """Why liger's fused loss cannot be used here ("" when it can)."""
    return _liger_import()[1]


def causal_lm_loss(model: nn.Module, input_ids: torch.Tensor, impl: str = "hf", chunk_size: int = 1024
                   ) -> torch.Tensor:
    """Mean next-token loss of a causal LM on `input_ids` [B, T], labels = input_ids: the value of
    `model(input_ids=input_ids, labels=input_ids).loss`. impl: "hf" (that call), "chunked"
    (`chunked_linear_cross_entropy` on the decoder body's output) or "liger" (liger-kernel, CUDA). "auto" is
    not accepted here: resolve it first with `resolve_loss_impl`. `model` may be wrapped in DDP."""
    if impl == "hf":
        return model(input_ids=input_ids, labels=input_ids).loss
    _check_fused(model, impl)
    hidden, head = _final_hidden(model, input_ids)
    return _fused_loss(hidden, head, input_ids, impl, chunk_size)


def select_rows(x: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
    """`x[rows]` for row indices given on the host (non-empty), by slicing: no index tensor to copy to the device,
    so no host-device sync; a run of consecutive rows is a view."""
    first = rows[0]
    if list(rows) == list(range(first, first + len(rows))):
        return x[first:first + len(rows)]
    return torch.cat([x[i:i + 1] for i in rows])


def causal_lm_loss_and_logits(model: nn.Module, input_ids: torch.Tensor, rows: Sequence[int], impl: str = "hf",
                              chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(`causal_lm_loss(model, input_ids, impl)`, the model's logits [len(rows), T, V] of the rows `rows` (indices
    into the batch, non-empty) of `input_ids`), from one forward over the whole batch. "hf": the model's own call,
    whose logits it returns anyway; "chunked" / "liger": the same fused loss over every row, and the head applied to
    the final hidden states of `rows` alone, so only those rows' logits are materialised. What the distillation
    term (`distill_kl`) needs: the student's distributions on the general replay rows."""
    if impl == "hf":
        out = model(input_ids=input_ids, labels=input_ids)
        return out.loss, select_rows(out.logits, rows)
    _check_fused(model, impl)
    hidden, head = _final_hidden(model, input_ids)
    return (_fused_loss(hidden, head, input_ids, impl, chunk_size),
            nn.functional.linear(select_rows(hidden, rows), head.weight, head.bias))


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None
               ) -> torch.Tensor:
    """Mean over positions of KL(p_teacher || p_student) = sum_v p_t(v) (log p_t(v) - log p_s(v)), full softmax at
    temperature 1, in float32 whatever the logits' dtype. logits: [..., V], the same shape; mask: bool of the
    logits' shape without V (True = the position counts; None = all). 0 when no position counts. No shift here:
    the caller passes the positions it means (the loop: positions 0..T-2 of each general row, each one's
    distribution over the token that follows it, the positions the CE scores). Differentiable in the student's
    logits; the teacher's are taken as constants (detached)."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student and teacher logits differ in shape: {tuple(student_logits.shape)} vs "
                         f"{tuple(teacher_logits.shape)}")
    log_s = torch.log_softmax(student_logits.float(), dim=-1)
    log_t = torch.log_softmax(teacher_logits.detach().float(), dim=-1)
    p_t = log_t.exp()
    # p_t = 0 contributes 0 (and not 0 x -inf = nan where a logit is -inf)
    kl = torch.where(p_t > 0, p_t * (log_t - log_s), torch.zeros((), device=p_t.device)).sum(dim=-1)
    if mask is None:
        return kl.mean()
    if mask.shape != kl.shape:
        raise ValueError(f"mask must have shape {tuple(kl.shape)}, got {tuple(mask.shape)}")
    weights = mask.to(kl.dtype)
    return (kl * weights).sum() / weights.sum().clamp(min=1)


def _check_fused(model: nn.Module, impl: str) -> None:
    if impl not in ("chunked", "liger"):
        raise ValueError(f"loss impl must be one of hf, chunked, liger (resolve 'auto' with resolve_loss_impl), "
                         f"got {impl!r}")
    reason = chunked_supported(model)
    if reason is not None:
        raise ValueError(f"loss impl {impl!r} cannot compute this model's loss: {reason}; use impl='hf'")


def _fused_loss(hidden: torch.Tensor, head: nn.Linear, input_ids: torch.Tensor, impl: str, chunk_size: int
                ) -> torch.Tensor:
    """The chunked or liger loss of the final hidden states [B, T, H] against input_ids shifted by one."""
    # Position t predicts token t + 1.
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    targets = input_ids[:, 1:].reshape(-1)
    if impl == "chunked":
        return chunked_linear_cross_entropy(hidden, head.weight, targets, bias=head.bias, chunk_size=chunk_size)
    loss_cls = _liger_loss_class()
    if loss_cls is None:
        raise ValueError(f"loss impl 'liger' cannot run: {liger_unavailable_reason()}")
    if hidden.dtype != head.weight.dtype and not torch.is_autocast_enabled():
        hidden = hidden.to(head.weight.dtype)  # its kernel needs one dtype; autocast casts both itself
    # forward(lin_weight, _input, target, bias=None); some releases can also return a z-loss as a tuple.
    loss = loss_cls(ignore_index=IGNORE_INDEX, reduction="mean")(head.weight, hidden.contiguous(), targets,
                                                                 head.bias)
    return loss[0] if isinstance(loss, tuple) else loss


def compile_for_loss(model: nn.Module, impl: str) -> nn.Module:
    """`model` with torch.compile applied to what `causal_lm_loss(model, ..., impl)` runs. "hf": the whole model
    (`torch.compile(model)`, the loss inside the graph). The fused losses call the decoder body themselves (or,
    wrapped in DDP / FSDP2, capture the head's input), so a compiled wrapper around the whole model would never
    run: the body is compiled in place instead, and the head + fused loss (liger's Triton kernel, the chunked
    autograd Function) stay outside the graph."""
    if impl == "hf":
        return torch.compile(model)
    decoder = _decoder_of(_unwrap(model))
    if decoder is None:
        raise ValueError(f"loss impl {impl!r}: no decoder body to compile on {type(_unwrap(model)).__name__}")
    decoder.compile()
    return model


def resolve_loss_impl(requested: str, device: torch.device | str, model: nn.Module | None = None
                      ) -> tuple[str, str]:
    """(impl to use, why) for a requested loss impl in LOSS_IMPLS on `device`; `model`, when given, is checked
    with `chunked_supported` (None: assumed supported). "auto" on CUDA: liger, else chunked, else hf; on other
    devices hf (small models, where the full logits are cheap and HF's path is fastest). A requested impl that
    cannot run falls back the same way, and the reason says why."""
    if requested not in LOSS_IMPLS:
        raise ValueError(f"loss impl must be one of {', '.join(LOSS_IMPLS)}, got {requested!r}")
    device = torch.device(device)
    unsupported = chunked_supported(model) if model is not None else None
    if requested == "hf":
        return "hf", "requested"
    if requested == "chunked" or (requested == "auto" and device.type == "cuda" and not liger_available()):
        if unsupported is not None:
            return "hf", f"the chunked loss cannot compute this model's loss: {unsupported}; using hf"
        if requested == "chunked":
            return "chunked", "requested"
        return "chunked", f"auto on cuda: {liger_unavailable_reason()}; using chunked"
    if requested == "auto":
        if device.type != "cuda":
            return "hf", f"auto on {device.type}: using hf (the fused losses pay off on GPU with large vocabularies)"
        if unsupported is not None:
            return "hf", f"auto on cuda: the fused losses cannot compute this model's loss: {unsupported}; using hf"
        return "liger", "auto on cuda: liger-kernel is installed"
    # requested == "liger"
    if device.type != "cuda":
        why = f"liger-kernel needs a CUDA device, got {device.type}"
    elif not liger_available():
        why = liger_unavailable_reason()
    elif unsupported is not None:
        return "hf", f"liger-kernel cannot compute this model's loss: {unsupported}; using hf"
    else:
        return "liger", "requested"
    if unsupported is not None:
        return "hf", f"{why}, and the chunked loss cannot compute this model's loss ({unsupported}); using hf"
    return "chunked", f"{why}; using chunked"
