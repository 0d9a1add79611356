"""What Ray costs per trial: a TorchTrainer's start before the loop runs, and a small sweep's wall time against
the time its loops train.

    RAYCPT_CACHE=/tmp/rc python benchmarks/bench_ray_overhead.py
    RAYCPT_CACHE=/tmp/rc python benchmarks/bench_ray_overhead.py --steps 24 --laptop-run /tmp/runs/laptop
    RAYCPT_CACHE=/tmp/rc python benchmarks/bench_ray_overhead.py --skip-sweep

The workload is experiments/smoke.yaml (tiny GPT-2, Rotten Tomatoes + news, probe F1 at the end), `--steps`
steps with `eval_every` = half of them, so each trial reports twice. Three measurements, back to back:
1. In-process (no Ray): `core.train.loop.train` called directly with the worker's thread count; stamps the call, the
   first forward and the first optimizer step (global torch.optim hook), each report, and the return.
2. One trial through Ray: `ray.init(num_cpus=2, include_dashboard=True)`, then
   `raycpt.edge.worker.build_trainer(...).fit()`; a Ray Train UserCallback on the controller stamps each report's
   arrival (same machine, same wall clock). The worker's first step cannot be stamped from outside without
   changing raycpt, so Ray's start cost is taken by difference, on the same config:
       start overhead = (fit() -> 1st report - loop time in it) - (train() -> 1st report - loop time in it)
   where "loop time" is the `time/train_s` the report itself carries. What remains is what Ray adds before the
   first report: controller + worker group start, imports in the worker, and persisting the first checkpoint.
   fit() -> first optimizer step is then estimated as start overhead + in-process train() -> first step.
3. A small sweep (`raycpt.edge.tune.build_tuner`, the smoke search space, ASHA, one trial at a time): wall time of
   `tuner.fit()` against the sum over trials of their last `time/train_s` (the loop's own training time). Its
   trials have one worker, so they run the loop in the Tune trial itself (no TorchTrainer, the sweep's default
   path): their non-loop time minus the in-process call's is that path's Ray extra, plus Tune's own per-trial cost.
Finally both paths' per-trial overhead is put against a laptop trial (experiments/laptop.yaml: SmolLM2-135M, 12
steps of 4x128 tokens at 1 thread): from `--laptop-run`'s measured seconds per step if given, else
`--laptop-step-s`.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

# Seconds per laptop step (SmolLM2-135M, 4x128 tokens, 1 torch thread, two trials sharing this 2-core VM): the
# median over the 4 trials of the laptop sweep of 2026-11-26 on this VM (/tmp/runs/laptop): 14.0, 14.3, 15.2 and
# 15.3 s/step (time/train_s / step at each trial's last report).
LAPTOP_STEP_S_MEASURED = 14.8
LAPTOP_TRIAL_STEPS = 12  # a finished trial of experiments/laptop.yaml (train.steps: choice of 8 or 12)


def smoke_config(steps: int, storage: str):
    from raycpt.core.config import load_config

    return load_config(Path(__file__).resolve().parent.parent / "experiments" / "smoke.yaml",
                       {"storage_path": storage, "name": "bench-ray-overhead", "train.steps": steps,
                        "train.eval_every": max(1, steps // 2)})


def run_in_process(cfg, manifest, scratch: str) -> dict[str, Any]:
    """train() without Ray; wall-clock stamps (time.time, comparable with the Ray processes on this machine)."""
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from raycpt.core.train.loop import train

    stamps: dict[str, Any] = {"step_ends": [], "reports": [], "first_forward": None}

    def on_step(optimizer, args, kwargs) -> None:
        stamps["step_ends"].append(time.time())

    def watch_forward(model):
        def stamp(module, inputs):
            stamps["first_forward"] = stamps["first_forward"] or time.time()

        model.register_forward_pre_hook(stamp)
        return model

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, round(cfg.resources.cpus_per_worker)))  # as distributed.train_fn_per_worker does
    handle = register_optimizer_step_post_hook(on_step)
    try:
        with tempfile.TemporaryDirectory(dir=scratch) as checkpoints:
            stamps["call"] = time.time()
            train(cfg, manifest, lambda metrics, checkpoint: stamps["reports"].append((time.time(), metrics)),
                  checkpoint_root=checkpoints, device="cpu", wrap_model=watch_forward)
            stamps["return"] = time.time()
    finally:
        handle.remove()
        torch.set_num_threads(threads)
    return stamps


def report_clock_callback(path: str):
    """A Ray Train UserCallback (runs in the controller) appending each report's arrival time to `path`."""
    from ray.train import UserCallback

    class ReportClock(UserCallback):
        def after_report(self, run_context, metrics, checkpoint) -> None:
            rank0 = metrics[0] if metrics else {}
            with open(path, "a") as fh:
                fh.write(json.dumps({"t": time.time(), "step": rank0.get("step"),
                                     "train_s": rank0.get("time/train_s")}) + "\n")

    return ReportClock()


