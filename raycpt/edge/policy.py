"""One checkpoint and failure policy for every trial, whichever Ray API runs it (Tune for one-worker trials, Ray
Train for multi-worker ones): keep the best checkpoint by domain ppl plus the latest (both APIs always keep the
latest, so a restart resumes from the newest state), and restart a failed trial or worker twice. A wsd trial's
pre-decay checkpoint ranks first (`metrics.CHECKPOINT_SCORE` is 0 there), so it is the one kept besides the latest:
`raycpt extend` continues from it (the disk policy, raycpt.edge.disk, then keeps it for the winner)."""

from __future__ import annotations

from typing import Any

from raycpt.core import metrics

CHECKPOINTS_KEPT = 1
"""Ranked checkpoints kept besides the latest (by `metrics.CHECKPOINT_SCORE`: the pre-decay one, else the best by
domain ppl)."""
MAX_FAILURES = 2
"""Restarts from the latest checkpoint before a trial counts as failed."""


def checkpoint_config(config_cls: type) -> Any:
    """`ray.train.CheckpointConfig` or `ray.tune.CheckpointConfig` with the policy above."""
    return config_cls(num_to_keep=CHECKPOINTS_KEPT, checkpoint_score_attribute=metrics.CHECKPOINT_SCORE,
                      checkpoint_score_order="min")


def failure_config(config_cls: type, max_failures: int = MAX_FAILURES) -> Any:
    """`ray.train.FailureConfig` or `ray.tune.FailureConfig` with the policy above."""
    return config_cls(max_failures=max_failures)
