"""`raycpt plan`: the memory estimate is close to what the loop's step really takes on CPU (peak RSS), says an 8B
model fits 8 x H100 under fsdp and not under ddp (and why), and `raycpt sweep` refuses a config that cannot fit its
accelerator before doing anything."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from raycpt.cli import main
from raycpt.core.config import ACCELERATOR_TYPES, load_config
from raycpt.core.forecast.plan import ACCELERATOR_MEMORY_MIB, model_shape, plan
from tests.conftest import ROOT

GPU_8B = str(ROOT / "experiments" / "gpu-8b.yaml")

# The loop's own step (raycpt.core.train.loop.train_step with build_optimizer: forward, backward, grad clipping, fused
# AdamW) in a fresh process. Peak RSS is read from VmHWM after resetting it (clear_refs 5) once the model is loaded,
# its weights resident and the kernels initialised: the increase, plus the weights, is what training adds. Three
# steps: the first allocates the AdamW state, the later ones hold it together with gradients and activations.
MEASURE = r"""
import ctypes, gc, json, sys
import torch
from raycpt.core.config import load_config
from raycpt.core.model.loss import resolve_loss_impl
from raycpt.core.model.loading import load_model
from raycpt.core.train.loop import build_optimizer, build_scheduler, train_step

def status(key):
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith(key))

cfg = load_config(sys.argv[1], json.loads(sys.argv[2]))
torch.set_num_threads(max(1, round(cfg.resources.cpus_per_worker)))
model = load_model(cfg.model.source, cfg.model.dtype)
if cfg.model.gradient_checkpointing:
    model.gradient_checkpointing_enable()
model.config.use_cache = False
impl, _ = resolve_loss_impl(cfg.train.loss_impl, "cpu", model)
optimizer = build_optimizer(model, cfg.train.lr, cfg.train.weight_decay, torch.device("cpu"))
scheduler = build_scheduler(optimizer, cfg.train.warmup_steps, cfg.train.total_steps(cfg.data.block_size),
                            cfg.train.min_lr_ratio)
scaler = torch.amp.GradScaler("cpu", enabled=False)
weights = sum(p.numel() * p.element_size() for p in model.parameters())
with torch.no_grad():  # safetensors weights are mmapped: make them resident, and initialise the kernels
    for p in model.parameters():
        p.sum()
    model(input_ids=torch.zeros(1, 8, dtype=torch.long))
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)
base = status("VmRSS") - weights
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")
micro, _ = cfg.train.micro_batching(cfg.resources.num_workers)
generator = torch.Generator().manual_seed(0)
for _ in range(3):
    ids = torch.randint(0, model.config.vocab_size, (micro, cfg.data.block_size), generator=generator)
    train_step(model, [ids], optimizer, scheduler, scaler, loss_impl=impl, grad_clip=cfg.train.grad_clip)
print(json.dumps({"peak": status("VmHWM") - base}))
"""


def measured_peak(config: Path, overrides: dict) -> int:
    done = subprocess.run([sys.executable, "-c", MEASURE, str(config), json.dumps(overrides)], capture_output=True,
                          text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])["peak"]


def check_estimate(config: Path, overrides: dict) -> tuple[int, int]:
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc to reset the peak RSS")
    estimated = plan(load_config(config, [f"{k}={v}" for k, v in overrides.items()])).total
    measured = measured_peak(config, overrides)
    assert abs(estimated - measured) <= 0.25 * measured, f"plan {estimated / 2**20:.0f} MiB vs measured " \
                                                         f"{measured / 2**20:.0f} MiB"
    return estimated, measured


@pytest.mark.parametrize("overrides", [{}, {"train.loss_impl": "chunked", "data.block_size": 128}],
                         ids=["hf-loss", "chunked-loss"])
def test_plan_is_within_25_percent_of_the_measured_peak_tiny_gpt2(overrides):
    """The smoke config's model: the [tokens x vocab] logits dominate, which the loss choice changes."""
    check_estimate(ROOT / "experiments" / "smoke.yaml", overrides)


