"""One dotted-path spelling: `--set`, parameters, flattening and error fields agree."""

from __future__ import annotations

import pytest

from orchestrator.space.spec import apply_overrides, load_spec, parse_spec
from pxd.errors import ConfigError
from pxd.paths import flatten, get_path, set_path
from tests.conftest import TINY_CONFIG


def test_set_path_reaches_list_items_and_creates_sections():
    tree = {"student": {"depths": [1, 1, 1, 1]}}
    set_path(tree, "student.depths.1", 2)
    set_path(tree, "search.trials", 4, create=True)
    assert tree == {"student": {"depths": [1, 2, 1, 1]}, "search": {"trials": 4}}
    assert get_path(tree, "student.depths.1") == 2
    with pytest.raises(KeyError, match="student.depths.7"):
        set_path(tree, "student.depths.7", 1)


def test_flatten_names_list_items_like_parameters():
    assert flatten({"student": {"depths": [1, 2]}}, lists=True) == {"student.depths.0": 1, "student.depths.1": 2}
    assert flatten({"student": {"depths": [1, 2]}}) == {"student.depths": [1, 2]}


def test_set_flag_on_a_list_item_works_and_errors_use_the_same_name(tmp_path, tiny_raw):
    import copy

    import yaml

    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(copy.deepcopy(TINY_CONFIG)))
    config = load_spec(path, ["student.depths.1=2"]).fixed_config()
    assert config.student.depths == (1, 2, 1, 1)
    with pytest.raises(ConfigError) as error:
        load_spec(path, ["student.depths.1=two"])
    assert error.value.field == "student.depths.1"
    with pytest.raises(ConfigError) as error:
        apply_overrides(tiny_raw, ["student.depths.9=1"])
    assert error.value.field == "student.depths.9"


def test_search_section_errors_name_nested_fields(tiny_raw):
    tiny_raw["search"] = {"trials": 2, "sampler": {"name": "tpe", "sed": 1}}
    with pytest.raises(ConfigError) as error:
        parse_spec(tiny_raw)
    assert error.value.field == "search.sampler.sed" and "did you mean 'seed'" in error.value.message
