"""Frontier pictures: a valid PNG, and a self-contained HTML page that escapes what it embeds."""

from __future__ import annotations

import json
import re

import pytest

from orchestrator.results.frontier import TrialRow, frontier_table
from orchestrator.results.plots import plot_html, plot_png

OBJECTIVES = [("val_top1", "max"), ("gmacs", "min"), ("pixels", "min")]
REFERENCE = {"val_top1": 0.0, "gmacs": 1.0, "pixels": 4096.0}
HOSTILE_ID = '</script><script>alert("x")</script><!--'


def make_table(trial_ids: list[str] | None = None) -> dict:
    specs = [
        (0.62, 0.05, 1024.0),
        (0.71, 0.10, 1024.0),
        (0.80, 0.30, 3136.0),
        (0.65, 0.40, 3136.0),  # dominated
        (0.55, 0.50, 4096.0),  # dominated
    ]
    trial_ids = trial_ids or [f"t{i}" for i in range(len(specs))]
    rows = [
        TrialRow(
            trial_id=trial_id,
            run_id=f"run{i:04d}abc",
            metrics={"val_top1": top1, "gmacs": gmacs, "pixels": pixels, "params_m": 1.5},
            params={"arch_s": "resnet18", "res_s": int(pixels**0.5), "note": "<b>&"},
            state="COMPLETE",
            model_uri=f"runs:/run{i:04d}abc/model",
        )
        for i, (trial_id, (top1, gmacs, pixels)) in enumerate(zip(trial_ids, specs))
    ]
    return frontier_table(rows, OBJECTIVES, REFERENCE)


def test_png_is_a_real_image(tmp_path) -> None:
    path = plot_png(make_table(), tmp_path / "plots" / "frontier.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 5_000  # two panels with points, not an empty canvas
    # IHDR width: two panels side by side are wider than tall.
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > height


def test_png_skips_missing_metric_and_rejects_when_none_present(tmp_path) -> None:
    table = make_table()
    one = plot_png(table, tmp_path / "one.png", x_metrics=("gmacs", "latency_ms"))
    two = plot_png(table, tmp_path / "two.png", x_metrics=("gmacs", "pixels"))
    width_one = int.from_bytes(one.read_bytes()[16:20], "big")
    width_two = int.from_bytes(two.read_bytes()[16:20], "big")
    assert width_one < width_two  # latency_ms was never measured: one panel only
    with pytest.raises(ValueError, match="x_metrics"):
        plot_png(table, tmp_path / "none.png", x_metrics=("latency_ms",))


def test_html_is_self_contained_and_shows_runs(tmp_path) -> None:
    table = make_table()
    page = plot_html(table, tmp_path / "frontier.html").read_text(encoding="utf-8")
    for row in table["rows"]:
        assert row["run_id"] in page
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.IGNORECASE)
    assert "<svg" in page and "<title>" in page
    # One point per eligible trial and panel; the frontier ones are highlighted.
    assert page.count('class="pt front"') == 2 * table["n_frontier"]
    assert page.count('class="pt other"') == 2 * (table["n_eligible"] - table["n_frontier"])
    # The frontier table lists exactly the frontier trials.
    table_html = page.split("<h2>Frontier trials</h2>")[1].split("<script")[0]
    assert table_html.count("<tr data-row=") == table["n_frontier"]
    assert "run0003abc" not in table_html  # dominated trial is only in the scatter
    assert "&lt;b&gt;&amp;" in page and "<b>&" not in page


def test_html_survives_hostile_trial_id(tmp_path) -> None:
    table = make_table([HOSTILE_ID, "t1", "t2", "t3", "t4"])
    page = plot_html(table, tmp_path / "frontier.html").read_text(encoding="utf-8")
    assert HOSTILE_ID not in page
    assert page.count("<script") == 2 and page.count("</script>") == 2
    assert "<!--" not in page
    # The embedded data still round-trips the exact id for the page's script.
    opening = '<script type="application/json" id="pxd-frontier-data">'
    match = re.search(re.escape(opening) + r"(.*?)</script>", page, re.S)
    assert match is not None
    data = json.loads(match.group(1))
    assert HOSTILE_ID in [row["trial_id"] for row in data["rows"]]


def test_html_of_empty_table(tmp_path) -> None:
    table = frontier_table([], OBJECTIVES, REFERENCE)
    page = plot_html(table, tmp_path / "empty.html").read_text(encoding="utf-8")
    assert "0 of 0 eligible trials" in page
