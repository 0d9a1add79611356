"""Score and export an extended run (`raycpt extend`) the way the sweep's winner is: validation and test, intervals,
paired lifts against the base model and against the trial it continued, into <exp>/extend-<trial>-<tokens>/export
with a card whose lineage records the trial, the tokens before and after, and the schedule. `raycpt report` reads
that card back (raycpt.results.summary.collect_extensions) and shows the extension as a row below its trial."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from raycpt.core import metrics
from raycpt.core.extend import SUMMARY_FILE, Extension, Outcome
from raycpt.core.files import read_json
from raycpt.core.prepare import BASE_METRICS_FILE, Manifest
from raycpt.results.collect import HP_PREFIX
from raycpt.results.compare import VS_BEST_PREFIX, paired_lifts
from raycpt.results.export import EXPORT_DIR, export_winner
from raycpt.results.select import Selection

VS_TRIAL = "vs_trial"
"""The card's lineage entry: paired differences of the extended run against the trial it continued."""


def extension_row(ext: Extension, last: dict[str, Any], checkpoint: str) -> dict[str, Any]:
    """The extended run as a trial row: the trial's hyperparameters, the run's last metrics, its checkpoint, and its
    paired lifts (`lift/...` vs the base model, `vs_best/...` vs the trial it continued)."""
    exp_dir = ext.exp_dir
    summary = read_json(exp_dir / SUMMARY_FILE)
    trial = next(row for row in summary["trials"] if row["trial_id"] == ext.trial_id)
    base = read_json(exp_dir / BASE_METRICS_FILE) if (exp_dir / BASE_METRICS_FILE).exists() else {}
    manifest = Manifest.load(exp_dir)
    task = manifest.task
    kwargs = dict(labels=task.val_labels if task else None, classes=task.classes if task else None,
                  block_size=manifest.block_size)
    row = {**{k: v for k, v in trial.items() if k.startswith(HP_PREFIX)}, **last, "trial_id": ext.trial_id,
           "status": "finished" if last.get(metrics.FINISHED) else "stopped", metrics.CHECKPOINT_PATH: checkpoint}
    row.update(paired_lifts(row, base, row_prefix=metrics.EVAL_PREFIX, reference_prefix=metrics.BASE_PREFIX,
                            out_prefix=metrics.LIFT_PREFIX, **kwargs))
    row.update(paired_lifts(row, trial, row_prefix=metrics.EVAL_PREFIX, reference_prefix=metrics.EVAL_PREFIX,
                            out_prefix=VS_BEST_PREFIX, **kwargs))
    return row


def export_extension(ext: Extension, result: Outcome, *, force: bool = False) -> dict[str, Any]:
    """Export the extended run's checkpoint (its last, or with the forgetting guard's stop its last within the
    bound) into <extension dir>/export, verified on reload and scored on the test split like the winner
    (raycpt.results.export.export_winner); the card's lineage says where and why a guard stopped it. Returns the
    card."""
    row = extension_row(ext, result.metrics, result.checkpoint)
    base = read_json(ext.exp_dir / BASE_METRICS_FILE) if (ext.exp_dir / BASE_METRICS_FILE).exists() else {}
    lineage = ext.lineage()
    reasons = [f"Trial {ext.trial_id}{' (the sweep winner)' if ext.winner else ''} continued from its pre-decay "
               f"checkpoint ({lineage['steps_at_checkpoint']} steps, {ext.tokens_at_checkpoint} tokens) to "
               f"{ext.steps} steps, {ext.tokens} tokens (the trial trained {ext.tokens_before}), under "
               f"{ext.cfg.train.schedule} (decay over the last {ext.cfg.train.decay_fraction:g} of the run, "
               f"{ext.cfg.train.decay_shape}); {ext.why}."]
    if result.stopped:
        reasons.append(f"The forgetting guard ended it early: {result.stopped}.")
    selection = Selection(ext.trial_id, reasons=reasons)
    vs_trial = {k.removeprefix(VS_BEST_PREFIX): v for k, v in row.items() if k.startswith(VS_BEST_PREFIX)}
    return export_winner(ext.exp_dir, ext.cfg, row, base, selection, force=force,
                         export_dir=Path(ext.out_dir) / EXPORT_DIR,
                         lineage={"extension": {**lineage, "stopped": result.stopped,
                                                "forgetting_warnings": result.warned}, VS_TRIAL: vs_trial})
