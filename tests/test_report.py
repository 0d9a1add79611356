"""What people read about a sweep: the final table, `raycpt report` (table | json | markdown), the live progress
callback, Ray's output routing, the logger callbacks and the PNG plots.

Most tests read a recorded smoke sweep (tests/fixtures/smoke_sweep: Tune's JSON state and result files, no
checkpoints or weights), copied to a fresh path first so that the paths recorded inside it point elsewhere, as
they do on any machine but the one that ran it. Re-record it from a fresh smoke sweep with:

    raycpt sweep experiments/smoke.yaml --set storage_path=/tmp/runs-report --force
    python tests/test_report.py /tmp/runs-report/smoke
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console

from raycpt.core.errors import InputError
from raycpt.edge import callbacks, ray_output
from raycpt.results import format as fmt
from raycpt.results import progress, render
from raycpt.results.summary import Summary

FIXTURE = Path(__file__).parent / "fixtures" / "smoke_sweep"


def record_fixture(src: Path, dst: Path = FIXTURE) -> None:
    """Copy the small JSON/CSV files of a finished smoke sweep: enough for ExperimentAnalysis, reports and plots."""
    shutil.rmtree(dst, ignore_errors=True)
    (dst / "tune").mkdir(parents=True)
    for name in ("raycpt_config.json", "base_metrics.json"):
        shutil.copy2(src / name, dst / name)
    (dst / "export").mkdir()
    shutil.copy2(src / "export" / "raycpt_card.json", dst / "export" / "raycpt_card.json")
    for state in (src / "tune").glob("experiment_state-*.json"):  # the searcher's pickled state is not needed
        shutil.copy2(state, dst / "tune" / state.name)
    for trial in (src / "tune").iterdir():
        if trial.is_dir():
            (dst / "tune" / trial.name).mkdir()
            for name in ("params.json", "result.json", "progress.csv", "error.txt"):
                if (trial / name).exists():
                    shutil.copy2(trial / name, dst / "tune" / trial.name / name)


def rendered(renderable, width: int = 100) -> str:
    console = Console(width=width, record=True, file=io.StringIO(), highlight=False)
    console.print(renderable)
    return console.export_text()


# -- the recorded sweep and its summary --------------------------------------------------------------------------


def test_recorded_sweep_loads_from_another_path(sweep_dir, summary):
    statuses = sorted(t["status"] for t in summary.trials)
    assert statuses == ["finished", "stopped", "stopped"]
    # Tune's recorded trial paths were absolute: they must now point into the moved copy.
    assert all(Path(t["path"]).is_relative_to(sweep_dir) for t in summary.trials)
    assert summary.winner is not None and summary.base["base/f1"] is not None
    assert all(t["eval/f1"] is not None for t in summary.trials if t["status"] == "finished")


@pytest.mark.parametrize("width", [100, 120])
def test_table_fits_the_terminal(summary, width):
    lines = rendered(render.summary_table(summary), width=width).splitlines()
    assert max(len(line) for line in lines) <= width
    if width == 120:  # title, header, rule, base, one line per trial, note: no row wraps
        assert len(lines) == 5 + len(summary.trials)


def test_table_has_base_row_then_trials_in_rule_order_with_winner_starred(summary):
    text = rendered(render.summary_table(summary), width=120)
    lines = text.splitlines()
    ids = fmt.short_ids(summary.order)
    rows = [next(i for i, line in enumerate(lines) if f" {ids[tid]} " in line) for tid in summary.order]
    base_row = next(i for i, line in enumerate(lines) if "base model" in line)
    assert base_row < rows[0] and rows == sorted(rows), "base first, then trials best first"
    winner_line = lines[rows[0]]
    assert winner_line.lstrip().startswith("★") and ids[summary.winner] in winner_line
    assert sum("★" in line for line in lines) == 1
    stopped = next(t for t in summary.trials if t["status"] == "stopped")
    assert f"stopped by ASHA at step {stopped['step']}" in lines[rows[summary.order.index(stopped["trial_id"])]]
    # forgetting vs base, in percent, next to each trial's general ppl
    winner = next(t for t in summary.trials if t["trial_id"] == summary.winner)
    change = winner["eval/general_ppl"] / summary.base["base/general_ppl"] - 1
    assert f"({change:+.1%})" in winner_line
    assert f"{winner['eval/f1']:.4f}" in winner_line


def test_hyperparameters_are_named_by_field_and_abbreviated_with_a_legend_when_narrow(summary):
    wide = rendered(render.summary_table(summary), width=140)
    assert "lr=" in wide and "mix_ratio=" in wide and "train." not in wide
    narrow = rendered(render.summary_table(summary), width=80)
    assert "mix=" in narrow and "mix_ratio=" not in narrow
    assert "hyperparameters: mix = train.mix_ratio" in narrow


def test_report_command_table_shows_export_and_how_to_load_it(sweep_dir, capsys):
    console = Console(width=200, record=True, file=io.StringIO(), highlight=False)  # long tmp paths stay on a line
    assert render.report_command(sweep_dir, "table", console) == 0
    text = console.export_text()
    export = str(sweep_dir / "export")
    assert "Winner:" in text and f"Exported to {export}" in text
    assert f'path = "{export}"' in text
    assert "model = AutoModelForCausalLM.from_pretrained(path)" in text
    assert "tokenizer = AutoTokenizer.from_pretrained(path)" in text
    assert not (sweep_dir / "export" / "model.safetensors").exists(), "report never exports"


def test_report_json_follows_the_documented_schema(sweep_dir, summary, capsys):
    assert render.report_command(sweep_dir, "json", Console(file=io.StringIO())) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) == set(render.REPORT_SCHEMA) - {"trial"}
    assert data["schema_version"] == render.REPORT_SCHEMA_VERSION
    trial_keys = {"rank", "trial_id", "winner", "status", "excluded", "error", "hyperparameters", "step", "tokens",
                  "time_s", "domain_ppl", "general_ppl", "forgetting", "domain_ppl_change", "f1", "f1_sd", "accuracy",
                  "f1_ci_low", "f1_ci_high", "domain_ppl_ci_low", "domain_ppl_ci_high", "lift", "vs_best"}
    for t in data["trials"]:
        assert trial_keys <= set(t)
        for key in t:
            assert key in render.REPORT_SCHEMA["trial"], f"{key} is undocumented"
    assert [t["trial_id"] for t in data["trials"]] == summary.order
    assert [t["rank"] for t in data["trials"]] == list(range(1, len(summary.order) + 1))
    assert [t["trial_id"] for t in data["trials"] if t["winner"]] == [data["selection"]["winner"]]
    assert data["complete"] and data["counts"] == {"finished": 1, "stopped": 2}
    assert data["selection"]["rule"]["max_forgetting"] == pytest.approx(0.10)
    assert data["export"] == {"path": str(sweep_dir / "export"), "trial_id": summary.winner}
    top = data["trials"][0]
    assert top["forgetting"] == pytest.approx(top["general_ppl"] / data["base"]["general_ppl"] - 1)
    assert top["hyperparameters"].keys() == {"train.lr", "train.mix_ratio"}
    assert next(t for t in data["trials"] if t["status"] == "stopped")["excluded"].startswith("stopped")


def test_report_markdown_is_a_table_with_the_winner_in_bold(sweep_dir, summary, capsys):
    assert render.report_command(sweep_dir, "markdown", Console(file=io.StringIO())) == 0
    text = capsys.readouterr().out
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 1 + len(summary.trials)  # header, separator, base, trials
    assert "_base model_" in table[2]
    assert table[3].startswith("| **★** |") and fmt.short_ids(summary.order)[summary.winner] in table[3]
    assert "```python" in text and "from_pretrained" in text


def test_report_before_tune_wrote_state_is_a_clear_error(sweep_dir, tmp_path):
    shutil.copy2(sweep_dir / "raycpt_config.json", tmp_path / "raycpt_config.json")
    with pytest.raises(InputError, match="no sweep found"):
        render.report_command(tmp_path, "table", Console(file=io.StringIO()))
    (tmp_path / "tune").mkdir()  # the sweep started but Tune has not saved its first state
    with pytest.raises(InputError, match="no trial state"):
        render.report_command(tmp_path, "json", Console(file=io.StringIO()))
    with pytest.raises(InputError, match="not a raycpt experiment"):
        render.report_command(tmp_path / "nowhere", "table", Console(file=io.StringIO()))


def test_report_on_a_running_sweep_shows_running_trials_and_says_it_is_provisional(sweep_dir, tmp_path, capsys):
    running = tmp_path / "smoke"
    shutil.copytree(sweep_dir, running)
    (running / "export").rename(tmp_path / "no-export-yet")
    # Mid-sweep, Tune's snapshot holds the trials as RUNNING (and loads them back as PENDING).
    state = next((running / "tune").glob("experiment_state-*.json"))
    state.write_text(state.read_text().replace('\\"status\\": \\"TERMINATED\\"', '\\"status\\": \\"RUNNING\\"'))
    assert render.report_command(running, "json", Console(file=io.StringIO())) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["counts"] == {"finished": 1, "running": 2} and not data["complete"] and data["export"] is None
    console = Console(width=120, record=True, file=io.StringIO(), highlight=False)
    render.report_command(running, "table", console)
    text = console.export_text()
    assert "Sweep in progress (1 finished, 2 running)" in text and "provisional" in text
    assert "running (step 6)" in text


def test_json_of_a_running_sweep_counts_trials_not_created_yet(summary):
    running = Summary.from_dict(json.loads(json.dumps(summary.to_dict())))
    running.trials = running.trials[:2]  # Tune creates trials lazily: the third is not on disk yet
    running.trials[1]["status"] = "running"
    data = render.report_json(running, expected=render.expected_trials({"num_samples": 1, "space": {
        "train.lr": {"grid": [3e-3, 1e-6, 2e-3]}, "train.mix_ratio": {"choice": [0.5, 0.7, 0.9]}}}))
    assert not data["complete"]
    assert data["counts"]["running"] == 1 and data["counts"]["pending"] == 1


def test_report_without_export_says_how_to_export(summary):
    text = rendered(render.winner_panel(dataclasses.replace(summary, export=None)))
    assert "Not exported yet" in text and "--export" in text


RETIRED_LAW = {"law.form": "power", "law.loo_error": 0.02, "law.best_mix_ratio": 1.0,
               "law.best_mix_ratio_ci": [1.0, 1.0], "law.target_tokens": 61440, "law.lr_region": [1.03e-4, 9.23e-4],
               "law.scope": "lr region 0.000103-0.000923 (3 of 4 trials)",
               "law.describe": "fit from 7 reports of 3 trials (domain law: power, leave-one-trial-out error 2.0%)"}
"""What summary.json held under `law` while raycpt fitted the mixing law (removed for the CPT law's recommendation)."""


@pytest.mark.parametrize("with_recommendation", [True, False], ids=["mixing-and-cpt-law", "mixing-law-only"])
def test_a_summary_json_with_the_retired_mixing_law_still_loads_and_renders(sweep_dir, summary, tmp_path, capsys,
                                                                             with_recommendation):
    """summary.json from earlier raycpt versions (a `law` key; the oldest also without `recommendation` and
    `extensions`): Summary.from_dict drops the key, every renderer works on it, `raycpt report` on the old dir works
    in every format, and `raycpt analyze` writes a summary without it (keeping the old one)."""
    from raycpt import cli

    old_dir = tmp_path / "smoke"
    shutil.copytree(sweep_dir, old_dir)
    raw = {**json.loads(json.dumps(summary.to_dict())), "experiment_dir": str(old_dir), "law": RETIRED_LAW}
    if not with_recommendation:
        del raw["recommendation"], raw["extensions"]
    (old_dir / "summary.json").write_text(json.dumps(raw))

    old = Summary.from_dict(json.loads((old_dir / "summary.json").read_text()))
    assert not hasattr(old, "law") and old.winner == summary.winner
    assert bool(old.recommendation) == with_recommendation
    console = Console(width=160, record=True, file=io.StringIO(), highlight=False)
    render.print_summary(console, old)
    text = console.export_text() + render.summary_markdown(old)
    assert "Winner:" in text and "Mixing law" not in text
    assert ("Final run:" in text) == with_recommendation
    data = render.report_json(old)
    assert set(data) == set(render.REPORT_SCHEMA) - {"trial"} and "law" not in data
    assert data["recommendation"] == (summary.recommendation if with_recommendation else None)

    for form in ("table", "json", "markdown"):
        assert cli.main(["report", str(old_dir), "--format", form]) == 0, form
    out = capsys.readouterr().out
    assert "Mixing law" not in out and '"law"' not in out and "Final run:" in out
    assert cli.main(["analyze", str(old_dir), "--set", "report.plots=false"]) == 0
    assert "law" not in json.loads((old_dir / "summary.json").read_text())
    assert [json.loads(p.read_text())["law"] for p in old_dir.glob("summary-*.json")] == [RETIRED_LAW]


# -- rows for states the recorded sweep does not have -------------------------------------------------------------


def synthetic_summary() -> Summary:
    base = {"base/domain_ppl": 70.0, "base/general_ppl": 30.0, "base/f1": 0.63}
    trials = [
        {"trial_id": "ab12_00000", "status": "finished", "hp/train.lr": 2e-4, "hp/data.seed": 1, "hp/train.seed": 2,
         "step": 24, "tokens": 12288, "eval/domain_ppl": 47.2, "eval/general_ppl": 31.0, "eval/f1": 0.705,
         "time_total_s": 200.0, "error": ""},
        {"trial_id": "ab12_00001", "status": "finished", "hp/train.lr": 1e-3, "hp/data.seed": 1, "hp/train.seed": 2,
         "step": 24, "tokens": 12288, "eval/domain_ppl": 40.0, "eval/general_ppl": 45.0, "eval/f1": 0.71,
         "time_total_s": 3700.0, "error": ""},
        {"trial_id": "ab12_00002", "status": "failed", "hp/train.lr": 5e-3, "hp/data.seed": 1, "hp/train.seed": 2,
         "step": None, "tokens": None, "eval/domain_ppl": None, "eval/general_ppl": None, "eval/f1": None,
         "time_total_s": None, "error": "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB "
                                        "(GPU 0; 79.1 GiB total capacity; 77.0 GiB already allocated)"},
    ]
    return Summary("/runs/demo", base, trials, winner="ab12_00000", reasons=["highest downstream F1"],
                   order=["ab12_00000", "ab12_00001", "ab12_00002"],
                   excluded={"ab12_00001": "forgetting: general ppl 45.00 > bound 33.00",
                             "ab12_00002": "failed: torch.OutOfMemoryError"})


def test_failed_and_forgetting_trials_say_why_in_one_line():
    headers, rows = render.trial_rows(synthetic_summary())
    status = {row.cells[1]: row.cells[headers.index("status")] for row in rows}
    assert status["00001"] == "finished; forgetting"
    assert status["00002"].startswith("failed: torch.OutOfMemoryError") and status["00002"].endswith("…")
    assert "\n" not in status["00002"] and len(status["00002"]) <= 70
    # data.seed and train.seed would both be "seed": they keep their section
    hps = rows[1].cells[headers.index("hyperparameters")]
    assert hps.startswith("lr=2e-4 ") and "data.seed=1" in hps and "train.seed=2" in hps
    assert rows[2].cells[headers.index("time")] == "1h01m" and rows[1].cells[headers.index("time")] == "3m20s"
    assert [row.kind for row in rows] == ["base", "winner", "excluded", "failed"]


def test_f1_column_is_left_out_when_nothing_measured_f1():
    summary = synthetic_summary()
    summary.base.pop("base/f1")
    for t in summary.trials:
        t["eval/f1"] = None
    headers, rows = render.trial_rows(summary)
    assert "F1" not in headers and all(len(row.cells) == len(headers) for row in rows)


# -- the table at 80, 100 and 140 columns --------------------------------------------------------------------------


def four_hp_summary(intervals: bool = False) -> Summary:
    """Four swept hyperparameters; three learning rates differ only in their 4th significant digit."""
    lrs = [3.0812e-4, 3.0847e-4, 3.0871e-4, 5.25e-05, 1.2345e-3]
    statuses = ["finished", "finished", "stopped", "stopped", "failed"]
    trials = []
    for i, (lr, status) in enumerate(zip(lrs, statuses, strict=True)):
        done = status == "finished"
        trial = {"trial_id": f"9f3c1_{i:05d}", "status": status, "hp/train.lr": lr, "hp/train.steps": [12, 8][i % 2],
                 "hp/train.dropout": [0.1, 0.0][i % 2], "hp/train.mix_ratio": 0.6 + 0.08713 * i,
                 "step": 12 if done else 4, "tokens": 6144.0 * (i + 1), "eval/domain_ppl": 64.7 + i * 1.3172,
                 "eval/general_ppl": 42.3 + i * 1.01, "eval/f1": 0.72137 - i * 0.00411 if done else None,
                 "time_total_s": 190.0 + 31 * i,
                 "error": "RuntimeError: loss is NaN at step 3 (try a lower train.lr)" if status == "failed" else ""}
        if intervals and done:
            trial.update({"eval/f1_ci_low": trial["eval/f1"] - 0.0304, "eval/f1_ci_high": trial["eval/f1"] + 0.0281,
                          "eval/domain_ppl_ci_low": trial["eval/domain_ppl"] - 2.13,
                          "eval/domain_ppl_ci_high": trial["eval/domain_ppl"] + 2.31})
        trials.append(trial)
    base = {"base/domain_ppl": 106.2, "base/general_ppl": 45.14, "base/f1": 0.698}
    if intervals:
        base.update({"base/f1_ci_low": 0.671, "base/f1_ci_high": 0.7249, "base/domain_ppl_ci_low": 101.04,
                     "base/domain_ppl_ci_high": 111.33})
    return Summary("/runs/laptop", base, trials, winner="9f3c1_00000", reasons=["highest downstream F1"],
                   order=[t["trial_id"] for t in trials],
                   excluded={"9f3c1_00001": "forgetting: general ppl 43.31 > bound 43.00"})


def _shows(text: str, full: float) -> bool:
    """`text` ('3.081e-4', '64.70', '51,237', '12.3k', '-6.3') is `full` rounded to the digits it shows."""
    scale = {"k": 1e3, "M": 1e6, "G": 1e9}.get(text[-1], 1.0)
    text = text.replace(",", "").rstrip("kMG")
    significant = text.lower().split("e")[0].lstrip("+-").replace(".", "").lstrip("0") or "0"
    return math.isclose(float(text), float(f"{full / scale:.{len(significant)}g}"), rel_tol=1e-12, abs_tol=1e-15)


def _rendered_cells(text: str, widths: list[int], n_rows: int) -> list[list[str]]:
    """Each body row's cells as printed, read back by column position (a cell wrapped over lines is rejoined)."""
    lines = text.splitlines()
    body = lines[next(i for i, line in enumerate(lines) if line.startswith("─")) + 1:]
    body = body[:next(i for i, line in enumerate(body) if line[:1] not in (" ", "★"))]
    starts = [sum(widths[:i]) + 2 * i for i in range(len(widths))]
    rows: list[list[list[str]]] = []
    for line in body:
        pieces = [line[a:a + w].strip() for a, w in zip(starts, widths, strict=True)]
        if pieces[1]:  # the trial column starts a row
            rows.append([[] for _ in widths])
        for cell, piece in zip(rows[-1], pieces, strict=True):
            if piece:
                cell.append(piece)
    assert len(rows) == n_rows
    return [[" ".join(cell) for cell in row] for row in rows]


@pytest.mark.parametrize("width", [80, 100, 140])
@pytest.mark.parametrize("which", ["recorded", "four hyperparameters", "four hyperparameters with intervals"])
def test_table_reads_at_80_100_and_140_columns_and_cuts_nothing(summary, which, width):
    data = {"recorded": summary, "four hyperparameters": four_hp_summary(),
            "four hyperparameters with intervals": four_hp_summary(intervals=True)}[which]
    text = rendered(render.summary_table(data), width=width)
    assert max(len(line) for line in text.splitlines()) <= width
    layout, headers, rows, widths = render.summary_table(data).layout(width)
    assert widths is not None, "a layout fits"
    printed = _rendered_cells(text, widths, len(rows))
    for row, cells in zip(rows, printed, strict=True):
        for header, cell, shown in zip(headers, row.cells, cells, strict=True):
            if header == "status" and row.kind == "failed":  # a long failure reason may fold mid-word
                assert shown.replace(" ", "") == cell.replace(" ", "").replace("\n", "")
            else:  # ids, statuses, every number: whole
                assert shown == " ".join(cell.split()), (header, cell, shown)
    trials = {fmt.short_ids(data.order)[t["trial_id"]]: t for t in data.trials}
    column = {h: i for i, h in enumerate(headers)}
    hp_column = next(h for h in headers if h in render.HP_HEADERS.values())
    names = (fmt.hp_short_labels if layout.names == "short" else fmt.hp_labels)(fmt.hp_keys(data.trials))
    keys = {name: key for key, name in names.items()}
    seen: dict[str, dict[str, float]] = {}
    for row in rows[1:]:
        t = trials[row.cells[1]]
        for token in row.cells[column[hp_column]].split():  # every hyperparameter, to the digits it shows
            name, value = token.split("=")
            assert _shows(value, t[keys[name]]), token
            seen.setdefault(name, {})[value] = t[keys[name]]
        numbers = [(metric, row.cells[column[header]]) for metric, header in
                   (("eval/domain_ppl", "domain ppl"), ("eval/general_ppl", "general ppl"), ("eval/f1", "F1"),
                    ("tokens", "tokens")) if header in column]
        for metric, cell in numbers:
            if t.get(metric) is not None:
                assert _shows(cell.split()[0], t[metric]), (metric, cell)
            if "±" in cell:
                half = (t[metric + "_ci_high"] - t[metric + "_ci_low"]) / 2
                assert _shows(cell.split("±")[1], half), cell
            if "[" in cell:
                low, high = cell.split("[")[1].rstrip("]").split(", ")
                assert _shows(low, t[metric + "_ci_low"]) and _shows(high, t[metric + "_ci_high"]), cell
    for name, values in seen.items():  # distinct values stay distinct
        assert len(values) == len(set(t[keys[name]] for t in data.trials)), (name, values)
    if width == 140:  # the width is used: every column, and the long statuses where they fit
        assert layout.extras and (layout.status == "long" or "intervals" in which)
        assert "intervals" in which or "stopped by ASHA at step" in text
    if layout.names == "short" and "drop=" in text:
        assert "hyperparameters: drop = train.dropout, mix = train.mix_ratio" in text
    if "intervals" in which:
        assert "±0.029" in text or "[0.691, 0.750]" in text, "intervals shown"
    if "tokens" not in headers:
        assert "tokens and time are left out at this width" in text


def test_four_swept_hyperparameters_fit_one_line_per_trial_at_140_and_two_at_80():
    for width, most in ((140, 1), (100, 2), (80, 2)):
        text = rendered(render.summary_table(four_hp_summary()), width=width)
        _, _, rows, widths = render.summary_table(four_hp_summary()).layout(width)
        lines = text.splitlines()
        body = lines[next(i for i, line in enumerate(lines) if line.startswith("─")) + 1:]
        starts = [i for i, line in enumerate(body) if line[:1] in (" ", "★") and line[3:8].strip()]
        finished = starts[:4]  # base and the finished/stopped trials; the failed one may wrap its reason
        assert all(b - a <= most for a, b in zip(finished, finished[1:], strict=False)), (width, text)
    assert "3.081e-4" in text and "3.085e-4" in text and "3.087e-4" in text and "5.25e-5" in text


# -- live progress -----------------------------------------------------------------------------------------------


def fake_trial(trial_id: str, lr: float, tmp_path: Path, **extra) -> SimpleNamespace:
    return SimpleNamespace(trial_id=trial_id, config={"train_loop_config": {"train.lr": lr}}, last_result={},
                           error_file=None, path=str(tmp_path / trial_id), **extra)


def result(step: int, ppl: float, finished: bool = False) -> dict:
    return {"step": step, "eval/domain_ppl": ppl, "eval/general_ppl": ppl + 5, "perf/tokens_per_s": 300.0,
            "time_this_iter_s": 10.0, "finished": finished}


def drive(callback, tmp_path: Path) -> None:
    """Three trials: one finishes, ASHA stops one, one fails."""
    a, b, c = (fake_trial(f"ab12_0000{i}", lr, tmp_path) for i, lr in enumerate((1e-3, 1e-6, 5e-3)))
    error = tmp_path / "error.txt"
    error.write_text("Failure # 1\nTraceback ...\nRuntimeError: loss is NaN at step 3\n")
    c.error_file = str(error)
    callback.setup(total_num_samples=4)
    for trial in (a, b, c):
        callback.on_trial_start(iteration=0, trials=[], trial=trial)
    callback.on_trial_result(iteration=1, trials=[], trial=a, result=result(6, 60.0))
    callback.on_trial_result(iteration=2, trials=[], trial=b, result=result(6, 70.0))
    b.last_result = result(6, 70.0)
    callback.on_trial_complete(iteration=3, trials=[], trial=b)
    callback.on_trial_error(iteration=4, trials=[], trial=c)
    a.last_result = result(12, 50.0, finished=True)
    callback.on_trial_result(iteration=5, trials=[], trial=a, result=a.last_result)
    callback.on_trial_complete(iteration=6, trials=[], trial=a)
    callback.on_step_end(iteration=7, trials=[])


def test_live_view_on_a_terminal_shows_every_state_and_the_best_so_far(tmp_path):
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120, highlight=False)
    callback = callbacks.SweepProgress(console, metric="eval/domain_ppl", mode="min", max_reports=2,
                                       concurrency=1)
    drive(callback, tmp_path)
    callback.on_experiment_end(trials=[])
    callback.close()  # twice is fine: sweep() closes it again after fit()
    text = out.getvalue()
    final = text[text.rindex(" running, ") - 1:]  # the last frame the Live display drew
    assert "0 running, 1 pending, 1 finished, 1 stopped by ASHA, 1 failed" in final
    assert "best eval/domain_ppl 50.00 (00000)" in final
    assert "stopped by ASHA at step 6" in final and "failed: RuntimeError: loss is NaN at step 3" in final
    assert "elapsed" in final and "left" in final