def run_one_trial(cfg, manifest, scratch: str) -> dict[str, Any]:
    from raycpt.edge.worker import build_trainer

    clock_file = os.path.join(scratch, "report_clock.jsonl")
    trainer = build_trainer(cfg, manifest, storage_path=os.path.join(scratch, "trials"), name="one_trial",
                            callbacks=[report_clock_callback(clock_file)])
    stamps: dict[str, Any] = {"fit": time.time()}
    result = trainer.fit()
    stamps["return"] = time.time()
    stamps["reports"] = [json.loads(line) for line in Path(clock_file).read_text().splitlines()]
    stamps["final_train_s"] = (result.metrics or {}).get("time/train_s")
    return stamps


def run_sweep(cfg, manifest, scratch: str) -> dict[str, Any]:
    import ray

    from raycpt.core.resources import trial_concurrency
    from raycpt.edge.tune import build_tuner

    exp_dir = Path(scratch) / "sweep"
    exp_dir.mkdir()
    concurrency = trial_concurrency(cfg, ray.cluster_resources())
    tuner = build_tuner(cfg, manifest, exp_dir, concurrency, callbacks=[])
    start = time.time()
    grid = tuner.fit()
    wall = time.time() - start
    trials = [{"steps": r.metrics.get("step"), "train_s": r.metrics.get("time/train_s") or 0.0,
               "trial_s": r.metrics.get("time_total_s") or 0.0} for r in grid if r.metrics]
    return {"wall": wall, "trials": trials, "concurrency": concurrency, "errors": len(grid.errors)}