@pytest.mark.e2e
def test_plan_is_within_25_percent_of_the_measured_peak_smollm2():
    """SmolLM2-135M as the laptop config trains it (fp32, one thread), at 2 x 128 tokens (~2 min on 2 cores)."""
    check_estimate(ROOT / "experiments" / "laptop.yaml", {"train.batch_size": 2})


@pytest.fixture(scope="module")
def llama_8b(tmp_path_factory) -> str:
    """Llama-3.1-8B's architecture without its weights (the hub is not reachable from the tests)."""
    from transformers import LlamaConfig

    path = tmp_path_factory.mktemp("llama-3.1-8b")
    LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
                tie_word_embeddings=False).save_pretrained(path)
    return str(path)


def test_8b_fits_8_h100_with_fsdp_not_with_ddp(llama_8b, capsys):
    source = f"model.source={llama_8b}"
    assert main(["plan", GPU_8B, "--set", source]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "8,030.3M params" in out and "fits: needs" in out and "an H100 has" in out

    assert main(["plan", GPU_8B, "--set", source, "--set", "resources.strategy=ddp"]) == 1
    out = " ".join(capsys.readouterr().out.split())
    # why: every GPU would hold the whole fp32 model, its gradients (twice with DDP's buckets) and AdamW state
    assert "does not fit" in out and "largest: AdamW state" in out
    assert "fix: --set resources.strategy=fsdp" in out

    cfg = load_config(GPU_8B, [source])
    shape = model_shape(cfg)
    fsdp, ddp = plan(cfg, shape), plan(load_config(GPU_8B, [source, "resources.strategy=ddp"]), shape)
    assert fsdp.fits and not ddp.fits
    assert ddp.rows["AdamW state"] == 8 * fsdp.rows["AdamW state"]  # sharded over the 8 workers
    assert fsdp.tokens_per_step == 64 * 4096
    assert fsdp.checkpoint_bytes == 12 * shape.params  # fp32 weights + two fp32 AdamW moments


def test_fixes_come_in_order_and_keep_the_global_batch(llama_8b):
    """On 24 GB GPUs even the sharded 8B model needs more: the changes are tried in order, each on top of the
    last, and the micro-batch shrinks with the global batch kept (accumulation grows)."""
    cfg = load_config(GPU_8B, [f"model.source={llama_8b}", "resources.strategy=ddp", "resources.accelerator_type=A10G",
                               "model.gradient_checkpointing=false", "train.loss_impl=hf"])
    result = plan(cfg)
    assert result.fits is False
    steps = [fix.overrides for fix in result.fixes]
    assert steps[0] == {"resources.strategy": "fsdp"}
    assert steps[1]["model.gradient_checkpointing"] is True and steps[2]["train.loss_impl"] == "chunked"
    assert steps[3]["train.batch_size"] == 1 and steps[3]["train.global_batch_size"] == 64
    assert [fix.total for fix in result.fixes] == sorted((fix.total for fix in result.fixes), reverse=True)
    assert result.fixes[-1].fits and result.fixes[-1].overrides["resources.fsdp_cpu_offload"] is True


def test_sweep_refuses_a_config_that_cannot_fit_its_accelerator(llama_8b, tmp_path, capsys):
    assert main(["sweep", GPU_8B, "--set", f"model.source={llama_8b}", "--set", "resources.strategy=ddp",
                 "--set", f"storage_path={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("raycpt: error: resources.accelerator_type=H100: does not fit")
    assert "--set resources.strategy=fsdp" in err
    assert list(tmp_path.iterdir()) == []  # refused before the experiment dir or anything else was written


def test_a_hub_id_that_cannot_be_resolved_offline_is_one_line(monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert main(["plan", GPU_8B]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "model.source 'meta-llama/Llama-3.1-8B'" in err and "hub" in err


def test_every_accelerator_type_has_its_memory():
    assert set(ACCELERATOR_MEMORY_MIB) == set(ACCELERATOR_TYPES)