def test_without_a_terminal_it_prints_one_plain_line_per_report(tmp_path):
    out = io.StringIO()
    callback = callbacks.SweepProgress(Console(file=out, width=200, highlight=False),
                                       metric="eval/domain_ppl", mode="min", max_reports=2, concurrency=1)
    drive(callback, tmp_path)
    lines = out.getvalue().splitlines()
    assert "\x1b" not in out.getvalue(), "no cursor movement or colour codes in logs"
    assert sum("domain ppl" in line and "step" in line for line in lines) == 3
    assert any("00001 stopped by ASHA at step 6" in line for line in lines)
    assert any("00002 failed: RuntimeError: loss is NaN at step 3" in line for line in lines)
    assert any("00000 finished at step 12" in line for line in lines)


def test_callback_pickles_without_its_console(tmp_path):
    from ray import cloudpickle

    console = Console(file=io.StringIO(), force_terminal=True)
    callback = callbacks.SweepProgress(console, metric="eval/domain_ppl", mode="min", max_reports=2,
                                       concurrency=1)
    drive(callback, tmp_path)
    data = cloudpickle.dumps(callback)
    callback.close()
    restored = cloudpickle.loads(data)
    assert restored._console is None and restored._live is None
    assert restored.trials["ab12_00000"].status == "finished"


