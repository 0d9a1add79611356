"""Number and name formatting shared by every renderer (terminal tables, markdown, JSON, plots, live progress):
one place decides how a perplexity, a token count or a duration reads."""

from __future__ import annotations

import math
import os
from typing import Any

from rich.console import Console


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


def hp_keys(trials: list[dict[str, Any]]) -> list[str]:
    return sorted({k for t in trials for k in t if k.startswith("hp/")})

