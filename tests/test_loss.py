"""raycpt.core.model.loss: the chunked fused linear cross-entropy matches Hugging Face's loss and gradients exactly (to
fp32 rounding), never materialises the full logits, and `resolve_loss_impl` falls back with a reason."""

from __future__ import annotations

import copy
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from raycpt.core.model.loss import (
    LOSS_IMPLS,
    ChunkedLinearCrossEntropy,
    causal_lm_loss,
    chunked_linear_cross_entropy,
    chunked_supported,
    compile_for_loss,
    resolve_loss_impl,
)

torch.set_num_threads(min(2, torch.get_num_threads()))

VOCAB, BATCH, SEQ = 1000, 2, 17  # 2 x 16 = 32 predicted tokens
CHUNK = 7  # several chunks, the last one partial (32 = 4 * 7 + 4)


def gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).float()


def llama(tied: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(config).float()


MODELS = {"gpt2-tied": gpt2, "llama-tied": lambda: llama(True), "llama-untied": lambda: llama(False)}


def input_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))


def loss_and_grads(model: torch.nn.Module, impl: str, chunk_size: int = CHUNK
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = causal_lm_loss(model, input_ids(), impl=impl, chunk_size=chunk_size)
    loss.backward()
    inner = getattr(model, "module", model)
    return loss.detach(), {name: p.grad.clone() for name, p in inner.named_parameters()}


def assert_grads_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name, ref in want.items():
        # Relative to the parameter's gradient scale: a wrong gradient (e.g. a missing 1/n or one-hot term) is off
        # by far more; fp32 summation order differs by ~1e-7 relative.
        torch.testing.assert_close(got[name], ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item() + 1e-9,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_chunked_matches_hf_loss_and_grads(name: str, train: bool) -> None:
    model = MODELS[name]()
    model.train(train)
    assert chunked_supported(model) is None
    ref_loss, ref_grads = loss_and_grads(model, "hf")
    loss, grads = loss_and_grads(model, "chunked")
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(grads, ref_grads)
    # Direct check that the same call is HF's own loss, with one chunk holding every token.
    one_chunk, _ = loss_and_grads(model, "chunked", chunk_size=4096)
    torch.testing.assert_close(one_chunk, model(input_ids=input_ids(), labels=input_ids()).loss.detach(),
                               rtol=1e-5, atol=1e-6)


def test_wrong_gradient_would_fail() -> None:
    # The tolerance is meaningful: one gradient 0.1% off is caught.
    model = gpt2()
    _, ref = loss_and_grads(model, "hf")
    bad = dict(ref)
    bad["transformer.wte.weight"] = ref["transformer.wte.weight"] * 0.999
    with pytest.raises(AssertionError):
        assert_grads_close(bad, ref)


def test_chunked_through_ddp_runs_ddp_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    # Under DDP the loss must go through the wrapper's forward, which arms the gradient all-reduce.
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group already in this process")
    model = llama(False)
    ref_loss, ref_grads = loss_and_grads(copy.deepcopy(model), "hf")
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'store')}", rank=0, world_size=1)
        try:
            ddp = torch.nn.parallel.DistributedDataParallel(model)
            calls = []
            forward = torch.nn.parallel.DistributedDataParallel.forward
            monkeypatch.setattr(torch.nn.parallel.DistributedDataParallel, "forward",
                                lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
            loss, grads = loss_and_grads(ddp, "chunked")
            loss2, _ = loss_and_grads(ddp, "chunked")  # a second step: the reducer finished the first one
        finally:
            dist.destroy_process_group()
    assert len(calls) == 2
    assert "forward" not in model.lm_head.__dict__  # the head's forward is restored
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss2, ref_loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(grads, ref_grads)


# --- the raw function -------------------------------------------------------------------------------------------

def test_compiled_run_goes_through_the_graph_and_matches_eager() -> None:
    """train.compile with a fused loss: the decoder layers must run inside torch.compile's graph (a compiled
    wrapper around the whole model would be bypassed, since the fused loss calls the body itself), and the loss
    and gradients equal the eager ones."""
    want_loss, want_grads = loss_and_grads(llama(tied=False), "chunked")
    model = llama(tied=False)
    traced: list[bool] = []
    model.model.layers[0].register_forward_pre_hook(lambda m, a: traced.append(torch.compiler.is_compiling()))
    compiled = compile_for_loss(model, "chunked")
    got_loss, got_grads = loss_and_grads(compiled, "chunked")
    assert traced and all(traced), "the decoder layers ran eagerly: the compiled graph was bypassed"
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(got_grads, want_grads)


def raw_inputs(n: int = 37, h: int = 16, v: int = 101, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    weight = (torch.randn(v, h, generator=g) * 0.3).requires_grad_()
    bias = (torch.randn(v, generator=g) * 0.1).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::5] = -100
    return hidden, weight, bias, targets


def grads_of(loss: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, tensors))


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("chunk_size", [1, 8, 37, 1000])
def test_function_matches_cross_entropy(with_bias: bool, chunk_size: int) -> None:
    hidden, weight, bias, targets = raw_inputs()
    bias = bias if with_bias else None
    logits = hidden @ weight.T + (bias if bias is not None else 0)
    ref = F.cross_entropy(logits, targets, ignore_index=-100)
    got = chunked_linear_cross_entropy(hidden, weight, targets, bias=bias, chunk_size=chunk_size)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    inputs = (hidden, weight, bias) if bias is not None else (hidden, weight)
    for g, r in zip(grads_of(got, *inputs), grads_of(ref, *inputs), strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)