def test_time_left_is_an_upper_bound_from_the_mean_report_time():
    done = progress.TrialProgress("a", status="finished", reports=4, report_seconds=40.0)
    running = progress.TrialProgress("b", status="running", reports=1, report_seconds=10.0)
    # 10 s per report; b has 3 reports left, one trial not started yet has 4; two run at a time
    assert progress.seconds_left([done, running], total_trials=3, max_reports=4, concurrency=2) == pytest.approx(35.0)
    assert progress.seconds_left([progress.TrialProgress("a")], total_trials=2, max_reports=4, concurrency=1) is None


# -- Ray's own output and the logger callbacks -------------------------------------------------------------------


def test_ray_tables_and_logs_go_to_the_file_not_the_terminal(tmp_path, capsys):
    log = tmp_path / ray_output.RAY_OUTPUT_LOG
    reporter, _ = ray_output.ray_progress_reporters(log, echo=False)
    reporter.setup(start_time=0, total_samples=1, metric="eval/domain_ppl", mode="min")
    reporter.report([], True, "AsyncHyperBand: num_stopped=1", "Logical resource usage: 2.0/2 CPUs")
    tune_logger = logging.getLogger("ray.tune.some_module")
    with ray_output.ray_logs_to(log, echo=False):
        tune_logger.info("Wrote the latest version of all result files")
    tune_logger.info("after the sweep: not in the file")
    assert capsys.readouterr().out == ""
    text = log.read_text()
    assert "== Status ==" in text and "num_stopped=1" in text and "Wrote the latest version" in text
    assert "after the sweep" not in text
    assert logging.getLogger("ray.tune").propagate is True