def laptop_step_seconds(run_dir: str) -> tuple[float, str]:
    """Seconds per step of a laptop sweep: the median over its trials of time/train_s / step at the last report."""
    per_step = []
    for result in Path(run_dir).glob("tune/*/result.json"):
        lines = result.read_text().splitlines()
        if lines:
            last = json.loads(lines[-1])
            if last.get("step") and last.get("time/train_s"):
                per_step.append(last["time/train_s"] / last["step"])
    if not per_step:
        raise SystemExit(f"--laptop-run {run_dir}: no tune/*/result.json with step and time/train_s")
    return float(np.median(per_step)), (f"median of {len(per_step)} trials in {run_dir}: "
                                        + ", ".join(f"{s:.1f}" for s in sorted(per_step)) + " s/step")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12, help="steps per trial (smoke.yaml has 24)")
    parser.add_argument("--skip-sweep", action="store_true")
    parser.add_argument("--laptop-run", default="", help="a finished laptop sweep dir to read s/step from")
    parser.add_argument("--laptop-step-s", type=float, default=LAPTOP_STEP_S_MEASURED,
                        help="s/step of a laptop trial when --laptop-run is not given")
    args = parser.parse_args()

    import ray
    import torch
    import transformers

    from raycpt.core.prepare import prepare_experiment

    print(f"ray {ray.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory(prefix="raycpt-bench-ray-") as scratch:
        cfg = smoke_config(args.steps, scratch)
        manifest = prepare_experiment(cfg)  # cached blocks; done before anything is timed

        local = run_in_process(cfg, manifest, scratch)
        started = time.time()
        ray.init(num_cpus=2, include_dashboard=True, log_to_driver=False, logging_level="ERROR")
        init_s = time.time() - started
        try:
            remote = run_one_trial(cfg, manifest, scratch)
            sweep = None if args.skip_sweep else run_sweep(cfg, manifest, scratch)
        finally:
            ray.shutdown()

    # --- one trial ---------------------------------------------------------------------------------------------
    first_local_time, first_local = local["reports"][0]
    local_to_report = first_local_time - local["call"]
    local_non_loop = local_to_report - first_local["time/train_s"]
    remote_to_report = remote["reports"][0]["t"] - remote["fit"]
    remote_non_loop = remote_to_report - remote["reports"][0]["train_s"]
    start_overhead = remote_non_loop - local_non_loop
    local_first_step = local["step_ends"][0] - local["call"]
    local_total = local["return"] - local["call"]
    remote_total = remote["return"] - remote["fit"]
    local_loop = local["reports"][-1][1]["time/train_s"]
    remote_loop = remote["final_train_s"] or float("nan")
    # non-loop time, Ray minus in-process: the loops' own time varies with the machine's load, so it is taken out
    whole_extra = (remote_total - remote_loop) - (local_total - local_loop)
    print(f"\nOne trial: smoke.yaml, {cfg.train.steps} steps of {cfg.train.batch_size}x{cfg.data.block_size} tokens, "
          f"eval every {cfg.train.eval_every}, {cfg.resources.num_workers} worker x "
          f"{cfg.resources.cpus_per_worker:g} CPU; ray.init took {init_s:.1f} s (not counted below)")
    print(f"{'':44s} {'in-process':>10s} {'Ray':>8s} {'Ray extra':>9s}")
    print(f"{'call -> first forward (model + data load)':44s} {local['first_forward'] - local['call']:10.1f}")
    print(f"{'call -> first optimizer step end':44s} {local_first_step:10.1f} {start_overhead + local_first_step:8.1f} "
          f"{start_overhead:9.1f}   (Ray column estimated, see docstring)")
    print(f"{'call -> first report':44s} {local_to_report:10.1f} {remote_to_report:8.1f} "
          f"{remote_to_report - local_to_report:9.1f}")
    print(f"{'  of which loop time (time/train_s)':44s} {first_local['time/train_s']:10.1f} "
          f"{remote['reports'][0]['train_s']:8.1f}")
    print(f"{'  of which not loop':44s} {local_non_loop:10.1f} {remote_non_loop:8.1f} {start_overhead:9.1f}")
    print(f"{'call -> return (whole trial)':44s} {local_total:10.1f} {remote_total:8.1f}")
    print(f"{'  of which loop time, all steps (time/train_s)':44s} {local_loop:10.1f} {remote_loop:8.1f}")
    print(f"{'  of which not loop':44s} {local_total - local_loop:10.1f} {remote_total - remote_loop:8.1f} "
          f"{whole_extra:9.1f}")

    # --- sweep ---------------------------------------------------------------------------------------------------
    trial_extra: float | None = None
    if sweep:
        loops = sum(t["train_s"] for t in sweep["trials"])
        n = len(sweep["trials"])
        print(f"\nSweep: smoke search space, {n} trials, {sweep['concurrency']} at a time, {sweep['errors']} errors")
        print(f"{'trial':>5s} {'steps':>5s} {'loop s':>7s} {'trial s (Tune time_total_s)':>28s}")
        for i, t in enumerate(sweep["trials"]):
            print(f"{i:5d} {t['steps'] or 0:5d} {t['train_s']:7.1f} {t['trial_s']:28.1f}")
        print(f"sweep wall (tuner.fit) {sweep['wall']:.1f} s, sum of loop times {loops:.1f} s: loops are "
              f"{100 * loops / sweep['wall']:.0f}% of the wall time; {(sweep['wall'] - loops) / max(n, 1):.1f} s "
              "per trial is not loop (Ray start, eval, probe F1, checkpoints, Tune)")
        trial_total = sum(t["trial_s"] for t in sweep["trials"])
        tune_cost = (sweep["wall"] - trial_total) / max(n, 1)
        print(f"Tune's own cost outside the trials (wall - sum of time_total_s) / trials: {tune_cost:.1f} s per trial")
        # One-worker sweep trials run the loop in the Tune trial (no TorchTrainer): their non-loop time against
        # the in-process call's, on the trials that ran every step (same evals, probe and checkpoints)
        full = [t["trial_s"] - t["train_s"] for t in sweep["trials"] if t["steps"] == cfg.train.steps]
        if full and cfg.resources.num_workers == 1:
            trial_extra = float(np.median(full)) - (local_total - local_loop)
            print(f"one-worker sweep trial, not loop: median {np.median(full):.1f} s vs in-process "
                  f"{local_total - local_loop:.1f} s: Ray extra {trial_extra:.1f} s per trial (+ Tune's "
                  f"{tune_cost:.1f} s)")

    # --- against a laptop trial ----------------------------------------------------------------------------------
    step_s, source = (laptop_step_seconds(args.laptop_run) if args.laptop_run else
                      (args.laptop_step_s, "--laptop-step-s; default from the 2026-11-26 laptop sweep on this VM"))
    laptop_loop = LAPTOP_TRIAL_STEPS * step_s
    print(f"\nLaptop trial: {LAPTOP_TRIAL_STEPS} steps x {step_s:.1f} s/step = {laptop_loop:.0f} s of loop ({source})")
    print(f"TorchTrainer trial (multi-worker path): Ray start overhead {start_overhead:.1f} s = "
          f"{100 * start_overhead / laptop_loop:.1f}% of that loop; whole-trial Ray extra (not loop) "
          f"{whole_extra:.1f} s = {100 * whole_extra / laptop_loop:.1f}%")
    if trial_extra is not None:
        per_trial = trial_extra + tune_cost
        print(f"one-worker sweep trial (the laptop's path): Ray extra {per_trial:.1f} s per trial (in-trial + Tune's) "
              f"= {100 * per_trial / laptop_loop:.1f}% of that loop")


if __name__ == "__main__":
    main()
