"""benchmarks/check_results.py on small synthetic RESULTS-like files in a throwaway git repository: every row
must name an existing script and a commit that is in `git log`, or the check exits 1 naming the row."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "benchmarks" / "check_results.py"


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                          capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture
def repo(tmp_path) -> tuple[Path, str]:
    """A git repository with one benchmark script and one commit; returns it and the commit's short id."""
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "bench_x.py").write_text("print(1)\n")
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "a.yaml").write_text("name: a\n")
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-q", "-m", "one")
    return tmp_path, git(tmp_path, "rev-parse", "--short=7", "HEAD")


def run(repo: Path, text: str) -> subprocess.CompletedProcess:
    results = repo / "RESULTS.md"
    results.write_text(text)
    return subprocess.run([sys.executable, str(CHECK), "--results", str(results), "--repo", str(repo)],
                          capture_output=True, text=True)


def table(*rows: str) -> str:
    return "# Results\n\n## a machine\n\n| benchmark | result | commit |\n|---|---|---|\n" + "\n".join(rows) + "\n"


def test_rows_with_script_and_commit_pass_and_are_listed_with_their_figures(repo):
    path, commit = repo
    (path / "experiments" / "a.yaml").write_text("name: b\n")
    git(path, "commit", "-q", "-am", "two")
    second = git(path, "rev-parse", "--short=7", "HEAD")
    out = run(path, table(f"| speed (`python benchmarks/bench_x.py --rounds 2`) | **1.25×**, 3.5 s, 2e-6 | {commit} |",
                          f"| plan (`raycpt plan experiments/a.yaml`) | 28.0 GiB | {second} (script as of {commit}) |")
              + "\n## Withdrawn\n\n- an old figure (abc1234): no table row, not checked\n")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 row(s), 0 failing" in out.stdout
    assert "figures: 1.25×, 3.5 s, 2e-6" in out.stdout and "figures: 28.0 GiB" in out.stdout
    assert "script: python benchmarks/bench_x.py --rounds 2" in out.stdout
    assert f"commit: {commit}\n" in out.stdout and f"commit: {second} (also named: {commit})" in out.stdout


@pytest.mark.parametrize(("row", "problem"), [
    ("| speed, no script named | 1.25× | {commit} |", "no script"),
    ("| speed (`benchmarks/bench_x.py`) | 1.25× | — |", "no commit"),
    ("| speed (`benchmarks/bench_gone.py`) | 1.25× | {commit} |", "path benchmarks/bench_gone.py does not exist"),
    ("| speed (`raycpt plan experiments/gone.yaml`) | 1 GiB | {commit} |", "experiments/gone.yaml does not exist"),
    ("| speed (`benchmarks/bench_x.py`) | 1.25× | deadbee |", "commit deadbee is not in git log"),
])
def test_a_row_without_a_script_or_commit_fails_and_is_named(repo, row, problem):
    path, commit = repo
    good = f"| fine (`benchmarks/bench_x.py`) | 2.0× | {commit} |"
    out = run(path, table(good, row.format(commit=commit)))
    assert out.returncode == 1
    assert "2 row(s), 1 failing:" in out.stdout
    failing = out.stdout.split("failing:", 1)[1]
    assert problem in failing and "RESULTS.md:8 speed" in failing and "fine" not in failing


def test_a_commit_off_the_history_of_head_fails(repo):
    """A commit that exists but is not an ancestor of HEAD (another branch) is not 'in git log'."""
    path, commit = repo
    git(path, "checkout", "-q", "-b", "side")
    (path / "benchmarks" / "bench_x.py").write_text("print(2)\n")
    git(path, "commit", "-q", "-am", "side")
    side = git(path, "rev-parse", "--short=7", "HEAD")
    git(path, "checkout", "-q", "-")
    out = run(path, table(f"| speed (`benchmarks/bench_x.py`) | 1.25× | {side} vs {commit} |"))
    assert out.returncode == 1 and f"commit {side} is not in git log" in out.stdout


def test_a_file_without_tables_fails(repo):
    path, _ = repo
    assert run(path, "# Results\n\nnothing measured\n").returncode == 1
