"""Joining or starting Ray for one command, and leaving it as found."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import ray


@contextlib.contextmanager
def ray_session(num_cpus: int | None = None) -> Iterator[None]:
    """Join RAY_ADDRESS when set, else start local Ray with the dashboard on (ASHA-stopped trials leak their
    workers without it). Ray is shut down at the end only when this process started it."""
    started = False
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=True, log_to_driver=False,
                     configure_logging=True, logging_level="ERROR")
            started = True
    try:
        yield
    finally:
        if started:
            ray.shutdown()
