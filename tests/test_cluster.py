"""Running on a real Ray cluster: the cluster configs against Ray's own autoscaler schema, the submit script's
bad-input handling, and (e2e) the smoke sweep submitted with `ray job submit` to a two-node cluster started on
this machine, with training forced onto the second node.

The e2e test starts its own head and worker with `ray start --block` and token authentication, and stops only
what it started: every process it spawns carries a marker in its environment (Ray passes the environment on to
raylets, workers, job drivers), and teardown terminates the two `ray start` processes, then kills whatever still
carries the marker. It never runs `ray stop`, which would stop every Ray on the machine.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_CONFIGS = [ROOT / "cluster.yaml", ROOT / "experiments" / "cluster-local.yaml"]
SUBMIT = ROOT / "experiments" / "submit_sweep.py"
RAY = Path(sys.executable).parent / "ray"
MARKER = "RAYCPT_TEST_CLUSTER"


def prepared(raw: dict) -> dict:
    """A cluster config as `ray up` sees it: Ray's defaults filled in, then Ray's JSON schema checked (offline)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    return config


def load(path: Path) -> dict:
    return prepared(yaml.safe_load(path.read_text()))


@pytest.mark.parametrize("path", CLUSTER_CONFIGS, ids=lambda p: p.name)
def test_cluster_config_passes_rays_schema(path):
    import jsonschema

    config = load(path)
    assert config["head_node_type"] in config["available_node_types"]
    # the check is real: the same config with a misspelt field fails it
    broken = yaml.safe_load(path.read_text())
    broken["setup_comands"] = broken.pop("setup_commands")
    with pytest.raises(jsonschema.ValidationError, match="setup_comands"):
        prepared(broken)


@pytest.mark.parametrize("path", CLUSTER_CONFIGS, ids=lambda p: p.name)
def test_dashboard_stays_private_and_nodes_use_the_token(path):
    import ray

    config = load(path)
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start
    assert "8265" not in json.dumps(config["provider"])  # no port opened for it
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        assert "RAY_AUTH_MODE=token" in commands[-1]
    assert "~/.ray/auth_token" in config["file_mounts"]
    # the nodes install the client's Ray version
    assert f"ray[default,train,tune]=={ray.__version__}" in " ".join(config["setup_commands"])


def test_aws_cluster_opens_only_ssh_to_the_outside():
    config = load(ROOT / "cluster.yaml")
    import ray

    assert config["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-")
    assert config["available_node_types"]["gpu"]["max_workers"] >= 1
    extra_rules = config["provider"]["security_group"]["IpPermissions"]
    # Ray adds intra-cluster traffic and SSH (22) from anywhere to the group; any extra rule reachable from an IP
    # range would expose something else (the dashboard, GCS) to the internet.
    assert [r for r in extra_rules if r.get("IpRanges") or r.get("Ipv6Ranges")] == []


def test_gpu_config_is_valid_and_sized_for_gpus():
    from raycpt.cli import main
    from raycpt.core.config import load_config

    assert main(["validate", "--config-only", str(ROOT / "experiments" / "gpu.yaml")]) == 0
    cfg = load_config(ROOT / "experiments" / "gpu.yaml")
    assert cfg.resources.use_gpu and cfg.train.precision == "bf16" and "/" in cfg.model.source
    assert cfg.storage_path.startswith("/")  # cluster storage: the same absolute path on every node


def load_submit_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("submit_sweep", SUBMIT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_submit_requests_the_bundles_of_each_concurrent_trial():
    from raycpt.core.config import load_config

    submit = load_submit_module()
    cfg = load_config(ROOT / "experiments" / "gpu.yaml")
    bundles = submit.trial_bundles(cfg)
    # per trial: its driver (no CPU, a little logical memory) and its two GPU workers; two trials at a time
    driver, worker = {"memory": float(256 * 1024**2)}, {"CPU": 8.0, "GPU": 1.0}
    assert bundles == [driver, worker, worker] * 2
    assert submit.missing_resources(bundles, {"CPU": 0.0, "memory": 1e9}) == {"CPU": 32.0, "GPU": 4.0}
    assert submit.missing_resources(bundles, {"CPU": 48.0, "GPU": 4.0, "memory": 1e9}) == {}


@pytest.mark.parametrize("override, message", [
    ("storage_path=runs", "is relative"),
    ("storage_path=s3://bucket/runs", "is a URI"),
    ("train.lr=-1", "train.lr"),
])
def test_submit_rejects_bad_input_with_one_line_and_exit_2(override, message):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, str(SUBMIT), str(ROOT / "experiments" / "smoke.yaml"), "--set", override],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("submit_sweep: error:") and message in lines[0]


