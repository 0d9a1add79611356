"""raycpt's fused losses against Hugging Face's on a CUDA device: loss and gradients of `chunked` and `liger` vs
`hf`, fp32 and bf16 autocast, on a small GPT-2 (tied head) and a Llama with Llama-3's 128,256-token vocabulary
(tied and untied). Prints one line per case with the loss difference and the largest gradient difference
relative to the largest gradient. Run by benchmarks/gpu_check.sh; needs no Ray and no datasets.

    python benchmarks/gpu_loss_check.py
"""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from raycpt.core.model.loss import causal_lm_loss, liger_available


def models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    llama = dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=512, vocab_size=128256)
    return {"gpt2-tied": GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=128, n_head=4, vocab_size=50304)),
            "llama-128k-tied": LlamaForCausalLM(LlamaConfig(tie_word_embeddings=True, **llama)),
            "llama-128k-untied": LlamaForCausalLM(LlamaConfig(tie_word_embeddings=False, **llama))}


def loss_and_grads(model: torch.nn.Module, ids: torch.Tensor, impl: str, bf16: bool
                   ) -> tuple[float, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        loss = causal_lm_loss(model, ids, impl=impl)
    loss.backward()
    return loss.item(), [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]


def main() -> None:
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}; liger-kernel installed: {liger_available()}")
    impls = ["chunked", *(["liger"] if liger_available() else [])]
    for name, model in models().items():
        model = model.cuda().eval()  # eval: no dropout, so every impl sees the same forward
        ids = torch.randint(0, model.config.vocab_size, (4, 256), device="cuda",
                            generator=torch.Generator("cuda").manual_seed(1))
        for bf16 in (False, True):
            ref_loss, ref_grads = loss_and_grads(model, ids, "hf", bf16)
            scale = max(g.abs().max().item() for g in ref_grads)
            for impl in impls:
                try:
                    loss, grads = loss_and_grads(model, ids, impl, bf16)
                except Exception as error:  # noqa: BLE001 - report and go on to the next case
                    print(f"{name:18s} {'bf16' if bf16 else 'fp32'} {impl:8s} FAILED: {type(error).__name__}: "
                          f"{str(error)[:200]}")
                    continue
                worst = max((g - r).abs().max().item() for g, r in zip(grads, ref_grads, strict=True)) / scale
                print(f"{name:18s} {'bf16' if bf16 else 'fp32'} {impl:8s} loss {loss:.6f} vs hf {ref_loss:.6f} "
                      f"(|diff| {abs(loss - ref_loss):.2e}); max grad diff / max grad {worst:.2e}")


if __name__ == "__main__":
    main()
