import math

import numpy as np
import pytest
import torch

from raycpt.core.config import config_from_dict
from raycpt.core.eval.evaluate import heldout_loss, perplexity
from raycpt.core.model.loading import apply_dropout, load_model
from raycpt.core.prepare import measure_base, prepare_experiment
from raycpt.core.train.loop import build_optimizer, build_scheduler, train, train_step


def test_lr_schedule_rewarms_then_cosine_decays_to_the_floor():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=1e-3)
    sched = build_scheduler(opt, warmup_steps=4, steps=20, min_lr_ratio=0.1)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == 0.0
    assert lrs[1:5] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])  # linear re-warm
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:], strict=False))  # monotone re-decay
    assert lrs[12] == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 8 / 16)))  # cosine midpoint
    assert lrs[20] == pytest.approx(1e-4)  # floor = lr * min_lr_ratio


@pytest.mark.parametrize("model_fixture", ["tiny_gpt2_dir", "tiny_llama_dir"])
def test_dropout_is_really_applied(model_fixture, request):
    model = load_model(request.getfixturevalue(model_fixture))
    ids = torch.randint(0, 1000, (2, 16))

    def two_forwards():
        return model(input_ids=ids).logits, model(input_ids=ids).logits

    apply_dropout(model, 0.0)
    a, b = two_forwards()
    assert torch.equal(a, b)
    assert apply_dropout(model, 0.3) > 0
    model.train()
    a, b = two_forwards()
    assert not torch.allclose(a, b)
    model.eval()
    a, b = two_forwards()
    assert torch.equal(a, b)  # no dropout at eval time


def test_perplexity_matches_a_hand_computed_value(tiny_gpt2_dir):
    model = load_model(tiny_gpt2_dir)
    blocks = np.random.default_rng(0).integers(0, 50000, size=(3, 12)).astype(np.int32)
    with torch.no_grad():
        logits = model(input_ids=torch.as_tensor(blocks, dtype=torch.long)).logits
    logp = torch.log_softmax(logits.double(), -1)
    nll = [-logp[b, t, blocks[b, t + 1]].item() for b in range(3) for t in range(11)]
    expected = sum(nll) / len(nll)
    loss = heldout_loss(model, blocks, batch_size=2)
    assert loss == pytest.approx(expected, rel=1e-5)
    assert perplexity(loss) == pytest.approx(math.exp(expected), rel=1e-5)
    assert model.training  # train mode restored


def test_train_step_is_the_loops_step_written_out(tiny_gpt2_dir):
    """Two micro-batches: the forward and backward of each at half weight, clip, AdamW, the schedule, zero_grad.
    The same losses, weights and learning rate, bit for bit; the loss comes back detached, on the device, and is
    added to a running sum in place when one is given."""
    ids = torch.randint(0, 1000, (4, 16), generator=torch.Generator().manual_seed(0))
    micro_batches = [ids[:2], ids[2:]]

    def setup():
        model = load_model(tiny_gpt2_dir)
        apply_dropout(model, 0.0)
        model.config.use_cache = False
        model.train()
        optimizer = build_optimizer(model, 1e-3, 0.01, torch.device("cpu"))
        return model, optimizer, build_scheduler(optimizer, 1, 4, 0.1)

    model, optimizer, scheduler = setup()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    window = torch.zeros(())
    losses = [train_step(model, micro_batches, optimizer, scheduler, scaler, grad_clip=1.0) for _ in range(2)]
    assert train_step(model, micro_batches, optimizer, scheduler, scaler, grad_clip=1.0, loss_sum=window) is window

    by_hand, optimizer_by_hand, scheduler_by_hand = setup()
    losses_by_hand = []
    for _ in range(3):
        total = torch.zeros(())
        for batch in micro_batches:
            loss = by_hand(input_ids=batch, labels=batch).loss / len(micro_batches)
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(by_hand.parameters(), 1.0)
        optimizer_by_hand.step()
        scheduler_by_hand.step()
        optimizer_by_hand.zero_grad(set_to_none=True)
        losses_by_hand.append(total)

    assert all(not loss.requires_grad and loss.shape == () for loss in losses)
    assert [float(x) for x in [*losses, window]] == [float(x) for x in losses_by_hand]
    for (name, param), param_by_hand in zip(model.named_parameters(), by_hand.parameters(), strict=True):
        assert torch.equal(param, param_by_hand), name
        assert param.grad is None  # zero_grad(set_to_none=True)
    assert scheduler.get_last_lr() == scheduler_by_hand.get_last_lr()


