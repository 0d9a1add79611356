"""A stop ASHA decided inside the noise of the validation blocks is marked in the table: a stopped trial that was
not worse, on the same blocks (paired), than a trial that went on gets a '*' and a note naming both; a clear stop
gets neither. Synthetic per-block losses with a known answer; no Ray."""

from __future__ import annotations

import numpy as np
import pandas as pd

from raycpt.core import metrics
from raycpt.results.compare import STOP_NOISE, stops_within_noise
from raycpt.results.render import summary_markdown
from raycpt.results.summary import Summary

rng = np.random.default_rng(0)
BLOCKS = rng.normal(4.0, 0.4, size=8)  # the blocks differ a lot; trials differ by a shift common to all blocks


def history(steps: list[int], shift: float, jitter: float = 0.0) -> pd.DataFrame:
    noise = np.random.default_rng(int(shift * 1000) + 7).normal(0, jitter, size=8)
    noise -= noise.mean()  # the trial's mean loss is the blocks' + shift, exactly
    return pd.DataFrame({metrics.STEP: steps, metrics.TOKENS: [s * 512 for s in steps],
                         metrics.DOMAIN_BLOCK_LOSSES: [list(BLOCKS + shift + noise) for _ in steps]})


def row(tid: str, status: str, step: int, shift: float) -> dict:
    return {"trial_id": tid, "status": status, metrics.STEP: step, metrics.DOMAIN_PPL: float(np.exp(4.0 + shift))}


def test_a_stop_inside_the_noise_is_found_and_a_clear_one_is_not():
    rows = [row("t_00000", "finished", 12, 0.0),
            row("t_00001", "stopped", 4, 0.005),  # 0.5% worse, block-to-block noise 0.1 nats: inside the noise
            row("t_00002", "stopped", 4, 0.30)]   # 35% worse on every block: a clear stop
    histories = {"t_00000": history([4, 8, 12], 0.0), "t_00001": history([4], 0.005, jitter=0.1),
                 "t_00002": history([4], 0.30, jitter=0.01)}
    got = stops_within_noise(rows, histories, metric=metrics.DOMAIN_PPL, block_size=128)
    assert got == {"t_00001": ["t_00000"], "t_00002": []}
    # a metric without per-block losses says nothing
    assert stops_within_noise(rows, histories, metric=metrics.F1, block_size=128) == {}

    for r in rows:
        if r["trial_id"] in got:
            r[STOP_NOISE] = got[r["trial_id"]]
    text = summary_markdown(Summary("/runs/demo", {}, rows, winner="t_00000", order=["t_00000"]))
    assert "stopped by ASHA at step 4* |" in text  # t_00001
    assert "stopped by ASHA at step 4 |" in text  # t_00002, no mark
    assert "*: stopped inside the noise" in text and "(00001 vs 00000)" in text
