"""Autoscaling shown, not assumed: experiments/cluster-fake.yaml mirrors cluster.yaml's node types, and (e2e) Ray's
fake multi-node provider runs the real autoscaler on this machine, which launches worker nodes for the smoke
sweep's trials when the job asks for them and removes them once they are idle.

The e2e test starts its own head (`RAY_FAKE_CLUSTER=1 ray start --head --num-cpus=0 --autoscaling-config=...`) with
its own temp dir and ports, and stops only what it started. The fake worker nodes are raylets that the head's
autoscaler (its monitor process) starts on this machine: they inherit the head's environment, so they carry the
test's marker like every other process of this cluster, and teardown kills by that marker (tests/test_cluster.py's
helpers). It never runs `ray stop`, which would stop every Ray on the machine.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.test_cluster import MARKER, RAY, ROOT, free_port, marked_processes, stop_cluster, wait_for

CLUSTER = ROOT / "cluster.yaml"
FAKE_CLUSTER = ROOT / "experiments" / "cluster-fake.yaml"
GPU_STAND_IN = "fake_gpu"
"""The custom resource the fake worker types offer in place of the GPUs that AWS detects on cluster.yaml's nodes."""
BUILT_IN = {"CPU", "GPU", "memory", "object_store_memory"}
"""Ray's own resource names; any other name in a node type's resources is a custom resource."""


def worker_types(config: dict) -> dict[str, dict]:
    return {name: t for name, t in config["available_node_types"].items() if name != config["head_node_type"]}


def test_fake_cluster_mirrors_cluster_yaml():
    from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_TYPE
    from ray.autoscaler._private.util import validate_config

    real, fake = yaml.safe_load(CLUSTER.read_text()), yaml.safe_load(FAKE_CLUSTER.read_text())
    # The autoscaler reads the file as written (Ray 2.60's wheel lacks the fake provider's defaults file, so nothing
    # is filled in): it must pass Ray's schema on its own.
    validate_config(fake)
    assert fake["provider"]["type"] == "fake_multinode"
    assert fake["max_workers"] == real["max_workers"]
    # The fake provider tags its head `ray.head.default` whatever the config says: that is cluster.yaml's `head`.
    assert fake["head_node_type"] == FAKE_HEAD_NODE_TYPE
    real_head, fake_head = (c["available_node_types"][c["head_node_type"]] for c in (real, fake))
    assert fake_head["resources"] == real_head["resources"] == {"CPU": 0}  # no trial lands on the head
    assert fake_head.get("labels", {}) == real_head.get("labels", {})

    real_workers, fake_workers = worker_types(real), worker_types(fake)
    assert fake_workers.keys() == real_workers.keys()
    for name, real_type in real_workers.items():
        fake_type = fake_workers[name]
        assert fake_type["max_workers"] == real_type["max_workers"], name
        assert fake_type.get("min_workers", 0) == real_type.get("min_workers", 0), name
        assert fake_type.get("labels", {}) == real_type.get("labels", {}), name
        custom = set(fake_type["resources"]) - BUILT_IN - {GPU_STAND_IN}
        assert custom == set(real_type["resources"]) - BUILT_IN, name
        # the stand-in replaces the GPUs; a real GPU resource would make Ray hand the trials CUDA devices
        assert fake_type["resources"].get(GPU_STAND_IN, 0) >= 1 and "GPU" not in fake_type["resources"], name
    assert 0 < fake["idle_timeout_minutes"] < 1  # idle nodes leave in seconds, so the e2e test sees them go


# ---------------------------------------------------------------------------------------------------------------
# The fake autoscaling cluster on this machine


@dataclass
class FakeCluster:
    dashboard: str
    env: dict[str, str]
    marker: str
    temp_dir: Path
    head_node_id: str = ""

    def ray(self, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(RAY), *args], capture_output=True, text=True, env=self.env, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"ray {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def alive_node_ids(self) -> list[str] | None:
        out = self.ray("list", "nodes", "--address", self.dashboard, "--format", "json", check=False).stdout
        try:  # before any raylet registers, `ray list nodes` prints "No resource in the cluster", not JSON
            return sorted(n["node_id"] for n in json.loads(out) if n["state"] == "ALIVE")
        except json.JSONDecodeError:
            return None

    def raylets(self) -> int:
        """Raylets carrying this test's marker: one per node, head and fake workers alike."""
        return list(marked_processes(self.marker).values()).count("raylet")

    def monitor_log(self) -> str:
        """The autoscaler's log (the head's monitor process)."""
        return (self.temp_dir / "session_latest" / "logs" / "monitor.log").read_text(errors="replace")