def _cfg(corpora, tiny_gpt2_dir, tmp_path, **train):
    return config_from_dict({
        "name": "t", "storage_path": str(tmp_path),
        "model": {"source": tiny_gpt2_dir},
        "data": {"domain": corpora["domain"], "general": corpora["general"], "block_size": 32,
                 "heldout_fraction": 0.1, "heldout_blocks": 8},
        "train": {"lr": 3e-3, "steps": 12, "batch_size": 4, "eval_every": 4, "warmup_steps": 1, "mix_ratio": 0.75,
                  **train},
    })


def test_flops_per_token_matches_nanogpt_for_gpt2_124m_and_skips_untied_embeddings():
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from raycpt.core.train.loop import flops_per_token

    with torch.device("meta"):  # shapes only, no memory
        gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024))
        llama = LlamaForCausalLM(LlamaConfig(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32,
                                             num_key_value_heads=4, intermediate_size=5632, vocab_size=32000,
                                             tie_word_embeddings=False))
    # nanoGPT's estimate_mfu: N = 124,439,808 params minus wpe (786,432), tied wte counted once as the head
    assert flops_per_token(gpt2, 1024) == 6 * 123_653_376 + 12 * 12 * 768 * 1024
    # Llama: the input embedding is a lookup (left out), the untied lm_head is a matmul (counted)
    total = sum(p.numel() for p in llama.parameters())
    assert flops_per_token(llama, 2048) == 6 * (total - 32000 * 2048) + 12 * 22 * 2048 * 2048


def test_core_loop_without_ray_lowers_domain_ppl_and_reports_contract(corpora, tiny_gpt2_dir, tmp_path):
    cfg = _cfg(corpora, tiny_gpt2_dir, tmp_path, peak_tflops=0.5)
    manifest = prepare_experiment(cfg)
    base = measure_base(cfg, manifest, tmp_path)
    reports = []
    train(cfg, manifest, lambda m, c: reports.append((m, c)), checkpoint_root=tmp_path / "ckpt")
    assert [m["step"] for m, _ in reports] == [4, 8, 12]
    last = reports[-1][0]
    for key in ("train/loss", "eval/domain_loss", "eval/domain_ppl", "eval/general_ppl", "data/domain_fraction",
                "perf/tokens_per_s", "step", "tokens"):
        assert key in last and last[key] is not None
    assert last["tokens"] == 12 * 4 * 32
    assert last["eval/domain_ppl"] < 0.5 * base["base/domain_ppl"]
    assert abs(last["data/domain_fraction"] - 0.75) <= 0.02
    assert last["finished"] is True
    assert all((c and (tmp_path / "ckpt").exists()) for _, c in reports)
    # MFU against the configured peak: achieved FLOP/s over 0.5 TFLOP/s, with the FLOPs per token counted here by
    # hand from the tiny GPT-2's shapes (6 x matmul params incl. the tied head, + 12 x layers x hidden x seq)
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(tiny_gpt2_dir)
    h, layers, vocab = c.n_embd, c.n_layer, c.vocab_size
    per_layer = (h * 3 * h + 3 * h) + (h * h + h) + (h * 4 * h + 4 * h) + (4 * h * h + h) + 4 * h  # attn, mlp, 2 norms
    matmul_params = layers * per_layer + 2 * h + vocab * h  # + final norm + tied head (wte); wpe is a lookup
    by_hand = 6 * matmul_params + 12 * layers * h * 32
    assert last["perf/mfu"] == pytest.approx(last["perf/tokens_per_s"] * by_hand / 0.5e12, rel=1e-9)


