"""Every figure in benchmarks/RESULTS.md with the script and the commit that produced it.

Reads every markdown table of the file; each row is one result. Lists the row, its figures (the numbers in its
cells other than the first and the commit column), its script (the backticked `benchmarks/...` path, or a
backticked command that runs one: `python benchmarks/...`, `bash benchmarks/...`, `raycpt ...`) and its commit(s)
(the hex ids in the table's `commit` column: the first is the one measured at; any others, a baseline's commit or
later changes to the measured code, are listed as also named). Exits 1, listing them, when a row has no script or
no commit, when a repository path its script names does not exist, or when a commit is not in `git log` of HEAD.

    python benchmarks/check_results.py                           # benchmarks/RESULTS.md of this repository
    python benchmarks/check_results.py --results FILE --repo DIR
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CODE = re.compile(r"`([^`]+)`")
SCRIPT = re.compile(r"^(?:(?:python3?|bash|sh|flock \S+ python3?)\s+)?benchmarks/\S+|^raycpt\s+\w+")
REPO_PATH = re.compile(r"(?<![\w./-])((?:benchmarks|experiments|tests|raycpt|docs)/[\w./-]*\w)")
COMMIT = re.compile(r"\b[0-9a-f]{7,40}\b")
UNIT = r"(?:\s?(?:%|×|GiB|MiB|GB|min\b|s\b|k\b|M\b))?"
NUMBER = re.compile(r"(?<![\w.])[-+−]?\d+(?:,\d{3})*(?:\.\d+)?(?:e[-+−]?\d+)?" + UNIT + r"(?!\w)")


@dataclass
class Row:
    section: str
    line: int
    label: str
    figures: list[str]
    scripts: list[str]
    commits: list[str]
    problems: list[str] = field(default_factory=list)


def cells(line: str) -> list[str]:
    """The cells of a markdown table line (pipes inside backticks do not split)."""
    parts, current, in_code = [], "", False
    for ch in line.strip().strip("|"):
        if ch == "`":
            in_code = not in_code
        if ch == "|" and not in_code:
            parts.append(current.strip())
            current = ""
        else:
            current += ch
    parts.append(current.strip())
    return parts


def is_separator(line: str) -> bool:
    return all(re.fullmatch(r":?-{3,}:?", c) for c in cells(line))


def parse(text: str) -> list[Row]:
    """Every data row of every table in `text`."""
    rows, section, header, lines = [], "", None, text.splitlines()
    for number, line in enumerate(lines, 1):
        if line.startswith("#"):
            section, header = line.lstrip("#").strip(), None
            continue
        if not line.lstrip().startswith("|"):
            header = None
            continue
        if header is None:
            header = [c.lower() for c in cells(line)]
            continue
        if is_separator(line):
            continue
        row = cells(line)
        commit_col = header.index("commit") if "commit" in header else None
        commit_text = row[commit_col] if commit_col is not None and commit_col < len(row) else ""
        spans = [s.strip() for s in CODE.findall(line)]
        figure_cells = [c for i, c in enumerate(row) if i not in (0, commit_col)]
        figures = [n.strip() for c in figure_cells for n in NUMBER.findall(CODE.sub("", c))]
        rows.append(Row(section, number, re.sub(r"\s+", " ", row[0])[:90], figures,
                        [s for s in spans if SCRIPT.match(s)], list(dict.fromkeys(COMMIT.findall(commit_text)))))
    return rows


def history(repo: Path) -> list[str]:
    out = subprocess.run(["git", "-C", str(repo), "log", "--format=%H", "HEAD"], capture_output=True, text=True,
                         check=True)
    return out.stdout.split()


def check(rows: list[Row], repo: Path) -> list[Row]:
    """Fill each row's problems; returns the rows that have any."""
    commits = history(repo)
    for row in rows:
        if not row.scripts:
            row.problems.append("no script (a backticked benchmarks/... path or command)")
        for script in row.scripts:
            for path in REPO_PATH.findall(script):
                if not (repo / path).exists():
                    row.problems.append(f"script path {path} does not exist")
        if not row.commits:
            row.problems.append("no commit")
        for commit in row.commits:
            if not any(full.startswith(commit) for full in commits):
                row.problems.append(f"commit {commit} is not in git log")
    return [row for row in rows if row.problems]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    p.add_argument("--repo", type=Path, default=ROOT, help="the git repository the scripts and commits are in")
    args = p.parse_args(argv)
    rows = parse(args.results.read_text(encoding="utf-8"))
    failed = check(rows, args.repo)
    for row in rows:
        print(f"{'FAIL' if row.problems else 'ok  '} {args.results.name}:{row.line} [{row.section[:40]}] {row.label}")
        print(f"       figures: {', '.join(row.figures) or '-'}")
        print(f"       script: {'; '.join(row.scripts) or '-'}")
        also = f" (also named: {', '.join(row.commits[1:])})" if len(row.commits) > 1 else ""
        print(f"       commit: {row.commits[0] if row.commits else '-'}{also}")
        for problem in row.problems:
            print(f"       problem: {problem}")
    print(f"\n{len(rows)} row(s), {len(failed)} failing" + (":" if failed else ""))
    for row in failed:
        print(f"  {args.results.name}:{row.line} {row.label}: {'; '.join(row.problems)}")
    return 1 if failed or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
