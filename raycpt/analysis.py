"""Read a finished or interrupted sweep from disk, rank trials, apply the selection rule, export the winner.

`select_winner` is a pure function of a DataFrame (one row per trial) and the base metrics: testable without Ray.
"""

from __future__ import annotations

import json
import math
import platform
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from raycpt.config import ExperimentConfig, SelectConfig, config_from_dict, to_dict
from raycpt.errors import InputError
from raycpt.files import read_json, write_json

EXPORT_FILES = ("config.json", "generation_config.json", "model.safetensors")


def _error_line(trial_path: Path) -> str:
    error = trial_path / "error.txt"
    if not error.exists():
        return ""
    lines = [ln.strip() for ln in error.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1][:200] if lines else "failed"


def flatten_result(result: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Tune may nest metrics whose names hold '/'; flatten them back to 'a/b/c'."""
    flat: dict[str, Any] = {}
    for key, value in result.items():
        if isinstance(value, dict) and key != "config":
            flat.update(flatten_result(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def collect_trials(exp_dir: Path) -> pd.DataFrame:
    """One row per trial: id, status, sampled hyperparameters, last metrics, checkpoint path, error line."""
    from ray.tune import ExperimentAnalysis

    tune_dir = Path(exp_dir).resolve() / "tune"  # Tune needs an absolute path (a URI)
    if not tune_dir.exists():
        raise InputError(f"{exp_dir}: no sweep found (expected {tune_dir}); run `raycpt sweep CONFIG` first")
    analysis = ExperimentAnalysis(str(tune_dir))
    rows = []
    for trial in analysis.trials:
        last = trial.last_result or {}
        error = _error_line(Path(trial.path)) if trial.status == "ERROR" else ""
        if trial.status == "ERROR":
            status = "failed"
        elif last.get("finished"):
            status = "finished"
        elif trial.status == "TERMINATED" and last.get("step"):
            status = "stopped"
        elif trial.status in ("RUNNING", "PENDING") and last.get("step"):
            status = "running"  # a live (or interrupted) sweep: Tune reloads running trials as PENDING
        else:
            status = trial.status.lower()
        row = {"trial_id": trial.trial_id, "status": status, "error": error, "path": trial.path,
               "reports": last.get("training_iteration", 0)}
        row.update({f"hp/{k}": v for k, v in (trial.config.get("train_loop_config") or {}).items()})
        for key in ("step", "tokens", "train/loss", "eval/domain_loss", "eval/domain_ppl", "eval/general_loss",
                    "eval/general_ppl", "eval/f1", "eval/f1_sd", "eval/accuracy", "data/domain_fraction",
                    "perf/tokens_per_s", "perf/mfu", "time/train_s", "checkpoint_path", "time_total_s"):
            row[key] = last.get(key)
        if not row["checkpoint_path"] and trial.checkpoint:  # a one-worker trial: its latest checkpoint, via Tune
            row["checkpoint_path"] = trial.checkpoint.path
        row.update({k: v for k, v in flatten_result(last).items() if k.startswith("eval/f1_class/")})
        rows.append(row)
    return pd.DataFrame(rows)


@dataclass
class Selection:
    trial_id: str | None
    reasons: list[str] = field(default_factory=list)
    flagged: bool = False
    """True when no trial met the rule and the fallback picked the winner."""
    excluded: dict[str, str] = field(default_factory=dict)
    """trial id -> why the rule excluded it."""
    order: list[str] = field(default_factory=list)
    """All trial ids, best first under the rule."""


def _num(value: Any) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return math.nan
    return value


def select_winner(trials: pd.DataFrame, base: dict[str, Any], rule: SelectConfig) -> Selection:
    """Among finished trials whose general ppl <= (1 + max_forgetting) x base, the highest F1 (ties within
    f1_tolerance broken by lower domain ppl); without F1, the lowest domain ppl. If none qualifies, the lowest
    domain ppl overall, flagged."""
    if trials.empty:
        return Selection(None, ["no trials ran"], flagged=True)
    base_general = _num(base.get("base/general_ppl"))
    bound = (1 + rule.max_forgetting) * base_general if not math.isnan(base_general) else math.inf
    excluded: dict[str, str] = {}
    for row in trials.to_dict("records"):
        general, domain, tid = _num(row.get("eval/general_ppl")), _num(row.get("eval/domain_ppl")), row["trial_id"]
        if row["status"] == "stopped":
            excluded[tid] = f"stopped by the scheduler at step {int(_num(row.get('step')))}"
        elif row["status"] == "failed":
            excluded[tid] = f"failed: {row.get('error') or 'see its error.txt'}"
        elif row["status"] != "finished":
            excluded[tid] = f"status {row['status']}"
        elif math.isnan(domain):
            excluded[tid] = "no held-out metrics"
        elif general > bound:
            excluded[tid] = (f"forgetting: general ppl {general:.2f} > bound {bound:.2f} "
                             f"({1 + rule.max_forgetting:.2f} x base {base_general:.2f})")
    frame = trials.assign(_domain=trials["eval/domain_ppl"].map(_num),
                          _f1=trials.get("eval/f1", pd.Series([None] * len(trials))).map(_num))
    use_f1 = bool(frame["_f1"].notna().any())

    def ranked(candidates: pd.DataFrame) -> list[str]:
        if not use_f1:
            return list(candidates.sort_values("_domain", na_position="last")["trial_id"])
        # Group F1 values that are within tolerance of the best of the remaining, then order by domain ppl.
        order: list[str] = []
        rest = candidates.sort_values(["_f1", "_domain"], ascending=[False, True], na_position="last")
        while not rest.empty:
            top = rest["_f1"].iloc[0]
            tied = rest[(rest["_f1"] >= top - rule.f1_tolerance) | (rest["_f1"].isna() & math.isnan(top))]
            order += list(tied.sort_values("_domain")["trial_id"])
            rest = rest.drop(tied.index)
        return order

    qualified = frame[~frame["trial_id"].isin(excluded)]
    others = frame[frame["trial_id"].isin(excluded)].sort_values("_domain", na_position="last")
    order = ranked(qualified) + list(others["trial_id"])
    if not qualified.empty:
        winner = order[0]
        row = frame.set_index("trial_id").loc[winner]
        if use_f1:
            tied = qualified[qualified["_f1"] >= row["_f1"] - rule.f1_tolerance]
            reason = (f"highest downstream F1 ({row['_f1']:.4f}) among {len(qualified)} finished trial(s) within "
                      f"the forgetting bound")
            if len(tied) > 1:
                reason += (f"; {len(tied) - 1} other(s) within f1_tolerance {rule.f1_tolerance}, tie broken by "
                           f"lower domain ppl ({row['_domain']:.2f})")
        else:
            reason = (f"lowest domain ppl ({row['_domain']:.2f}) among {len(qualified)} finished trial(s) within "
                      f"the forgetting bound (no F1 measured)")
        return Selection(winner, [reason], False, excluded, order)
    fallback = frame.dropna(subset=["_domain"]).sort_values("_domain")
    if fallback.empty:
        return Selection(None, ["no trial reported held-out metrics"], True, excluded, order)
    winner = fallback["trial_id"].iloc[0]
    return Selection(winner, [f"no trial met the rule (finished and general ppl <= {bound:.2f}); fell back to the "
                              f"lowest domain ppl ({fallback['_domain'].iloc[0]:.2f})"], True, excluded,
                     [winner] + [t for t in order if t != winner])


def _versions() -> dict[str, str]:
    import datasets
    import ray
    import sklearn
    import torch
    import transformers

    import raycpt

    return {"raycpt": raycpt.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "ray": ray.__version__, "datasets": datasets.__version__, "scikit-learn": sklearn.__version__,
            "python": platform.python_version()}


def _lift(trial: float, base: float) -> float | None:
    return None if (math.isnan(trial) or math.isnan(base) or base == 0) else (trial - base) / base


def export_winner(exp_dir: Path, cfg: ExperimentConfig, row: dict[str, Any], base: dict[str, Any],
                  selection: Selection, *, force: bool = False) -> dict[str, Any]:
    """Copy the winner's checkpoint into <exp>/export (safetensors + tokenizer + card), then reload it and check
    that it scores the reported held-out ppl."""
    from raycpt.data import load_blocks
    from raycpt.evaluate import heldout_loss, perplexity
    from raycpt.models import load_model, load_tokenizer

    checkpoint = Path(str(row.get("checkpoint_path") or ""))
    if not (checkpoint / "model.safetensors").exists():
        raise InputError(f"trial {row['trial_id']}: its checkpoint {checkpoint} is missing; cannot export it")
    export = exp_dir / "export"
    if export.exists() and any(export.iterdir()):
        if not force:
            raise InputError(f"{export} already holds an export; pass --force to overwrite it")
        shutil.rmtree(export)
    export.mkdir(parents=True)
    for name in EXPORT_FILES:
        if (checkpoint / name).exists():
            shutil.copy2(checkpoint / name, export / name)
    load_tokenizer(cfg.model.source, cfg.model.trust_remote_code).save_pretrained(export)

    trial_cfg = config_from_dict(read_json(checkpoint / "raycpt_config.json"))
    manifest = read_json(exp_dir / "data_manifest.json")
    model = load_model(str(export), trust_remote_code=False)
    reloaded = perplexity(heldout_loss(model, load_blocks(manifest["domain"]["heldout"]),
                                       batch_size=trial_cfg.train.batch_size))
    reported = _num(row.get("eval/domain_ppl"))
    metrics = {k: row.get(k) for k in ("step", "tokens", "eval/domain_ppl", "eval/general_ppl", "eval/f1", "eval/f1_sd",
                                       "eval/accuracy", "data/domain_fraction", "train/loss")}
    metrics["eval/f1_per_class"] = {k.rsplit("/", 1)[1]: v for k, v in row.items()
                                    if k.startswith("eval/f1_class/") and v is not None and not pd.isna(v)}
    card = {
        "model": "continued pre-training of " + cfg.model.source,
        "trial_id": row["trial_id"],
        "selection": {"rule": to_dict(cfg)["select"], "reasons": selection.reasons, "flagged": selection.flagged},
        "hyperparameters": {k[3:]: v for k, v in row.items() if k.startswith("hp/")},
        "metrics": metrics,
        "base": {k: v for k, v in base.items() if k.startswith("base/")},
        "lift": {"domain_ppl": _lift(reported, _num(base.get("base/domain_ppl"))),
                 "f1": _lift(_num(row.get("eval/f1")), _num(base.get("base/f1"))),
                 "general_ppl": _lift(_num(row.get("eval/general_ppl")), _num(base.get("base/general_ppl")))},
        "data_mix": {"mix_ratio": trial_cfg.train.mix_ratio, "realised_domain_fraction":
                     row.get("data/domain_fraction"), "domain": cfg.data.domain, "general": cfg.data.general,
                     "domain_stats": manifest["domain"], "general_stats": manifest["general"],
                     "block_size": trial_cfg.data.block_size},
        "verification": {"reloaded_domain_ppl": reloaded, "reported_domain_ppl": reported,
                         "relative_difference": abs(reloaded - reported) / reported if reported else None},
        "config": to_dict(trial_cfg),
        "seed": {"data": trial_cfg.data.seed, "train": trial_cfg.train.seed},
        "versions": _versions(),
        "lineage": {"base_model": cfg.model.source, "base_model_dir": manifest["model_source"],
                    "checkpoint": str(checkpoint), "experiment_dir": str(exp_dir)},
    }
    write_json(export / "raycpt_card.json", card)
    (export / "README.md").write_text(_card_markdown(card))
    return card


def _fmt(value: Any, digits: int = 2) -> str:
    value = _num(value)
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def _card_markdown(card: dict[str, Any]) -> str:
    m, b = card["metrics"], card["base"]
    hp = "\n".join(f"| {k} | {v} |" for k, v in card["hyperparameters"].items())
    return f"""# {card['model']}

Exported by raycpt from trial `{card['trial_id']}`. {' '.join(card['selection']['reasons'])}

| metric | base | this model |
|---|---|---|
| domain held-out ppl | {_fmt(b.get('base/domain_ppl'))} | {_fmt(m.get('eval/domain_ppl'))} |
| general held-out ppl | {_fmt(b.get('base/general_ppl'))} | {_fmt(m.get('eval/general_ppl'))} |
| downstream macro-F1 | {_fmt(b.get('base/f1'), 4)} | {_fmt(m.get('eval/f1'), 4)} |

| hyperparameter | value |
|---|---|
{hp}

Data: domain `{card['data_mix']['domain']}`, general `{card['data_mix']['general']}`, mix ratio
{card['data_mix']['mix_ratio']} (realised {_fmt(card['data_mix']['realised_domain_fraction'], 3)}).

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("<this dir>")
tokenizer = AutoTokenizer.from_pretrained("<this dir>")
```

Versions: {json.dumps(card['versions'])}
"""


def analyze(exp_dir: Path, cfg: ExperimentConfig | None = None, *, console=None, export: bool = True,
            force: bool = False) -> dict[str, Any]:
    """Collect trials, apply the rule, print the summary, optionally export. Returns the summary dict."""
    from raycpt import report

    exp_dir = Path(exp_dir)
    cfg = cfg or config_from_dict(read_json(exp_dir / "raycpt_config.json"))
    base = read_json(exp_dir / "base_metrics.json") if (exp_dir / "base_metrics.json").exists() else {}
    trials = collect_trials(exp_dir)
    selection = select_winner(trials, base, cfg.select)
    card = None
    if export and selection.trial_id is not None:
        row = trials.set_index("trial_id").loc[selection.trial_id].to_dict()
        row["trial_id"] = selection.trial_id
        card = export_winner(exp_dir, cfg, row, base, selection, force=force)
    summary = {"experiment_dir": str(exp_dir), "base": base, "winner": selection.trial_id,
               "reasons": selection.reasons, "flagged": selection.flagged, "excluded": selection.excluded,
               "order": selection.order, "trials": json.loads(trials.to_json(orient="records")),
               "export": str(exp_dir / "export") if card else None,
               "verification": card["verification"] if card else None,
               "experiment_dir_bytes": sum(f.stat().st_size for f in exp_dir.rglob("*") if f.is_file())}
    if console is not None:
        report.print_summary(console, summary)
    return summary