def test_resume_from_checkpoint_matches_uninterrupted_run(corpora, tiny_gpt2_dir, tmp_path):
    cfg = _cfg(corpora, tiny_gpt2_dir, tmp_path, steps=8)
    manifest = prepare_experiment(cfg)
    full = []
    train(cfg, manifest, lambda m, c: full.append((m, c)), checkpoint_root=tmp_path / "a")
    resumed = []
    train(cfg, manifest, lambda m, c: resumed.append(m), checkpoint_root=tmp_path / "b", resume_dir=full[0][1])
    assert [m["step"] for m in resumed] == [8]  # model, optimizer, scheduler and data position restored
    torch.testing.assert_close(resumed[-1]["eval/domain_loss"], full[-1][0]["eval/domain_loss"], rtol=1e-4, atol=0)
    assert resumed[-1]["lr"] == pytest.approx(full[-1][0]["lr"])


def test_realised_domain_share_is_what_the_loop_drew_within_half_a_block_per_step(corpora, tiny_gpt2_dir,
                                                                                   tmp_path):
    """data/domain_fraction counts the blocks the loop actually consumed; the stratified plan keeps it within half
    a block of mix_ratio after every step, whatever the ratio."""
    cfg = _cfg(corpora, tiny_gpt2_dir, tmp_path, steps=6, eval_every=1, batch_size=3, mix_ratio=0.37)
    reports = []
    train(cfg, prepare_experiment(cfg), lambda metrics, _: reports.append(metrics),
          checkpoint_root=tmp_path / "ckpt")
    assert [r["step"] for r in reports] == list(range(1, 7))
    for r in reports:
        blocks = r["step"] * 3
        assert abs(r["data/domain_fraction"] * blocks - 0.37 * blocks) <= 0.5 + 1e-9, r["step"]


def test_base_model_is_measured_in_the_trials_precision(corpora, tiny_gpt2_dir, tmp_path):
    cfg = _cfg(corpora, tiny_gpt2_dir, tmp_path)
    manifest = prepare_experiment(cfg)
    fp32 = measure_base(cfg, manifest, tmp_path)
    bf16_cfg = _cfg(corpora, tiny_gpt2_dir, tmp_path, precision="bf16")
    bf16 = measure_base(bf16_cfg, manifest, tmp_path)
    assert fp32["precision"] == "fp32" and bf16["precision"] == "torch.bfloat16"
    assert bf16["base/domain_ppl"] != fp32["base/domain_ppl"]  # re-measured, not served from the fp32 cache
    assert bf16["base/domain_ppl"] == pytest.approx(fp32["base/domain_ppl"], rel=0.05)
    assert fp32["base/domain_ppl_ci_low"] <= fp32["base/domain_ppl"] <= fp32["base/domain_ppl_ci_high"]


def test_adamw_settings_reach_the_optimizer(corpora, tiny_gpt2_dir, tmp_path):
    """train.adam_beta1/2 and adam_eps are what the saved optimizer state says (HF Trainer's 0.999, not ours)."""
    cfg = _cfg(corpora, tiny_gpt2_dir, tmp_path, steps=1, eval_every=1, adam_beta2=0.999, adam_eps=1e-6)
    reports = []
    train(cfg, prepare_experiment(cfg), lambda m, c: reports.append(c), checkpoint_root=tmp_path / "ckpt")
    saved = torch.load(f"{reports[-1]}/trainer_state.pt", weights_only=True)
    group = saved["optimizer"]["param_groups"][0]
    assert tuple(group["betas"]) == (0.9, 0.999) and group["eps"] == 1e-6
