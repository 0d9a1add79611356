"""Joining or starting Ray for one command, and leaving it as found."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import ray

log = logging.getLogger(__name__)


@contextlib.contextmanager
def ray_session(num_cpus: int | None = None, dashboard: bool = True) -> Iterator[None]:
    """Join RAY_ADDRESS when set, else start raycpt's own local Ray with the dashboard on (ASHA-stopped trials leak
    their workers without it). Ray is shut down at the end only when this process started it.

    Without RAY_ADDRESS the local Ray is always a separate, new one (`address="local"`), even when another Ray runs
    on the machine (`ray start --head`): a plain `ray.init(num_cpus=...)` would attach to that one and fail with
    "When connecting to an existing cluster, num_cpus and num_gpus must not be provided". To run on that cluster
    instead, set RAY_ADDRESS=auto (or its address). `dashboard=False` only for work without Tune (the data step
    of `raycpt prepare`): it saves the dashboard's ~0.2 GiB."""
    started = False
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            cpus = num_cpus or os.cpu_count()
            log.info("starting raycpt's own local Ray with %s CPUs, separate from any Ray already running here "
                     "(set RAY_ADDRESS=auto to use a running cluster instead)", cpus)
            ray.init(address="local", num_cpus=cpus, include_dashboard=dashboard, log_to_driver=False,
                     configure_logging=True, logging_level="ERROR")
            started = True
    try:
        yield
    finally:
        if started:
            ray.shutdown()