def test_echo_prints_ray_tables_too(tmp_path, capsys):
    reporter, _ = ray_output.ray_progress_reporters(tmp_path / "ray.log", echo=True)
    reporter.setup(start_time=0, total_samples=1, metric="eval/domain_ppl", mode="min")
    reporter.report([], True, "AsyncHyperBand: num_stopped=1")
    assert "num_stopped=1" in capsys.readouterr().out


def test_logger_callbacks_follow_the_config(monkeypatch):
    import importlib.util

    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback, TBXLoggerCallback

    from raycpt.core.config import ExperimentConfig

    cfg = ExperimentConfig()
    kinds = [type(cb) for cb in ray_output.logger_callbacks(cfg)]
    assert kinds == [JsonLoggerCallback, CSVLoggerCallback, TBXLoggerCallback]
    cfg.report.loggers = []
    assert TBXLoggerCallback not in [type(cb) for cb in ray_output.logger_callbacks(cfg)]

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("mlflow", "wandb") else real_find_spec(name, *a))
    for name in ("mlflow", "wandb"):
        cfg.report.loggers = ["tensorboard", name]
        with pytest.raises(InputError, match=f"pip install {name}"):
            ray_output.logger_callbacks(cfg)


# -- plots -------------------------------------------------------------------------------------------------------


