"""`raycpt report` shows each `raycpt extend` continuation as its own row, below the trial it continued: in the
terminal table, the markdown and the json report (`extensions`). The extensions are fakes written next to the
recorded smoke sweep (tests/fixtures/smoke_sweep, copied per module by the `sweep_dir` fixture): an exported one
(its card, as raycpt.results.extension writes it) and one that has not been exported yet (its extension.json)."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from raycpt.core import metrics
from raycpt.core.extend import EXTENSION_FILE, extension_dir
from raycpt.core.files import write_json
from raycpt.results import format as fmt
from raycpt.results import render
from raycpt.results.export import CARD_FILE, EXPORT_DIR
from raycpt.results.summary import analyze, collect_extensions

TOKENS_BEFORE, TOKENS_AFTER, STEPS_AFTER = 12288, 65536, 128
CARD_METRICS = {metrics.STEP: STEPS_AFTER, metrics.TOKENS: TOKENS_AFTER,
                metrics.DOMAIN_PPL: 5234.6, metrics.DOMAIN_PPL + metrics.CI_LOW: 5100.2,
                metrics.DOMAIN_PPL + metrics.CI_HIGH: 5400.9,
                metrics.GENERAL_PPL: 7001.0, metrics.GENERAL_PPL + metrics.CI_LOW: 6800.0,
                metrics.GENERAL_PPL + metrics.CI_HIGH: 7200.0,
                metrics.F1: 0.6123, metrics.F1 + metrics.CI_LOW: 0.55, metrics.F1 + metrics.CI_HIGH: 0.67,
                "eval/f1_per_class": {"fresh": 0.7, "rotten": 0.5}}


def _lineage(trial_id: str, winner: bool, tokens_after: int) -> dict:
    """raycpt.core.extend.Extension.lineage, trimmed to what the report reads."""
    return {"trial_id": trial_id, "winner": winner, "tokens_before": TOKENS_BEFORE, "tokens_after": tokens_after,
            "steps_before": 24, "steps_after": tokens_after // 512,
            "schedule": {"schedule": "wsd", "lr": 3e-4, "warmup_steps": 2, "decay_fraction": 0.2,
                         "decay_shape": "1-sqrt", "min_lr_ratio": 0.1, "stable_end_step": 102}}


@pytest.fixture(scope="module")
def extended(sweep_dir):
    """The recorded sweep with two extensions: the winner's, exported, and a stopped trial's, not exported yet."""
    summary = analyze(sweep_dir, export=False)
    other = next(t["trial_id"] for t in summary.trials if t["trial_id"] != summary.winner)
    exported = extension_dir(sweep_dir, summary.winner, TOKENS_AFTER)
    card = {"trial_id": summary.winner, "metrics": CARD_METRICS,
            "lift": {metrics.lift_name(metrics.F1): 0.04, metrics.lift_name(metrics.F1) + metrics.CI_LOW: -0.01,
                     metrics.lift_name(metrics.F1) + metrics.CI_HIGH: 0.09},
            "test": {metrics.test_name(metrics.F1): 0.6, "test/domain_block_losses": [1.0, 2.0]},
            "test_verdict": "not significant: ...", "verification": {"ok": True},
            "lineage": {"base_model": "packaged:tiny-gpt2", "checkpoint": "/x",
                        "extension": {**_lineage(summary.winner, True, TOKENS_AFTER), "stopped": None,
                                      "forgetting_warnings": []},
                        "vs_trial": {"f1": 0.02, "domain_ppl": -0.1}}}
    (exported / EXPORT_DIR).mkdir(parents=True)
    write_json(exported / EXPORT_DIR / CARD_FILE, card)
    pending = extension_dir(sweep_dir, other, 2 * TOKENS_AFTER)
    pending.mkdir()
    write_json(pending / EXTENSION_FILE, _lineage(other, False, 2 * TOKENS_AFTER))
    (sweep_dir / "extend-not-one").mkdir()  # no lineage: not an extension
    return summary.winner, other


def test_collect_extensions_reads_cards_and_unexported_lineages(sweep_dir, extended):
    winner, other = extended
    found = {ext["trial_id"]: ext for ext in collect_extensions(sweep_dir)}
    assert set(found) == {winner, other}
    done, pending = found[winner], found[other]
    assert done["export"] == str(extension_dir(sweep_dir, winner, TOKENS_AFTER) / EXPORT_DIR)
    assert done["tokens_before"] == TOKENS_BEFORE and done["tokens_after"] == TOKENS_AFTER and done["winner"]
    assert done["metrics"][metrics.DOMAIN_PPL] == CARD_METRICS[metrics.DOMAIN_PPL]
    assert "eval/f1_per_class" not in done["metrics"] and done["verified"] is True
    assert pending["export"] is None and pending["metrics"] == {} and pending["tokens_after"] == 2 * TOKENS_AFTER
    assert analyze(sweep_dir, export=False).extensions == collect_extensions(sweep_dir)


def test_report_markdown_shows_each_extension_below_its_trial(sweep_dir, extended, capsys):
    winner, other = extended
    summary = analyze(sweep_dir, export=False)
    ids = fmt.short_ids(summary.order)
    assert render.report_command(sweep_dir, "markdown", Console(file=io.StringIO())) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 1 + len(summary.trials) + 2  # header, separator, base, trials, two extensions
    for tid in (winner, other):
        row = next(i for i, line in enumerate(table) if f"| ↳ {ids[tid]} |" in line)
        assert ids[tid] in table[row - 1] and "↳" not in table[row - 1], "right below its trial"
    ext = next(line for line in table if f"| ↳ {ids[winner]} |" in line)
    assert f"| extended from {ids[winner]} (12,288 → 65,536 tokens) |" in ext
    assert f"| steps={STEPS_AFTER} |" in ext
    change = CARD_METRICS[metrics.GENERAL_PPL] / summary.base[metrics.base_name(metrics.GENERAL_PPL)] - 1
    assert "| 5,235 [5100, 5401] |" in ext and f"| 7,001 ({change:+.1%}) |" in ext
    assert "| 0.6123 [0.550, 0.670] |" in ext and "| 65.5k |" in ext
    unexported = next(line for line in table if f"| ↳ {ids[other]} |" in line)
    assert f"extended from {ids[other]} (12,288 → 131,072 tokens); not exported yet" in unexported


def test_report_json_lists_extensions_as_documented(sweep_dir, extended, capsys):
    winner, other = extended
    assert render.report_command(sweep_dir, "json", Console(file=io.StringIO())) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) == set(render.REPORT_SCHEMA) - {"trial"}
    assert [e["trial_id"] for e in data["extensions"]] == [winner, other]  # under their trials' ranks
    done, pending = data["extensions"]
    for ext in data["extensions"]:
        for key in ext:
            assert key in render.REPORT_SCHEMA["extensions"], f"{key} is undocumented"
    assert done["status"] == f"extended from {winner} (12,288 → 65,536 tokens)" and done["trial_winner"]
    assert done["tokens_before"] == TOKENS_BEFORE and done["tokens_after"] == TOKENS_AFTER
    assert done["steps_after"] == STEPS_AFTER and done["schedule"]["schedule"] == "wsd"
    assert done["domain_ppl"] == 5234.6 and done["domain_ppl_ci_low"] == 5100.2
    assert done["general_ppl_ci_high"] == 7200.0 and done["f1"] == 0.6123 and done["f1_ci_low"] == 0.55
    assert done["forgetting"] == pytest.approx(7001.0 / data["base"]["general_ppl"] - 1)
    assert done["lift"]["f1"] == 0.04 and done["vs_trial"] == {"f1": 0.02, "domain_ppl": -0.1}
    assert done["test"] == {metrics.test_name(metrics.F1): 0.6} and done["verified"] is True
    assert done["export"] == str(extension_dir(sweep_dir, winner, TOKENS_AFTER) / EXPORT_DIR)
    assert pending["export"] is None and pending["domain_ppl"] is None and pending["test"] is None
    assert pending["status"].endswith("; not exported yet")


@pytest.mark.parametrize("width", [80, 120])
def test_terminal_table_shows_extensions_and_still_fits(sweep_dir, extended, width):
    winner, _ = extended
    summary = analyze(sweep_dir, export=False)
    console = Console(width=width, record=True, file=io.StringIO(), highlight=False)
    console.print(render.summary_table(summary))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= width
    assert f"↳ {fmt.short_ids(summary.order)[winner]}" in text and "extended from" in text
    assert "↳: the trial above continued by `raycpt extend`" in " ".join(text.split())