@dataclass
class NodeWatch:
    """The worker nodes alive while a job runs, polled in a thread: every one seen, and the most at once (a poll
    every few seconds: a node that trains a trial lives far longer than that)."""
    cluster: FakeCluster
    every_s: float = 3.0
    seen: set[str] = field(default_factory=set)
    most_at_once: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def _poll(self) -> None:
        while not self._stop.wait(self.every_s):
            workers = set(self.cluster.alive_node_ids() or []) - {self.cluster.head_node_id}
            self.seen |= workers
            self.most_at_once = max(self.most_at_once, len(workers))

    def __enter__(self) -> NodeWatch:
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=120)


@pytest.fixture()
def fake_cluster(tmp_path):
    """A head with no CPU whose autoscaler runs experiments/cluster-fake.yaml (token auth on, dashboard on
    loopback), on ports and a temp dir of its own."""
    import ray._private.services

    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    marker = secrets.token_hex(8)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), MARKER: marker,
                "PATH": f"{RAY.parent}{os.pathsep}{env.get('PATH', '')}", "RAY_USAGE_STATS_ENABLED": "0",
                "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "3",
                # the fake provider, and an autoscaler that looks every second instead of every 5 s
                "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"})
    # short: Ray's Unix socket paths under --temp-dir must stay under 107 bytes (the fake nodes use the head's)
    ray_tmp = Path(tempfile.mkdtemp(prefix="ra-", dir="/tmp"))
    gcs_port, dashboard_port = free_port(), free_port()
    config = yaml.safe_load(FAKE_CLUSTER.read_text())
    # The fake nodes join the GCS at provider.gcs_address (default: this machine's IP and port 6379, which another
    # Ray may hold): this head's port instead.
    config["provider"]["gcs_address"] = f"{ray._private.services.get_node_ip_address()}:{gcs_port}"
    config_path = tmp_path / "cluster-fake.yaml"
    config_path.write_text(yaml.safe_dump(config))
    head_cmd = [str(RAY), "start", "--head", f"--port={gcs_port}", "--num-cpus=0",
                f"--autoscaling-config={config_path}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dashboard_port}", f"--ray-client-server-port={free_port()}",
                f"--temp-dir={ray_tmp}", "--dashboard-agent-listen-port=0", "--disable-usage-stats", "--block"]
    cluster = FakeCluster(f"http://127.0.0.1:{dashboard_port}", env, marker, ray_tmp)
    log = open(tmp_path / "ray-start-head.log", "w")
    starter = subprocess.Popen(head_cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for("the head's job API", lambda: cluster.ray("job", "list", "--address", cluster.dashboard,
                                                           check=False).returncode == 0, timeout=120)
        cluster.head_node_id = wait_for("the head node", cluster.alive_node_ids, timeout=60)[0]
        names = list(marked_processes(marker).values())
        assert names.count("raylet") == 1 and "gcs_server" in names, names
        yield cluster
    finally:
        left = stop_cluster([starter], marker)
        log.close()
        # keep the autoscaler's and the job's logs for a post-mortem (pytest keeps tmp_path)
        for path in (ray_tmp / "session_latest" / "logs").glob("*"):
            if path.is_file() and (path.name.startswith(("monitor", "job-driver", "runtime_env"))
                                   or path.suffix == ".err"):
                shutil.copy(path, tmp_path / path.name)
        shutil.rmtree(ray_tmp, ignore_errors=True)
        assert left == [], f"processes this test started are still running: {left}"


@pytest.mark.e2e
def test_autoscaler_launches_workers_for_the_trials_and_removes_them(fake_cluster, tmp_path):
    """What must hold however fast this machine is: the sweep succeeds on worker nodes the autoscaler launched of
    a type that offers the trials' resources, enough of them for the two trials the job asked room for, never more
    than max_workers at once, and all of them gone once idle. How many launches that took is not asserted: on a
    loaded machine Ray's autoscaler may launch a surplus node and terminate it at once, or remove a node that went
    idle between the base measurement and the trials and launch another."""
    cluster = fake_cluster
    fake = yaml.safe_load(FAKE_CLUSTER.read_text())
    offering = {name: t["resources"] for name, t in worker_types(fake).items() if t["resources"].get(GPU_STAND_IN)}
    assert cluster.alive_node_ids() == [cluster.head_node_id]  # no worker node before the job asks

    storage = tmp_path / "runs"
    job_id = f"raycpt-autoscale-{secrets.token_hex(4)}"
    # Two trials at once, each needing one `gpu` node's worth (a CPU and the GPU stand-in): the head has neither.
    overrides = [f"storage_path={storage}", "resources.cpus_per_worker=1",
                 f"resources.worker_resources={{{GPU_STAND_IN}: 1}}", "search.max_concurrent_trials=2",
                 "search.space.train.lr={grid: [3.0e-3, 2.0e-3]}", "search.space.train.mix_ratio={choice: [0.7]}",
                 "train.steps=12", "train.eval_every=6", "eval.train_size=100", "eval.val_size=100",
                 "eval.test_size=100"]
    started = time.monotonic()
    # `--working-dir local://<checkout>`, not `--working-dir .`: the fake nodes share the head's session dir, and each
    # node's runtime-env agent, when it installs an uploaded working dir, deletes and unpacks it again in that shared
    # dir, pulling it from under the job driver already running in it (its cwd vanishes: FileNotFoundError). A
    # `local://` dir is used in place on every node, as on a shared filesystem (tests/test_cluster.py covers upload).
    with NodeWatch(cluster) as watch:
        cluster.ray("job", "submit", "--address", cluster.dashboard, "--submission-id", job_id, "--no-wait",
                    "--working-dir", f"local://{ROOT}", "--", "python", "experiments/submit_sweep.py",
                    "experiments/smoke.yaml", "--wait-for-resources", "300",
                    *[arg for o in overrides for arg in ("--set", o)])
        logs = cluster.ray("job", "logs", "-f", "--address", cluster.dashboard, job_id, timeout=600,
                           check=False).stdout
    status = cluster.ray("job", "status", "--address", cluster.dashboard, job_id).stdout
    assert f"Job '{job_id}' succeeded" in status, f"{status}\n--- job logs (tail) ---\n{logs[-4000:]}"
    job_s = time.monotonic() - started

    # The autoscaler launched nodes, only of types that offer the trials' resources, and never more than
    # max_workers were alive at once.
    monitor_log = cluster.monitor_log()
    launched_types = {node_type for _, node_type in re.findall(r"Launching (\d+) nodes, type (\S+)\.", monitor_log)}
    assert launched_types and launched_types <= set(offering), monitor_log[-4000:]
    assert 1 <= watch.most_at_once <= fake["max_workers"], (watch.most_at_once, monitor_log[-4000:])

    # The sweep saw them (cluster.json is written at its end, while the job still asks room for both trials):
    # the head drove it, and the worker nodes then alive are nodes of those types with room for both trials.
    exp_dir = storage / "smoke"
    record = json.loads((exp_dir / "cluster.json").read_text())
    assert record["driver_node_id"] == cluster.head_node_id
    workers = [n for n in record["nodes"] if n["alive"] and n["node_id"] != cluster.head_node_id]
    assert 1 <= len(workers) <= fake["max_workers"]
    for node in workers:  # each has the resources of one of the offering types
        assert any({k: node["resources"].get(k) for k in r} == r for r in offering.values()), node["resources"]
    for key in ("CPU", GPU_STAND_IN):  # the two trials' bundles, one CPU and one stand-in each, fit at once
        assert sum(node["resources"].get(key, 0) for node in workers) >= 2, (key, workers)

    # Every trial trained on a worker node, none on the head. (Finished and stopped trials alike keep their
    # checkpoint dirs' metadata, ray_placement.json included.)
    placement_files = list(exp_dir.glob("*/*/checkpoint_*/ray_placement.json"))
    assert len({f.parent.parent for f in placement_files}) == 2  # both trials checkpointed
    trained = {json.loads(f.read_text())["node_id"] for f in placement_files}
    assert cluster.head_node_id not in trained
    assert trained <= watch.seen | {n["node_id"] for n in workers}, (trained, watch.seen)

    # Once the job dropped its request and the nodes are idle past idle_timeout_minutes, the autoscaler removes
    # them: Ray sees the head alone again, the autoscaler logged the removal of every node that trained, and the
    # workers' raylets are gone.
    idle_started = time.monotonic()
    wait_for("the idle worker nodes to be removed", lambda: cluster.alive_node_ids() == [cluster.head_node_id],
             timeout=180)
    idle_s = time.monotonic() - idle_started
    removed = set(re.findall(r"Terminating the node with id (\S+) and ip \S+ \(", cluster.monitor_log()))
    assert trained <= removed, (trained, removed)
    wait_for("the removed nodes' raylets to exit", lambda: cluster.raylets() == 1, timeout=60)
    print(f"job {job_s:.0f} s, idle workers removed {idle_s:.0f} s after it; {len(watch.seen)} worker nodes seen, "
          f"at most {watch.most_at_once} at once")