def test_each_plot_is_written_and_has_content(sweep_dir, summary):
    import numpy as np
    from matplotlib.image import imread

    from raycpt.results.plots import CPT_LAW_PLOT, PLOT_FILES, write_plots

    paths = write_plots(sweep_dir, summary)
    # the CPT law's fits are drawn even when it falls back
    assert sorted(p.name for p in paths) == sorted([*PLOT_FILES, CPT_LAW_PLOT])
    for path in paths:
        assert path.parent == sweep_dir / "plots" and path.stat().st_size > 20_000, path.name
        pixels = imread(path)
        height, width = pixels.shape[:2]
        assert width >= 900 and height >= 400, (path.name, width, height)
        colours = np.unique(pixels.reshape(-1, pixels.shape[-1]).round(2), axis=0)
        assert len(colours) > 50, f"{path.name} looks blank"


def test_plots_skip_what_the_sweep_has_no_data_for(sweep_dir, summary, tmp_path):
    from raycpt.results.plots import write_plots

    no_f1 = Summary.from_dict(json.loads(json.dumps(summary.to_dict())))
    for t in no_f1.trials:
        t["eval/f1"] = None
    (sweep_dir / "plots").mkdir(exist_ok=True)
    (sweep_dir / "plots" / "law.png").write_bytes(b"an earlier version's mixing-law plot")
    written = {p.name for p in write_plots(sweep_dir, no_f1)}
    assert "ppl_vs_f1.png" not in written and not (sweep_dir / "plots" / "ppl_vs_f1.png").exists()
    assert not (sweep_dir / "plots" / "law.png").exists(), "a plot this version does not draw is removed"
    assert "domain_ppl_vs_tokens.png" in written
    write_plots(sweep_dir, summary)  # leave the full set for other tests


def test_pareto_front_keeps_points_no_other_beats():
    from raycpt.results.plots import pareto_front

    points = [(50.0, 0.70), (45.0, 0.68), (60.0, 0.72), (55.0, 0.69), (45.0, 0.60)]
    assert pareto_front(points) == [(45.0, 0.68), (50.0, 0.70), (60.0, 0.72)]


def test_durations_and_ppl_stay_short():
    assert [fmt.duration(s) for s in (5, 192, 3900, math.nan)] == ["5s", "3m12s", "1h05m", "-"]
    assert [fmt.ppl_text(v) for v in (51237.04, 123.45, 47.234)] == ["51,237", "123.5", "47.23"]


if __name__ == "__main__":
    record_fixture(Path(sys.argv[1]))
    print(f"recorded {sys.argv[1]} into {FIXTURE}")