def test_function_scales_by_grad_output_and_casts_dtype() -> None:
    hidden, weight, bias, targets = raw_inputs()
    ref = F.cross_entropy(hidden @ weight.T + bias, targets) * 0.25
    got = chunked_linear_cross_entropy(hidden, weight, targets, bias=bias, chunk_size=8) * 0.25
    for g, r in zip(grads_of(got, hidden, weight, bias), grads_of(ref, hidden, weight, bias), strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)
    # bf16 inputs: fp32 math inside, gradients come back in the inputs' dtypes.
    h16, w16 = hidden.detach().bfloat16().requires_grad_(), weight.detach().bfloat16().requires_grad_()
    loss = chunked_linear_cross_entropy(h16, w16, targets, chunk_size=8)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, F.cross_entropy(h16.float() @ w16.float().T, targets), rtol=1e-6, atol=1e-6)
    gh, gw = grads_of(loss, h16, w16)
    assert gh.dtype == gw.dtype == torch.bfloat16


def test_function_frozen_inputs_and_no_grad() -> None:
    hidden, weight, _, targets = raw_inputs()
    frozen = weight.detach()
    loss = chunked_linear_cross_entropy(hidden, frozen, targets, chunk_size=8)
    (gh,) = grads_of(loss, hidden)
    torch.testing.assert_close(gh, grads_of(F.cross_entropy(hidden @ frozen.T, targets), hidden)[0],
                               rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        loss = chunked_linear_cross_entropy(hidden, weight, targets, chunk_size=8)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, F.cross_entropy(hidden @ weight.T, targets), rtol=1e-6, atol=1e-6)


def test_function_all_targets_ignored() -> None:
    hidden, weight, bias, _ = raw_inputs()
    targets = torch.full((hidden.shape[0],), -100)
    loss = chunked_linear_cross_entropy(hidden, weight, targets, bias=bias, chunk_size=8)
    assert loss.item() == 0.0
    for g in grads_of(loss, hidden, weight, bias):
        assert torch.isfinite(g).all() and (g == 0).all()


def test_function_under_autocast_stays_fp32() -> None:
    hidden, weight, _, targets = raw_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = chunked_linear_cross_entropy(hidden, weight, targets, chunk_size=8)
    torch.testing.assert_close(loss, F.cross_entropy(hidden @ weight.T, targets), rtol=1e-6, atol=1e-6)


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op returns (every allocation goes through an op)."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0
        self.op = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() > self.numel:
                self.numel, self.op = t.numel(), func
        return out


