"""docs/config.md is generated from raycpt/core/config.py: the committed page must equal `render()` of the source as
it is now, every field of every section has its row, and the check does fail when a docstring changes."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest

from raycpt import config_reference
from raycpt.core import config

PAGE = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def _assert_current(committed: str, rendered: str) -> None:
    assert committed == rendered, f"docs/config.md is out of date: run `{config_reference.COMMAND}`"


def _sections(page: str) -> dict[str, str]:
    """Heading text -> the markdown under it, up to the next `## ` heading."""
    parts = page.split("\n## ")[1:]
    return {part.split("\n", 1)[0].strip("`"): part for part in parts}


def test_committed_page_is_current():
    _assert_current(PAGE.read_text(), config_reference.render())


def test_a_changed_docstring_makes_the_committed_page_stale():
    source = inspect.getsource(config)
    old = '"""Tokens per training block;'
    assert old in source, "pick another docstring: this one changed"
    changed = source.replace(old, '"""Tokens per training block (reworded);', 1)
    rendered = config_reference.render(changed)
    assert "Tokens per training block (reworded);" in rendered
    with pytest.raises(AssertionError, match="run `python -m raycpt.config_reference > docs/config.md`"):
        _assert_current(config_reference.render(), rendered)


def test_a_new_field_gets_a_row():
    source = inspect.getsource(config)
    anchor = "class DataConfig:\n"
    added = source.replace(anchor, anchor + '    shiny: int = 3\n    """A field added a minute ago."""\n', 1)
    row = next(line for line in config_reference.render(added).splitlines() if line.startswith("| `data.shiny`"))
    assert row == "| `data.shiny` | `int` | `3` |  | A field added a minute ago. |"


def test_every_field_of_every_section_has_a_row_with_its_docstring():
    sections = _sections(config_reference.render())
    top = [f.name for f in dataclasses.fields(config.ExperimentConfig) if f.default_factory is dataclasses.MISSING]
    expected = {config_reference.TOP_LEVEL: top}
    for f in dataclasses.fields(config.ExperimentConfig):
        if f.default_factory is not dataclasses.MISSING:
            expected[f.name] = [g.name for g in dataclasses.fields(f.default_factory)]
    missing = []
    for section, names in expected.items():
        text = sections.get(section, "")
        for name in names:
            key = name if section == config_reference.TOP_LEVEL else f"{section}.{name}"
            if f"\n| `{key}` |" not in text:
                missing.append(key)
    assert not missing, f"fields without a row in their section: {missing}"


@pytest.mark.parametrize("key, choices", [
    ("train.loss_impl", config.LOSS_IMPLS), ("resources.strategy", config.STRATEGIES),
    ("train.schedule", config.SCHEDULES), ("eval.method", config.EVAL_METHODS),
    ("report.loggers", config.LOGGERS), ("search.scheduler", ("asha", "none")),
])
def test_allowed_values_come_from_validation(key, choices):
    row = next(line for line in config_reference.render().splitlines() if line.startswith(f"| `{key}` |"))
    allowed = row.split(" | ")[3]
    assert all(f"`{choice}`" in allowed for choice in choices), row


def test_module_prints_the_page(capsys):
    config_reference.main()
    assert capsys.readouterr().out == config_reference.render()
