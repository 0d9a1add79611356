"""`raycpt plan`'s memory estimate vs the measured peak of the loop's step, printed per case.

The measurement is tests/test_plan.py's own (`MEASURE`: the loop's step — build_optimizer, causal_lm_loss, grad
clipping, fused AdamW — three steps in a fresh process, peak RSS from VmHWM after a reset once the model is
resident); the test asserts each case is within 25%, this prints the numbers. Linux only (/proc).

    python benchmarks/bench_plan.py                 # the four cases below, ~2-3 min on 2 cores
    python benchmarks/bench_plan.py --only tiny     # the tiny-gpt2 cases, seconds
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from raycpt.core.config import load_config  # noqa: E402
from raycpt.core.forecast.plan import plan  # noqa: E402
from tests.test_plan import MEASURE  # noqa: E402

CASES = [  # (name, config, overrides)
    ("tiny-gpt2 (smoke), 8 x 64, hf loss", "experiments/smoke.yaml", {}),
    ("tiny-gpt2, 8 x 128, chunked loss", "experiments/smoke.yaml", {"train.loss_impl": "chunked",
                                                                    "data.block_size": 128}),
    ("SmolLM2-135M (laptop), 2 x 128, hf loss", "experiments/laptop.yaml", {"train.batch_size": 2}),
    ("SmolLM2-135M, 2 x 128, gradient checkpointing", "experiments/laptop.yaml",
     {"train.batch_size": 2, "model.gradient_checkpointing": True}),
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="", help="run only the cases whose name contains this")
    args = p.parse_args(argv)
    print(f"{'case':48s} {'plan MiB':>9s} {'measured MiB':>12s} {'plan vs measured':>16s} {'s':>5s}")
    for name, config, overrides in CASES:
        if args.only.lower() not in name.lower():
            continue
        start = time.perf_counter()
        estimated = plan(load_config(ROOT / config, [f"{k}={v}" for k, v in overrides.items()])).total
        done = subprocess.run([sys.executable, "-c", MEASURE, str(ROOT / config), json.dumps(overrides)],
                              capture_output=True, text=True, cwd=ROOT)
        if done.returncode != 0:
            print(f"{name:48s} failed: {done.stderr[-500:]}")
            return 1
        measured = json.loads(done.stdout.strip().splitlines()[-1])["peak"]
        print(f"{name:48s} {estimated / 2**20:9.0f} {measured / 2**20:12.0f} {estimated / measured - 1:+16.1%} "
              f"{time.perf_counter() - start:5.0f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
