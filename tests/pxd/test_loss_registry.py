"""The loss-term registry: a term is one file that registers itself, and the config follows the table."""

from __future__ import annotations

import sys
import textwrap

import pytest
from torch import nn

from pxd.config import PipelineConfig
from pxd.errors import ConfigError
from pxd.losses.terms import LossTerm, TermTable, loss_terms


@pytest.fixture
def term_package(tmp_path, monkeypatch):
    """A package of term files on sys.path, its own table in its __init__; removed from sys.modules after."""
    package = tmp_path / "more_terms"
    package.mkdir()
    (package / "__init__.py").write_text("from pxd.losses.terms import TermTable\n\nTABLE = TermTable(__name__)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield package
    for name in [name for name in sys.modules if name == "more_terms" or name.startswith("more_terms.")]:
        del sys.modules[name]


def test_a_term_file_dropped_into_the_package_registers_itself(term_package):
    (term_package / "contrast.py").write_text(textwrap.dedent("""
        from torch import nn

        import more_terms
        from pxd.losses.terms import LossTerm

        more_terms.TABLE.register(LossTerm(name="contrast", default=0.0, build=lambda context: nn.Identity(), order=5))
    """))
    import more_terms

    assert "more_terms.contrast" not in sys.modules  # nothing imported it, nothing lists it
    assert [row.name for row in more_terms.TABLE] == ["contrast"]
    assert more_terms.TABLE["contrast"].default == 0.0


def test_a_name_or_a_place_in_the_order_is_registered_once():
    table = TermTable("pxd.losses")
    table.register(LossTerm(name="a", default=0.0, build=lambda context: nn.Identity(), order=1))
    with pytest.raises(ValueError, match="already registered"):
        table.register(LossTerm(name="a", default=0.0, build=lambda context: nn.Identity(), order=2))
    with pytest.raises(ValueError, match="order 1 is already 'a'"):
        table.register(LossTerm(name="b", default=0.0, build=lambda context: nn.Identity(), order=1))


def test_the_table_is_in_order_and_every_term_registered_by_its_file():
    rows = loss_terms()
    assert [row.order for row in rows] == sorted(row.order for row in rows)
    assert {row.build.__module__ for row in rows} == {"pxd.losses.kd", "pxd.losses.isrd", "pxd.losses.feature",
                                                       "pxd.losses.rakd"}


@pytest.mark.parametrize("name", [row.name for row in loss_terms()])
def test_every_terms_weight_is_checked_where_the_user_wrote_it(tiny_raw, name):
    tiny_raw["distill"][name] = -1.0
    with pytest.raises(ConfigError) as err:
        PipelineConfig.from_dict(tiny_raw)
    assert err.value.field == f"distill.{name}"


@pytest.mark.parametrize("section", ["distill", "assistant.distill"])
def test_a_terms_setting_must_be_positive_where_the_user_wrote_it(tiny_raw, section):
    if section == "distill":
        tiny_raw["distill"]["temperature"] = 0.0
    else:
        tiny_raw["assistant"]["distill"] = {"temperature": 0.0}
    with pytest.raises(ConfigError) as err:
        PipelineConfig.from_dict(tiny_raw)
    assert err.value.field == f"{section}.temperature"
