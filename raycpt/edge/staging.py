"""Local checkpoint staging: where a trial process writes a checkpoint before Ray copies it to storage.

Each trial process stages under `<tmp>/raycpt-ckpt-<pid>-*` (`<tmp>` is the node's temp dir: TMPDIR, else /tmp) and
removes its copy once `report` returns. A trial that Tune stops (ASHA) or kills never returns from `report`, so its
last staged checkpoint (a whole model, 0.5 GiB for a 135M model in fp32) would stay behind for good: every trial
start removes the staging dirs of processes that are gone, and after a sweep `remove_orphans_on_every_node` does
the same on each node, waiting a little for the stopped trials' processes to exit.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

log = logging.getLogger(__name__)

STAGING_PREFIX = "raycpt-ckpt-"


def staging_dir() -> tempfile.TemporaryDirectory:
    """This process's staging dir (a context manager), named after its pid so an orphan can be told apart."""
    return tempfile.TemporaryDirectory(prefix=f"{STAGING_PREFIX}{os.getpid()}-")


def _owner(path: Path) -> int | None:
    pid = path.name[len(STAGING_PREFIX):].split("-", 1)[0]
    return int(pid) if pid.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def remove_orphans(tmp: str | Path | None = None, *, wait_s: float = 0.0) -> int:
    """Remove the staging dirs in `tmp` (default: this node's temp dir) whose process has exited; with `wait_s`,
    first wait up to that long for their processes to exit (after a sweep, stopped trials may still be ending).
    The own process's dir and those of live processes stay. Returns the bytes freed."""
    root = Path(tmp or tempfile.gettempdir())
    own = os.getpid()
    candidates = [(p, _owner(p)) for p in root.glob(f"{STAGING_PREFIX}*") if p.is_dir()]
    candidates = [(p, pid) for p, pid in candidates if pid is not None and pid != own]
    deadline = time.monotonic() + wait_s
    while any(_alive(pid) for _, pid in candidates) and time.monotonic() < deadline:
        time.sleep(0.2)
    freed = 0
    for path, pid in candidates:
        if not _alive(pid):
            freed += sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            shutil.rmtree(path, ignore_errors=True)
    if freed:
        log.info("removed %.1f MiB of checkpoints staged by trials that were stopped", freed / 2**20)
    return freed


def remove_orphans_on_every_node(wait_s: float = 30.0, tmp: str | Path | None = None) -> int:
    """`remove_orphans` as a zero-CPU Ray task pinned to each alive node (inside a Ray session), in `tmp` (default:
    each node's temp dir). Returns the bytes
    freed on all nodes; a failure is logged, never raised (it must not hide the sweep's own outcome)."""
    try:
        return _remove_on_nodes(wait_s, tmp)
    except Exception as err:  # cleanup only
        log.warning("could not remove staged checkpoints of stopped trials: %s", err)
        return 0


def _remove_on_nodes(wait_s: float, tmp: str | Path | None) -> int:
    task = ray.remote(num_cpus=0)(remove_orphans)
    refs = [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))
            .remote(str(tmp) if tmp else None, wait_s=wait_s) for node in ray.nodes() if node.get("Alive")]
    return sum(ray.get(refs))
