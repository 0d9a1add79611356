"""Every experiment config we ship loads and validates, and what its comments promise about search.space holds:
a field a `space:` comment names as sweepable is accepted there."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from raycpt.core.config import load_config, to_dict

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(path for path in (ROOT / "experiments").glob("*.yaml")
                     if "cluster_name" not in yaml.safe_load(path.read_text()))  # not Ray's cluster launcher files
FIELD = re.compile(r"\b(?:data|model|train|eval|resources)\.[a-z_]+\b")


def test_the_experiment_configs_are_found():
    assert {"laptop.yaml", "smoke.yaml", "own-data.yaml"} <= {path.name for path in EXPERIMENTS}


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda path: path.name)
def test_shipped_config_loads_and_validates(path):
    cfg = load_config(path)
    assert cfg.data.domain and cfg.search.space


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda path: path.name)
def test_fields_a_space_comment_calls_sweepable_can_be_swept(path):
    comments = [line.split("#", 1)[1] for line in path.read_text().splitlines()
                if re.match(r"\s*space:\s*#", line)]
    values = to_dict(load_config(path))
    for name in (name for comment in comments for name in FIELD.findall(comment)):
        section, key = name.split(".")
        value = values[section][key]
        # a one-value choice of the field's own value: valid wherever the field can be swept at all
        load_config(path, [f"search.space.{name}={{choice: [{value}]}}"])
