"""A sweep's summary: collect the trials from disk, apply the selection rule, optionally export the winner. The
`Summary` is what every renderer (terminal, markdown, JSON, plots) and `summary.json` read."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raycpt.core.config import ExperimentConfig, load_saved_config
from raycpt.core.files import read_json, write_json
from raycpt.core.prepare import BASE_METRICS_FILE
from raycpt.results.collect import collect_trials
from raycpt.results.export import CARD_FILE, EXPORT_DIR, export_winner
from raycpt.results.select import select_winner

SUMMARY_FILE = "summary.json"


@dataclass
class Summary:
    experiment_dir: str
    base: dict[str, Any]
    """The base model's metrics (`base/...`), measured once per sweep; {} when not measured yet."""
    trials: list[dict[str, Any]]
    """One row per trial (raycpt.results.collect): id, status, `hp/...`, last metrics."""
    winner: str | None = None
    reasons: list[str] = field(default_factory=list)
    flagged: bool = False
    excluded: dict[str, str] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    """Trial ids, best first under the rule."""
    export: str | None = None
    """The exported winner's dir, when the export there is this winner's."""
    verification: dict[str, Any] | None = None
    experiment_dir_bytes: int = 0
    plots: list[str] = field(default_factory=list)
    wall_time_s: float | None = None

    def trial(self, trial_id: str) -> dict[str, Any]:
        return next(t for t in self.trials if t["trial_id"] == trial_id)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Summary:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})

    def save(self) -> None:
        write_json(Path(self.experiment_dir) / SUMMARY_FILE, self.to_dict())


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def analyze(exp_dir: Path, cfg: ExperimentConfig | None = None, *, export: bool = True,
            force: bool = False) -> Summary:
    """Collect trials, apply the rule, export the winner when `export` (else report an earlier export of the same
    winner). Prints nothing: the caller renders the Summary."""
    exp_dir = Path(exp_dir)
    cfg = cfg or load_saved_config(exp_dir)
    base = read_json(exp_dir / BASE_METRICS_FILE) if (exp_dir / BASE_METRICS_FILE).exists() else {}
    trials = collect_trials(exp_dir)
    selection = select_winner(trials, base, cfg.select)
    summary = Summary(str(exp_dir), base, json.loads(trials.to_json(orient="records")), selection.trial_id,
                      selection.reasons, selection.flagged, selection.excluded, selection.order)
    if selection.trial_id is not None:
        if export:
            row = trials.set_index("trial_id").loc[selection.trial_id].to_dict()
            row["trial_id"] = selection.trial_id
            card = export_winner(exp_dir, cfg, row, base, selection, force=force)
            summary.export, summary.verification = str(exp_dir / EXPORT_DIR), card["verification"]
        else:
            card_path = exp_dir / EXPORT_DIR / CARD_FILE
            card = read_json(card_path) if card_path.exists() else {}
            if card.get("trial_id") == selection.trial_id:
                summary.export, summary.verification = str(exp_dir / EXPORT_DIR), card.get("verification")
    summary.experiment_dir_bytes = dir_bytes(exp_dir)
    return summary