def test_full_logits_never_materialised() -> None:
    n, h, v, chunk = 2048, 64, 50_000, 256
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    weight = (torch.randn(v, h, generator=g) * 0.05).requires_grad_()
    bias = torch.zeros(v, requires_grad=True)
    targets = torch.randint(0, v, (n,), generator=g)
    with LargestTensor() as mode:
        loss = chunked_linear_cross_entropy(hidden, weight, targets, bias=bias, chunk_size=chunk)
        loss.backward()
    assert torch.isfinite(loss)
    assert hidden.grad is not None and weight.grad is not None and bias.grad is not None
    assert mode.numel >= chunk * v  # the mode saw the chunk's logits: it does observe the allocations
    assert mode.numel <= chunk * v, f"{mode.op} returned {mode.numel} elements (> one chunk of logits)"
    assert mode.numel * 8 <= n * v


# --- resolve_loss_impl / chunked_supported ----------------------------------------------------------------------

def test_resolve_on_cpu() -> None:
    cpu = torch.device("cpu")
    model = gpt2()
    assert resolve_loss_impl("auto", cpu, model)[0] == "hf"
    assert resolve_loss_impl("hf", cpu, model) == ("hf", "requested")
    assert resolve_loss_impl("chunked", cpu, model) == ("chunked", "requested")
    impl, reason = resolve_loss_impl("liger", cpu, model)
    assert impl == "chunked" and "CUDA" in reason
    with pytest.raises(ValueError, match="auto, hf, chunked, liger"):
        resolve_loss_impl("fused", cpu)
    assert LOSS_IMPLS == ("auto", "hf", "chunked", "liger")


def test_resolve_on_cuda_without_liger(monkeypatch: pytest.MonkeyPatch) -> None:
    # Only the decision is tested (no GPU needed): liger-kernel is reported missing.
    monkeypatch.setattr("raycpt.core.model.loss.liger_available", lambda: False)
    cuda = torch.device("cuda")
    assert resolve_loss_impl("auto", cuda, gpt2())[0] == "chunked"
    impl, reason = resolve_loss_impl("liger", cuda, gpt2())
    assert impl == "chunked" and "not installed" in reason
    monkeypatch.setattr("raycpt.core.model.loss.liger_available", lambda: True)
    assert resolve_loss_impl("auto", cuda, gpt2())[0] == "liger"


def test_softcapped_model_falls_back_to_hf() -> None:
    model = llama(False)
    model.config.final_logit_softcapping = 30.0
    reason = chunked_supported(model)
    assert reason is not None and "final_logit_softcapping" in reason
    impl, why = resolve_loss_impl("chunked", torch.device("cpu"), model)
    assert impl == "hf" and "final_logit_softcapping" in why
    assert resolve_loss_impl("auto", torch.device("cuda"), model)[0] == "hf"
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        causal_lm_loss(model, input_ids(), impl="chunked")


def test_non_linear_head_unsupported() -> None:
    model = gpt2()
    model.set_output_embeddings(torch.nn.Sequential(torch.nn.Linear(32, VOCAB, bias=False)))
    assert "Sequential" in chunked_supported(model)
    assert resolve_loss_impl("chunked", "cpu", model)[0] == "hf"


def test_chunked_function_class_is_exported() -> None:
    hidden, weight, bias, targets = raw_inputs()
    loss = ChunkedLinearCrossEntropy.apply(hidden, weight, bias, targets, 8)
    torch.testing.assert_close(loss, F.cross_entropy(hidden @ weight.T + bias, targets), rtol=1e-6, atol=1e-6)


def test_a_broken_liger_install_is_named_not_hidden(monkeypatch: pytest.MonkeyPatch) -> None:
    """liger-kernel present but its Triton stack fails to import: the fallback says so instead of 'not
    installed' (a silent downgrade under the default train.loss_impl=auto)."""
    import sys
    import types

    from raycpt.core.model import loss

    package = types.ModuleType("liger_kernel")
    package.__path__ = []
    # installed, but its transformers module lost what it exports (as when its Triton kernels fail to build)
    monkeypatch.setitem(sys.modules, "liger_kernel", package)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", types.ModuleType("liger_kernel.transformers"))
    loss._liger_import.cache_clear()
    try:
        impl, reason = resolve_loss_impl("auto", torch.device("cuda"), gpt2())
        assert impl == "chunked" and "fails to import" in reason
        assert "fails to import" in resolve_loss_impl("liger", torch.device("cuda"), gpt2())[1]
    finally:
        loss._liger_import.cache_clear()
