"""Number and name formatting shared by every renderer (terminal tables, markdown, JSON, plots, live progress):
one place decides how a perplexity, a token count or a duration reads."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

from rich.console import Console

from raycpt.core import metrics


def make_console() -> Console:
    console = Console(highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        # Logs and CI have no width: rich would assume 80 columns and wrap every table row.
        console = Console(highlight=False, width=120)
    return console


def num(value: Any) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return math.nan
    return value


def interval_text(values: dict[str, Any], name: str, fmt: Callable[[Any], str]) -> str:
    """'0.721 [0.690, 0.752]' from a metric and its `_ci_low`/`_ci_high` in `values`, each formatted by `fmt` (just
    the value when it has no interval; '-' without a value)."""
    value = values.get(name)
    if value is None:
        return "-"
    low, high = values.get(name + metrics.CI_LOW), values.get(name + metrics.CI_HIGH)
    return fmt(value) + (f" [{fmt(low)}, {fmt(high)}]" if low is not None and high is not None else "")


def fixed(value: Any, digits: int = 2) -> str:
    value = num(value)
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


def ppl_text(value: Any) -> str:
    """Perplexities span 5 to 50,000 between a tiny random model and a trained one: keep about 4 significant
    digits so columns stay narrow."""
    value = num(value)
    if math.isnan(value):
        return "-"
    if value >= 1000:
        return f"{value:,.0f}"
    return f"{value:.1f}" if value >= 100 else f"{value:.2f}"


def tokens_text(value: Any) -> str:
    value = num(value)
    if math.isnan(value):
        return "-"
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= limit:
            return f"{value / limit:.1f}{suffix}"
    return f"{value:.0f}"


def duration(seconds: Any) -> str:
    """49s, 3m12s, 1h05m."""
    seconds = num(seconds)
    if math.isnan(seconds):
        return "-"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def as_int(value: Any) -> int | None:
    """Steps and token counts come back from pandas as floats when any trial lacks them: show 24, not 24.0."""
    value = num(value)
    return None if math.isnan(value) else int(value)


def relative_change(value: Any, base: Any) -> float | None:
    value, base = num(value), num(base)
    return None if math.isnan(value) or math.isnan(base) or base == 0 else (value - base) / base


def short_value(value: Any) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.3g}"
    return "-" if value is None else str(value)


def sig_text(value: Any, digits: int = 3, scientific: bool | None = None) -> str:
    """`value` rounded to `digits` significant digits, in the shorter of fixed and scientific notation (or the one
    `scientific` asks for), trailing zeros dropped: 3.0812e-4 -> '3.08e-4', 0.82 -> '0.82', 12.0 -> '12'. Never
    cut: the text always reads back as the value rounded to the digits it shows."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    value = float(value)
    if value.is_integer() and abs(value) < 1e6:  # steps, sizes, seeds: whole, even from pandas' floats
        return str(int(value))
    if math.isinf(value):
        return f"{value:g}"
    mantissa, exponent = f"{value:.{digits - 1}e}".split("e")
    exponent_value = int(exponent)
    if "." in mantissa:
        mantissa = mantissa.rstrip("0").rstrip(".")
    scientific_text = f"{mantissa}e{exponent_value}"
    fixed_text = f"{float(f'{value:.{digits - 1}e}'):.{max(0, digits - 1 - exponent_value)}f}"
    if "." in fixed_text:
        fixed_text = fixed_text.rstrip("0").rstrip(".")
    if scientific is None:
        scientific = len(fixed_text) > len(scientific_text)
    return scientific_text if scientific else fixed_text


def distinct_texts(values: list[Any], digits: int = 2) -> list[str]:
    """`sig_text` of every value with the fewest significant digits (at least `digits`) that keep distinct values
    distinct: swept learning rates 3.081e-4 and 3.084e-4 read '3.081e-4' and '3.084e-4', not both '3.08e-4'."""
    numbers = {float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)
               and not math.isnan(v)}
    for precision in range(digits, 18):
        if len({sig_text(v, precision) for v in numbers}) == len(numbers):
            break
    # one notation per column: learning rates 3.1e-4 and 1.2e-3, not 3.1e-4 and 0.0012
    scientific = any("e" in sig_text(v, precision) for v in numbers) or None
    return [sig_text(v, precision, scientific if isinstance(v, float) and abs(v) < 1 else None) for v in values]



