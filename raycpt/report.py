"""What people read in the terminal: data and base summaries, one line per trial report, the final table."""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console
from rich.panel import Panel
from rich.table import Table


def make_console() -> Console:
    return Console(highlight=False)


def _f(value: Any, digits: int = 2) -> str:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return "-"
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


def print_data(console: Console, manifest: dict[str, Any]) -> None:
    for name in ("domain", "general"):
        corpus = manifest.get(name)
        if corpus:
            removed = corpus["removed_for_leakage"]
            console.print(f"[bold]{name:>7}[/]: {corpus['documents']:,} documents, {corpus['train_tokens']:,} "
                          f"training tokens, {corpus['heldout_tokens']:,} held-out tokens"
                          + (f", {removed} downstream-test text(s) removed" if removed else ""))


def print_base(console: Console, base: dict[str, Any]) -> None:
    console.print(f"[bold]   base[/]: domain ppl {_f(base.get('base/domain_ppl'))}, general ppl "
                  f"{_f(base.get('base/general_ppl'))}"
                  + (f", F1 {_f(base.get('base/f1'), 4)}" if base.get("base/f1") is not None else ""))


def trial_line_callback():
    """A Tune callback printing one line per trial report (Ray's own tables go to its log files). The console is
    made on first use and not pickled with the Tuner's state."""
    from ray.tune import Callback

    class TrialLines(Callback):
        _console: Console | None = None

        def __getstate__(self):
            return {}

        @property
        def console(self) -> Console:
            if self._console is None:
                self._console = make_console()
            return self._console

        def on_trial_result(self, iteration, trials, trial, result, **info):
            hps = ", ".join(f"{k.split('.')[-1]}={_short(v)}" for k, v in
                            (trial.config.get("train_loop_config") or {}).items())
            self.console.print(f"  {trial.trial_id} step {result.get('step', '?'):>4}  domain ppl "
                               f"{_f(result.get('eval/domain_ppl')):>8}  general ppl "
                               f"{_f(result.get('eval/general_ppl')):>8}  "
                               f"{_f(result.get('perf/tokens_per_s'), 0)} tok/s  [dim]{hps}[/]")

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.console.print(f"  {trial.trial_id} done")

        def on_trial_error(self, iteration, trials, trial, **info):
            self.console.print(f"  [red]{trial.trial_id} failed[/] (see {trial.path}/error.txt)")

    return TrialLines()


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def print_summary(console: Console, summary: dict[str, Any]) -> None:
    base = summary["base"]
    trials = {t["trial_id"]: t for t in summary["trials"]}
    hp_keys = sorted({k for t in summary["trials"] for k in t if k.startswith("hp/")})
    table = Table(title="Trials (best first under the selection rule)", header_style="bold")
    table.add_column("")
    table.add_column("trial")
    for key in hp_keys:
        table.add_column(key[3:].split(".")[-1], justify="right")
    for name in ("status", "step", "domain ppl", "general ppl", "F1"):
        table.add_column(name, justify="right" if name != "status" else "left")
    table.add_row("", "base model", *[""] * len(hp_keys), "-", "0", _f(base.get("base/domain_ppl")),
                  _f(base.get("base/general_ppl")), _f(base.get("base/f1"), 4), style="dim")
    for tid in summary["order"]:
        t = trials[tid]
        is_winner = tid == summary["winner"]
        status = t["status"] if t["status"] != "stopped" else f"stopped (ASHA) at step {t.get('step')}"
        table.add_row("★" if is_winner else "", tid, *[_short(t.get(k)) for k in hp_keys], status,
                      str(t.get("step") or "-"), _f(t.get("eval/domain_ppl")), _f(t.get("eval/general_ppl")),
                      _f(t.get("eval/f1"), 4), style="bold green" if is_winner else None)
    console.print(table)
    if summary["winner"] is None:
        console.print("[red]No winner:[/] " + "; ".join(summary["reasons"]))
        return
    w = trials[summary["winner"]]
    lines = [("[yellow]FLAGGED: [/]" if summary["flagged"] else "") + "; ".join(summary["reasons"])]
    for key, label in (("domain_ppl", "domain ppl"), ("general_ppl", "general ppl")):
        b, v = base.get(f"base/{key}"), w.get(f"eval/{key}")
        if b is not None and v is not None:
            lines.append(f"{label}: {_f(b)} → {_f(v)} ({(v - b) / b:+.1%} vs base)")
    if summary.get("export"):
        ver = summary.get("verification") or {}
        lines.append(f"exported to {summary['export']} (reloaded domain ppl {_f(ver.get('reloaded_domain_ppl'), 3)})")
        lines.append(f'AutoModelForCausalLM.from_pretrained("{summary["export"]}")')
    console.print(Panel("\n".join(lines), title=f"Winner: {summary['winner']}", expand=False))
