"""What one trial holds on the cluster, computed once (no Ray here): the sweep's Tune trainable, `raycpt train`,
the local pre-flight check and experiments/submit_sweep.py's autoscaler request all read it from here.

A one-worker trial is its own worker: it holds the worker's CPUs, a GPU and the extra resources. A multi-worker
trial's driver only waits on its Ray Train workers, so it holds `trial_cpus` (default none: then a little logical
memory, since Ray rejects an empty request) and each worker holds its own bundle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from raycpt.core.config import ExperimentConfig, ResourcesConfig
from raycpt.core.errors import InputError

TRIAL_DRIVER_MEMORY = 256 * 1024**2
"""Logical memory (bytes) a multi-worker trial's driver reserves when it holds no CPU."""
CHECKED_ALWAYS = ("CPU", "GPU")
"""Resources a trial must fit even where the cluster does not list them (custom ones are checked when listed)."""


@dataclass(frozen=True)
class TrialResources:
    """Ray resource bundles (Ray's names: CPU, GPU, memory, custom) of one trial."""

    driver: dict[str, float]
    """The Tune trial itself (for a one-worker trial, this is the worker)."""
    workers: list[dict[str, float]] = field(default_factory=list)
    """One bundle per Ray Train worker; empty for a one-worker trial."""

    def bundles(self) -> list[dict[str, float]]:
        return [b for b in (self.driver, *self.workers) if b]

    def totals(self) -> dict[str, float]:
        total: dict[str, float] = {}
        for bundle in self.bundles():
            for key, value in bundle.items():
                total[key] = total.get(key, 0.0) + value
        return total


def trial_resources(r: ResourcesConfig) -> TrialResources:
    worker = {"CPU": r.cpus_per_worker, **({"GPU": 1.0} if r.use_gpu else {}), **r.worker_resources}
    if r.num_workers == 1:
        return TrialResources({**worker, "CPU": r.cpus_per_worker + r.trial_cpus})
    driver = {"CPU": r.trial_cpus} if r.trial_cpus > 0 else {"memory": float(TRIAL_DRIVER_MEMORY)}
    return TrialResources(driver, [dict(worker) for _ in range(r.num_workers)])


def trial_concurrency(cfg: ExperimentConfig, cluster: dict[str, float]) -> int:
    """Trials that fit at once, set by the scarcest resource (and search.max_concurrent_trials); raises InputError
    naming the fix when one trial cannot fit at all."""
    need = trial_resources(cfg.resources).totals()
    fits = math.inf
    for key, amount in need.items():
        if amount <= 0 or (key not in CHECKED_ALWAYS and key not in cluster):
            continue
        have = cluster.get(key, 0.0)
        if amount > have + 1e-9:
            raise InputError(_cannot_fit(cfg.resources, key, amount, have))
        fits = min(fits, (have + 1e-9) // amount)
    if cfg.search.max_concurrent_trials:
        fits = min(fits, cfg.search.max_concurrent_trials)
    return max(1, int(fits if fits != math.inf else 1))


def _cannot_fit(r: ResourcesConfig, key: str, amount: float, have: float) -> str:
    if key == "CPU":
        return (f"resources: one trial needs {amount:g} CPUs (num_workers x cpus_per_worker + trial_cpus) but the "
                f"cluster has {have:g}; lower resources.num_workers or cpus_per_worker")
    if key == "GPU":
        gpus = "1 GPU" if amount == 1 else f"{amount:g} GPUs"
        return (f"resources.num_workers={r.num_workers} with use_gpu needs {gpus} but the cluster has {have:g}; "
                "lower num_workers or set resources.use_gpu=false")
    return (f"resources.worker_resources: one trial needs {amount:g} of '{key}' but the cluster has {have:g}; "
            "add nodes that offer it or change resources.worker_resources")