def short_ids(trial_ids: list[str]) -> dict[str, str]:
    """'46b34_00002' -> '00002' when every id shares the '46b34_' prefix (Tune's experiment id): the suffix still
    matches the trial's directories with grep, and the table loses 6 characters per row."""
    prefixes = {tid.rsplit("_", 1)[0] for tid in trial_ids if "_" in tid}
    if len(prefixes) != 1 or not all("_" in tid for tid in trial_ids):
        return {tid: tid for tid in trial_ids}
    return {tid: tid.rsplit("_", 1)[1] for tid in trial_ids}


def hp_labels(keys: list[str]) -> dict[str, str]:
    """'hp/train.lr' -> 'lr'; the section stays when two fields share a name (data.seed vs train.seed)."""
    names = [key[3:] for key in keys]
    last = [name.rsplit(".", 1)[-1] for name in names]
    return {key: (tail if last.count(tail) == 1 else name) for key, name, tail in zip(keys, names, last, strict=True)}


HP_SHORT_NAMES = {
    "train.lr": "lr", "train.steps": "steps", "train.warmup_steps": "warmup", "train.min_lr_ratio": "min_lr",
    "train.dropout": "drop", "train.mix_ratio": "mix", "train.weight_decay": "wd", "train.batch_size": "batch",
    "train.grad_accum": "accum", "train.global_batch_size": "gbatch", "train.grad_clip": "clip",
    "train.early_stopping_patience": "patience", "train.eval_every": "eval_every", "data.block_size": "block",
}
"""Short names of the usual swept fields, in the order tables list them (others follow, alphabetically)."""


def hp_order(keys: list[str]) -> list[str]:
    """'hp/...' keys in reading order: learning rate, steps, dropout, mix first (HP_SHORT_NAMES), then the rest."""
    known = list(HP_SHORT_NAMES)
    return sorted(keys, key=lambda k: (known.index(k[3:]) if k[3:] in known else len(known), k))


def hp_short_labels(keys: list[str]) -> dict[str, str]:
    """'hp/train.mix_ratio' -> 'mix' (HP_SHORT_NAMES), other fields as `hp_labels` names them; a short name two
    keys would share falls back to the `hp_labels` name."""
    long = hp_labels(keys)
    short = {key: HP_SHORT_NAMES.get(key[3:], long[key]) for key in keys}
    taken = list(short.values())
    return {key: name if taken.count(name) == 1 else long[key] for key, name in short.items()}


def hp_keys(trials: list[dict[str, Any]]) -> list[str]:
    return sorted({k for t in trials for k in t if k.startswith("hp/")})



GENERATION_LABELS = {metrics.GEN_BLEU: ("BLEU", 2), metrics.GEN_CHRF: ("chrF", 2), metrics.GEN_ROUGE_L: ("ROUGE-L", 4)}
"""Generation scores: their label and the digits they are shown with (BLEU and chrF are 0-100, ROUGE-L F 0-1)."""


def splitless_label(name: str) -> tuple[str, int]:
    """(label, digits) of a split-less score (metrics.SPLITLESS_PREFIXES), its split prefix already removed:
    'lm_eval/hellaswag/acc_norm' -> ('hellaswag acc_norm', 4), 'gen/bleu' -> ('BLEU', 2)."""
    if name in GENERATION_LABELS:
        return GENERATION_LABELS[name]
    return name.removeprefix(metrics.LM_EVAL_PREFIX).replace("/", " "), 4


def splitless_names(rows: list[dict[str, Any]], prefix: str = "") -> list[str]:
    """The split-less scores (lm-eval tasks, generation) any of `rows` has under `prefix` ('' for trial rows,
    'base/', 'test/'), without the prefix and without their interval names, in a stable order."""
    found = {key.removeprefix(prefix) for row in rows for key, value in row.items()
             if key.startswith(prefix) and value is not None and not isinstance(value, (list, dict))}
    names = [n for n in found if n.startswith(metrics.SPLITLESS_PREFIXES)
             and not n.endswith((metrics.CI_LOW, metrics.CI_HIGH))]
    generation = [n for n in metrics.GENERATION if n in names]
    return sorted(n for n in names if n not in generation) + generation
