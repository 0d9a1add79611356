"""Driver failure: SIGKILL the sweep's driver after its first trial finished; `raycpt sweep --resume` continues it,
keeps the finished trial, and ends with the same selection and export as the uninterrupted smoke sweep."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raycpt.core.files import read_json
from tests.conftest import ROOT


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, stack = set(), [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.add(child)
            stack.append(child)
    return found


def _finished_trials(tune_dir: Path) -> dict[str, int]:
    """trial dir -> number of result lines, for trials whose last result says finished."""
    done = {}
    for result in tune_dir.glob("*/result.json"):
        lines = [ln for ln in result.read_text().splitlines() if ln.strip()]
        if lines and json.loads(lines[-1]).get("finished"):
            done[result.parent.name] = len(lines)
    return done


@pytest.mark.e2e
def test_killed_driver_resumes_to_the_same_selection_and_export(smoke_sweep, tmp_path):
    _, reference = smoke_sweep
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    driver = subprocess.Popen([sys.executable, "-m", "raycpt.cli", "sweep", str(ROOT / "experiments" / "smoke.yaml"),
                               "--set", f"storage_path={tmp_path}"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    started: set[int] = set()
    exp_dir = tmp_path / "smoke"
    try:
        deadline = time.time() + 400
        while time.time() < deadline and not _finished_trials(exp_dir / "tune"):
            started |= _descendants(driver.pid)
            assert driver.poll() is None, "the sweep ended before a trial finished"
            time.sleep(0.5)
        finished_before = _finished_trials(exp_dir / "tune")
        assert finished_before, "no trial finished in time"
        started |= _descendants(driver.pid)
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    finally:
        if driver.poll() is None:
            driver.kill()
        # Ray's reaper ends the dead driver's local cluster; whatever of ours survives is killed by pid.
        time.sleep(5)
        for pid in started:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert not (exp_dir / "export").exists()

    resumed = subprocess.run([sys.executable, "-m", "raycpt.cli", "sweep", "--resume", str(exp_dir)], env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = read_json(exp_dir / "summary.json")
    assert len(summary["trials"]) == len(reference.trials)
    # finished trials were kept, not run again
    assert {k: v for k, v in _finished_trials(exp_dir / "tune").items() if k in finished_before} == finished_before
    # same winner (same hyperparameters) and the same exported model as the uninterrupted sweep
    winner = next(t for t in summary["trials"] if t["trial_id"] == summary["winner"])
    ref_winner = reference.trial(reference.winner)
    assert {k: v for k, v in winner.items() if k.startswith("hp/")} == \
        {k: v for k, v in ref_winner.items() if k.startswith("hp/")}
    assert winner["eval/domain_ppl"] == pytest.approx(ref_winner["eval/domain_ppl"], rel=1e-3)
    card = read_json(exp_dir / "export" / "raycpt_card.json")
    assert card["verification"]["relative_difference"] <= 1e-3
