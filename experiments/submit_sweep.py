"""The job `ray job submit` runs on a Ray cluster: join it, scale it up for one sweep, run the sweep, exit.

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python experiments/submit_sweep.py experiments/gpu.yaml --set name=reviews-tinyllama

`--working-dir .` ships this checkout: Ray puts it first on the job's and the workers' PYTHONPATH, so the
cluster runs exactly the raycpt you submitted. This script never starts a Ray of its own: it joins the cluster
the job runs in (RAY_ADDRESS, which `ray job submit` sets) or a cluster already running on this machine.

Before the sweep it asks the autoscaler for the trials' resources (`request_resources`) and waits until they
are there, so GPU nodes that start at zero come up before raycpt checks that a trial fits; the request is
dropped when the sweep ends, so idle nodes scale back down. Results go to <storage_path>/<name>, which must be an
absolute path on a filesystem every node mounts (Ray Train writes checkpoints from the GPU nodes, the driver
reads them). The experiment dir also gets `cluster.json`: the nodes the sweep saw and the node of this driver.

Exit codes: 0 a winner was exported; 1 the sweep ran but no trial qualified, or it crashed (traceback in the
job logs); 2 bad input or a cluster that never had room for the trials (one line on stderr).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from raycpt.core.config import ExperimentConfig, load_config
from raycpt.core.errors import InputError
from raycpt.core.files import write_json
from raycpt.core.resources import trial_resources

WAIT_FOR_RESOURCES_S = 1800
"""How long to wait for the autoscaler to bring up the trials' nodes (GPU nodes take minutes to boot and pull)."""
POLL_S = 5.0


def check_cluster_storage(storage_path: str) -> None:
    """storage_path must name the same directory on every node: an absolute path (on a shared filesystem). A
    relative path would resolve inside the job's temporary working dir on the head node. (URIs are rejected by
    config validation already.)"""
    if not storage_path.startswith(("/", "~")):
        raise InputError(f"storage_path '{storage_path}' is relative: in a Ray job it would land in the job's "
                         "temporary working dir on the head node; give an absolute path on a filesystem every node "
                         "mounts, e.g. --set storage_path=/mnt/raycpt/runs")


def trial_bundles(cfg: ExperimentConfig) -> list[dict[str, float]]:
    """The resource bundles of as many trials as should run at once (the request the autoscaler scales up for):
    each trial's own bundles from raycpt.core.resources. Without a max_concurrent_trials, one trial's worth."""
    one_trial = trial_resources(cfg.resources).bundles()
    return [dict(b) for _ in range(max(1, cfg.search.max_concurrent_trials)) for b in one_trial]


def missing_resources(bundles: list[dict[str, float]], cluster: dict[str, float]) -> dict[str, float]:
    """Resources the cluster lacks in total for the bundles ({} when they all fit, summed over nodes)."""
    needed: dict[str, float] = {}
    for bundle in bundles:
        for key, value in bundle.items():
            needed[key] = needed.get(key, 0.0) + value
    return {key: value - cluster.get(key, 0.0) for key, value in needed.items() if cluster.get(key, 0.0) < value}


def scale_up(cfg: ExperimentConfig, timeout_s: float) -> None:
    """Ask the autoscaler for the trials' resources and wait until the cluster has them (a no-op on a cluster that
    already has them, such as one without an autoscaler)."""
    import ray
    from ray.autoscaler.sdk import request_resources

    bundles = trial_bundles(cfg)
    request_resources(bundles=bundles)
    deadline, last_note = time.monotonic() + timeout_s, 0.0
    while missing := missing_resources(bundles, ray.cluster_resources()):
        now = time.monotonic()
        if now > deadline:
            raise InputError(f"the cluster did not reach the resources of {len(bundles)} trial bundle(s) in "
                             f"{timeout_s:.0f} s (still missing {missing}); check `ray status` and the cluster "
                             "config's worker node types and max_workers, or lower resources.num_workers / "
                             "search.max_concurrent_trials")
        if now - last_note > 60:
            print(f"waiting for the autoscaler: missing {missing}", flush=True)
            last_note = now
        time.sleep(POLL_S)


def cluster_record(driver_node_id: str) -> dict[str, Any]:
    """The nodes this sweep ran on, for the experiment dir: which node drove it and what each node offered."""
    import ray

    nodes = [{"node_id": n["NodeID"], "ip": n["NodeManagerAddress"], "alive": n["Alive"],
              "resources": n["Resources"]} for n in ray.nodes()]
    return {"driver_node_id": driver_node_id, "ray_version": ray.__version__, "nodes": nodes}


def run(config: str, overrides: list[str], *, force: bool, wait_s: float) -> int:
    import ray

    from raycpt.pipeline import sweep
    from raycpt.results.format import make_console

    cfg = load_config(config, overrides)
    check_cluster_storage(cfg.storage_path)
    try:
        # "auto" reads RAY_ADDRESS, else finds a cluster running on this machine; it never starts a new one.
        ray.init(address="auto", log_to_driver=False)
    except ConnectionError as err:
        raise InputError(f"no Ray cluster to join ({str(err).splitlines()[0]}); submit this script with "
                         "`ray job submit` or set RAY_ADDRESS") from None
    from ray.autoscaler.sdk import request_resources

    try:
        scale_up(cfg, wait_s)
        console = make_console()
        console.print(f"[bold]raycpt[/] sweep {config} on Ray {ray.__version__} at "
                      f"{os.environ.get('RAY_ADDRESS', 'auto')}: {len(ray.nodes())} node(s), "
                      f"{ray.cluster_resources()}")
        summary = sweep(cfg, force=force, console=console)
        write_json(cfg.experiment_dir() / "cluster.json", cluster_record(ray.get_runtime_context().get_node_id()))
        console.print(f"results: {cfg.experiment_dir()}" + (f"; winner exported to {summary.export}"
                                                            if summary.export else ""))
        return 0 if summary.winner is not None else 1
    finally:
        request_resources(bundles=[])  # drop the request: idle nodes may scale down again
        ray.shutdown()  # disconnects this driver; the cluster keeps running


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="experiment YAML, e.g. experiments/gpu.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set train.lr=3e-4 (repeatable)")
    parser.add_argument("--force", action="store_true", help="replace an earlier sweep in the experiment dir")
    parser.add_argument("--wait-for-resources", type=float, default=WAIT_FOR_RESOURCES_S, metavar="SECONDS",
                        help=f"how long the autoscaler may take to add the trials' nodes (default "
                             f"{WAIT_FOR_RESOURCES_S})")
    args = parser.parse_args(argv)
    try:
        return run(args.config, args.set, force=args.force, wait_s=args.wait_for_resources)
    except InputError as err:
        print(f"submit_sweep: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
