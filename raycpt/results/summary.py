"""A sweep's summary: collect the trials from disk, apply the selection rule, optionally export the winner, and
find the extensions `raycpt extend` made of its trials. The `Summary` is what every renderer (terminal, markdown,
JSON, plots) and `summary.json` read."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raycpt.core import metrics
from raycpt.core.config import ExperimentConfig, load_saved_config
from raycpt.core.extend import EXTENSION_FILE, EXTENSION_GLOB
from raycpt.core.files import read_json, write_json
from raycpt.core.prepare import BASE_METRICS_FILE, MANIFEST_FILE, Manifest
from raycpt.results.accounting import sweep_compute
from raycpt.results.collect import collect_trials, load_histories
from raycpt.results.compare import STOP_NOISE, VS_BEST_PREFIX, paired_lifts, stops_within_noise
from raycpt.results.export import CARD_FILE, EXPORT_DIR, export_winner
from raycpt.results.recommendation import sweep_recommendation
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
    beats_base: bool | None = None
    """The winner beats the base model on validation F1 significantly and lowers domain ppl (selection rule 4)."""
    verdict: str = ""
    """Rule 4 in plain words, e.g. "no trial beats the base model on downstream F1 (...)"."""
    export: str | None = None
    """The exported winner's dir, when the export there is this winner's."""
    test: dict[str, Any] = field(default_factory=dict)
    """The winner's test-split metrics (`test/...`, `test/lift/...` vs the base model), once exported."""
    test_verdict: str = ""
    """Whether the winner's test F1 lift over the base model is significant, not significant, or negative."""
    verification: dict[str, Any] | None = None
    experiment_dir_bytes: int = 0
    plots: list[str] = field(default_factory=list)
    wall_time_s: float | None = None
    compute: dict[str, Any] = field(default_factory=dict)
    """Tokens, trial time, resource-seconds and what the scheduler saved (raycpt.results.accounting): `compute.*`."""
    rule: dict[str, Any] = field(default_factory=dict)
    """The selection rule (the `select` section) this summary was made under."""
    recommendation: dict[str, Any] = field(default_factory=dict)
    """The final run the sweep recommends (raycpt.results.recommendation.sweep_recommendation): the schedule-aware CPT
    law's pick with its predicted losses, or the fallback with its reasons; {"error": ...} when none was made."""
    extensions: list[dict[str, Any]] = field(default_factory=list)
    """The continuations `raycpt extend` wrote into the experiment dir (`collect_extensions`), by trial and tokens."""

    def trial(self, trial_id: str) -> dict[str, Any]:
        return next(t for t in self.trials if t["trial_id"] == trial_id)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Summary:
        """A Summary from its dict (summary.json). Keys this version does not know are ignored: a summary.json from
        an earlier raycpt loads, e.g. its `law` (the mixing law, removed for the CPT law's `recommendation`)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})

    def save(self) -> None:
        write_json(Path(self.experiment_dir) / SUMMARY_FILE, self.to_dict())


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _read_dict(path: Path) -> dict[str, Any]:
    """A JSON object from `path`; {} when it is missing, half-written or not an object."""
    try:
        found = read_json(path)
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def collect_extensions(exp_dir: Path) -> list[dict[str, Any]]:
    """The extensions `raycpt extend` wrote into the experiment dir (<exp>/extend-<trial>-<tokens>/), one dict each,
    by trial and tokens: {dir, trial_id (the trial it continued), winner (that trial was the sweep's winner),
    tokens_before, tokens_after, steps_before, steps_after, schedule, stopped (the forgetting guard's word, or
    None), export (its export dir, or None), metrics (the card's validation metrics: `eval/...` with intervals,
    step, tokens), lift (vs the base model), vs_trial (vs the trial it continued), test, test_verdict, verified}.
    The lineage and numbers are the export's card (raycpt.results.extension); an extension not exported yet
    (running, killed, failed) has its lineage from its extension.json and no numbers."""
    found = []
    for path in sorted(Path(exp_dir).glob(EXTENSION_GLOB)):
        card = _read_dict(path / EXPORT_DIR / CARD_FILE)
        lineage = card.get("lineage") or {}
        extension = lineage.get("extension") or _read_dict(path / EXTENSION_FILE)
        if not path.is_dir() or not extension.get("trial_id"):
            continue
        found.append({
            "dir": str(path), "trial_id": extension["trial_id"], "winner": bool(extension.get("winner")),
            **{key: extension.get(key) for key in ("tokens_before", "tokens_after", "steps_before", "steps_after")},
            "schedule": extension.get("schedule") or {}, "stopped": extension.get("stopped"),
            "export": str(path / EXPORT_DIR) if card else None,
            "metrics": {k: v for k, v in (card.get("metrics") or {}).items() if not isinstance(v, (list, dict))},
            "lift": card.get("lift") or {}, "vs_trial": lineage.get("vs_trial") or {},
            "test": card.get("test") or {}, "test_verdict": card.get("test_verdict") or "",
            "verified": (card.get("verification") or {}).get("ok"),
        })
    return sorted(found, key=lambda ext: (ext["trial_id"], ext["tokens_after"] or 0))


def analyze(exp_dir: Path, cfg: ExperimentConfig | None = None, *, export: bool = True,
            force: bool = False) -> Summary:
    """Collect trials, add their paired lifts (vs the base model and vs the winner), apply the rule, export the
    winner when `export` (else report an earlier export of the same winner). Prints nothing: the caller renders
    the Summary."""
    exp_dir = Path(exp_dir)
    cfg = cfg or load_saved_config(exp_dir)
    base = read_json(exp_dir / BASE_METRICS_FILE) if (exp_dir / BASE_METRICS_FILE).exists() else {}
    manifest = Manifest.load(exp_dir) if (exp_dir / MANIFEST_FILE).exists() else None
    task = manifest.task if manifest else None
    labels, classes = (task.val_labels, task.classes) if task else (None, None)
    block_size = manifest.block_size if manifest else cfg.data.block_size
    trials = collect_trials(exp_dir)
    selection = select_winner(trials, base, cfg.select, labels, classes)
    rows = json.loads(trials.to_json(orient="records"))
    winner_row = next((r for r in rows if r["trial_id"] == selection.trial_id), None)
    for row in rows:
        row.update(paired_lifts(row, base, row_prefix=metrics.EVAL_PREFIX, reference_prefix=metrics.BASE_PREFIX,
                                out_prefix=metrics.LIFT_PREFIX, labels=labels, classes=classes,
                                block_size=block_size))
        if winner_row is not None and row is not winner_row:
            row.update(paired_lifts(row, winner_row, row_prefix=metrics.EVAL_PREFIX,
                                    reference_prefix=metrics.EVAL_PREFIX, out_prefix=VS_BEST_PREFIX, labels=labels,
                                    classes=classes, block_size=block_size))
    summary = Summary(str(exp_dir), base, rows, selection.trial_id, selection.reasons, selection.flagged,
                      selection.excluded, selection.order, selection.beats_base, selection.verdict)
    histories = load_histories(exp_dir, rows)
    for tid, close in stops_within_noise(rows, histories, metric=cfg.search.metric, block_size=block_size).items():
        next(row for row in rows if row["trial_id"] == tid)[STOP_NOISE] = close
    summary.compute = sweep_compute(rows, cfg, histories)
    try:
        summary.recommendation = sweep_recommendation(rows, histories, cfg, base, selection.trial_id,
                                                      selection.order)
    except Exception as err:  # a law that cannot be fitted is not worth losing the summary and export over
        summary.recommendation = {"error": f"the CPT law failed ({type(err).__name__}: {err})"}
    if winner_row is not None:
        card_path = exp_dir / EXPORT_DIR / CARD_FILE
        card = export_winner(exp_dir, cfg, winner_row, base, selection, force=force,
                             compute=summary.compute) if export else (
            read_json(card_path) if card_path.exists() else {})
        if card.get("trial_id") == selection.trial_id:
            summary.export, summary.verification = str(exp_dir / EXPORT_DIR), card.get("verification")
            summary.test, summary.test_verdict = card.get("test") or {}, card.get("test_verdict") or ""
    summary.extensions = collect_extensions(exp_dir)
    summary.experiment_dir_bytes = dir_bytes(exp_dir)
    summary.rule = dataclasses.asdict(cfg.select)
    return summary


def keep_earlier(exp_dir: Path) -> list[Path]:
    """Rename an earlier summary.json and plots/ to summary-<time>.json and plots-<time>/ (the time they were
    written), so a re-analysis under another rule adds its results next to them instead of over them. Returns the
    new names."""
    exp_dir = Path(exp_dir)
    kept = []
    for name in (SUMMARY_FILE, "plots"):
        old = exp_dir / name
        if not old.exists():
            continue
        stem, suffix = (name.rsplit(".", 1)[0], "." + name.rsplit(".", 1)[1]) if "." in name else (name, "")
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(old.stat().st_mtime))
        target, n = exp_dir / f"{stem}-{stamp}{suffix}", 1
        while target.exists():
            target, n = exp_dir / f"{stem}-{stamp}-{n}{suffix}", n + 1
        old.rename(target)
        kept.append(target)
    return kept