# ---------------------------------------------------------------------------------------------------------------
# A two-node cluster on this machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def marked_processes(marker: str) -> dict[int, str]:
    """pid -> name of the processes whose environment carries this test's marker (Ray hands its environment down
    to everything it starts: raylets, GCS, dashboard, workers, job drivers)."""
    import psutil

    found = {}
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(MARKER) == marker:
                found[proc.pid] = proc.name()
        except psutil.Error:  # gone meanwhile, or not ours to read
            continue
    return found


@dataclass
class TwoNodeCluster:
    dashboard: str
    env: dict[str, str]
    head_node_id: str
    node_b_id: str

    def ray(self, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        """The `ray` CLI as a user runs it against this cluster (with RAY_AUTH_MODE=token and the token)."""
        proc = subprocess.run([str(RAY), *args], capture_output=True, text=True, env=self.env, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"ray {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc


def wait_for(what: str, probe, timeout: float, every: float = 2.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = probe()
        if result:
            return result
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def stop_cluster(starters: list[subprocess.Popen], marker: str) -> list[str]:
    """Terminate the `ray start --block` processes (each stops its node), then kill any stragglers carrying the
    marker. Returns what was still alive at the end (expected: nothing)."""
    for proc in reversed(starters):  # worker first, then head
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in starters:
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    deadline = time.monotonic() + 20
    while (left := marked_processes(marker)) and time.monotonic() < deadline:
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(1)
    return [f"{pid} {name}" for pid, name in marked_processes(marker).items()]


@pytest.fixture()
def two_node_cluster(tmp_path):
    """A head (1 CPU, dashboard on loopback) and node B (2 CPUs + the custom resource node_b), token auth on."""
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    marker = secrets.token_hex(8)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), MARKER: marker,
                # job entrypoints run `python`: this interpreter's, with raycpt and Ray installed
                "PATH": f"{RAY.parent}{os.pathsep}{env.get('PATH', '')}", "RAY_USAGE_STATS_ENABLED": "0",
                # nothing is left to drain at teardown; the default 30 s wait would only slow the test
                "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "3"})
    # Ray's sockets live under --temp-dir and Unix socket paths are limited to 107 bytes: pytest's tmp_path is too
    # deep for them, so the Ray dirs get a short path of their own (removed at the end).
    ray_tmp = Path(tempfile.mkdtemp(prefix="rc-", dir="/tmp"))
    gcs_port, dashboard_port = free_port(), free_port()
    common = ["--block", "--node-ip-address=127.0.0.1", "--dashboard-agent-listen-port=0", "--disable-usage-stats"]
    head_cmd = [str(RAY), "start", "--head", f"--port={gcs_port}", "--num-cpus=1", "--include-dashboard=true",
                "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
                f"--ray-client-server-port={free_port()}", f"--temp-dir={ray_tmp / 'head'}", *common]
    node_b_cmd = [str(RAY), "start", f"--address=127.0.0.1:{gcs_port}", "--num-cpus=2",
                  "--resources=" + json.dumps({"node_b": 4}), f"--temp-dir={ray_tmp / 'node_b'}", *common]
    cluster = TwoNodeCluster(f"http://127.0.0.1:{dashboard_port}", env, head_node_id="", node_b_id="")
    starters: list[subprocess.Popen] = []
    logs = []
    try:
        for name, cmd in (("head", head_cmd), ("node_b", node_b_cmd)):
            logs.append(open(tmp_path / f"ray-start-{name}.log", "w"))
            starters.append(subprocess.Popen(cmd, env=env, stdout=logs[-1], stderr=subprocess.STDOUT,
                                             start_new_session=True))
            if name == "head":
                wait_for("the head's job API", lambda: cluster.ray("job", "list", "--address", cluster.dashboard,
                                                                   check=False).returncode == 0, timeout=90)

        def alive_nodes():
            out = cluster.ray("list", "nodes", "--address", cluster.dashboard, "--format", "json").stdout
            try:  # before any raylet registers, `ray list nodes` prints "No resource in the cluster", not JSON
                listed = json.loads(out)
            except json.JSONDecodeError:
                return None
            nodes = [n for n in listed if n["state"] == "ALIVE"]
            return nodes if len(nodes) == 2 else None

        nodes = wait_for("node B to join", alive_nodes, timeout=90)
        cluster.head_node_id = next(n["node_id"] for n in nodes if n["is_head_node"])
        cluster.node_b_id = next(n["node_id"] for n in nodes if "node_b" in n["resources_total"])
        # teardown finds what to stop by the marker: it must see both nodes' raylets and the head's GCS
        names = list(marked_processes(marker).values())
        assert names.count("raylet") == 2 and "gcs_server" in names, names
        yield cluster
    finally:
        left = stop_cluster(starters, marker)
        for log in logs:
            log.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)
        assert left == [], f"processes this test started are still running: {left}"


@pytest.mark.e2e
def test_smoke_sweep_submitted_to_two_node_cluster(two_node_cluster, tmp_path):
    cluster = two_node_cluster
    # The token alone is not enough: a client without RAY_AUTH_MODE=token sends none and is refused.
    without_mode = {k: v for k, v in cluster.env.items() if k != "RAY_AUTH_MODE"}
    refused = subprocess.run([str(RAY), "job", "list", "--address", cluster.dashboard], capture_output=True,
                             text=True, env=without_mode, timeout=60)
    assert refused.returncode != 0 and "AuthenticationError" in refused.stderr

    storage = tmp_path / "runs"
    job_id = f"raycpt-e2e-{secrets.token_hex(4)}"
    overrides = [f"storage_path={storage}", "resources.worker_resources={node_b: 1}",
                 "search.space.train.lr={grid: [3.0e-3, 2.0e-3]}", "search.space.train.mix_ratio={choice: [0.7]}",
                 "train.steps=12", "train.eval_every=6", "eval.train_size=100", "eval.val_size=100",
                 "eval.test_size=100"]
    cluster.ray("job", "submit", "--address", cluster.dashboard, "--submission-id", job_id, "--no-wait",
                "--working-dir", str(ROOT), "--", "python", "experiments/submit_sweep.py", "experiments/smoke.yaml",
                *[arg for o in overrides for arg in ("--set", o)])
    # `ray job logs -f` returns when the job ends
    logs = cluster.ray("job", "logs", "-f", "--address", cluster.dashboard, job_id, timeout=480, check=False).stdout
    status = cluster.ray("job", "status", "--address", cluster.dashboard, job_id).stdout
    assert f"Job '{job_id}' succeeded" in status, f"{status}\n--- job logs (tail) ---\n{logs[-4000:]}"

    exp_dir = storage / "smoke"
    record = json.loads((exp_dir / "cluster.json").read_text())
    assert record["driver_node_id"] == cluster.head_node_id  # data, base model, Tune: on the head
    # one-worker trials checkpoint through Tune (tune/<trial>/), multi-worker ones through Ray Train (trials/<trial>/)
    placement_files = list(exp_dir.glob("*/*/checkpoint_*/ray_placement.json"))
    assert len({f.parent.parent for f in placement_files}) == 2  # both trials checkpointed
    assert {json.loads(f.read_text())["node_id"] for f in placement_files} == {cluster.node_b_id}  # trained on B
    summary = json.loads((exp_dir / "summary.json").read_text())
    assert summary["winner"] is not None
    assert (exp_dir / "export" / "model.safetensors").exists() and (exp_dir / "export" / "config.json").exists()
