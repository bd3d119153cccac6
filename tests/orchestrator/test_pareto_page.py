"""The Pareto page's text without a browser: `gain_vs_ce` where the rows carry it, the links to the runs,
and the UI address pxd prints (the browser test is test_sweep.py's test_the_pareto_page_works_inside_the_mlflow_ui)."""

from __future__ import annotations

import html
import re

from orchestrator.results.plots import plot_html
from orchestrator.tracking.server import TrackingTarget, experiment_page, ui_command
from tests.orchestrator.test_plots import make_table


def _frontier_table_html(page: str) -> str:
    return page.split("<h2>Frontier trials</h2>")[1].split("<script")[0]


def _tooltips(page: str) -> list[str]:
    return [html.unescape(text) for text in re.findall(r"<title>(.*?)</title>", page, re.DOTALL)[1:]]  # [0]: the page's


def test_gain_vs_ce_shows_in_every_tooltip_and_as_a_column_of_the_frontier_table(tmp_path) -> None:
    table = make_table()
    gains = [0.0312, -0.0045, None, 0.1, 0.0]
    for row, gain in zip(table["rows"], gains):
        row["gain_vs_ce"] = gain
    page = plot_html(table, tmp_path / "frontier.html").read_text(encoding="utf-8")
    header = re.findall(r"<th>(.*?)</th>", _frontier_table_html(page))
    assert header[:5] == ["trial_id", "run_id", "model_uri", "gain_vs_ce", "val_top1"]  # beside the objectives
    for line in re.findall(r"<tr data-row=.*?</tr>", _frontier_table_html(page)):
        cells = re.findall(r"<td[^>]*>(.*?)</td>", line)
        row = next(r for r in table["rows"] if r["run_id"] == cells[1])
        assert cells[3] == ("n/a" if row["gain_vs_ce"] is None else f"{row['gain_vs_ce']:+.6g}")
    tooltips = _tooltips(page)
    assert len(tooltips) == 2 * table["n_eligible"]  # one point per trial and panel
    for row in table["rows"]:
        text = "n/a" if row["gain_vs_ce"] is None else f"{row['gain_vs_ce']:+.6g}"
        mine = [t for t in tooltips if f"run {row['run_id']}" in t]
        assert len(mine) == 2 and all(f"gain_vs_ce = {text} (val_top1 minus its CE control's)" in t for t in mine)


def test_gain_vs_ce_logged_as_a_metric_is_shown_once_in_its_place(tmp_path) -> None:
    table = make_table()
    for index, row in enumerate(table["rows"]):
        row["metrics"]["gain_vs_ce"] = 0.01 * index
    page = plot_html(table, tmp_path / "frontier.html").read_text(encoding="utf-8")
    assert re.findall(r"<th>(.*?)</th>", _frontier_table_html(page)).count("gain_vs_ce") == 1
    assert all(t.count("gain_vs_ce") == 1 for t in _tooltips(page))


def test_without_gain_vs_ce_the_page_does_not_mention_it(tmp_path) -> None:
    page = plot_html(make_table(), tmp_path / "frontier.html").read_text(encoding="utf-8")
    assert "gain_vs_ce" not in page


def test_every_point_is_a_link_that_opens_its_run_in_a_new_tab(tmp_path) -> None:
    """MLflow's artifact viewer sandboxes the page to scripts only: a new-tab click on a link is what still
    works there, so each point sits in a link (its address set by the page's script) to its row's run."""
    table = make_table()
    page = plot_html(table, tmp_path / "frontier.html", experiment_id="7").read_text(encoding="utf-8")
    links = re.findall(r'<a class="run-link" data-run="(\d+)" target="_blank" rel="noopener"><circle[^>]*'
                       r'data-row="(\d+)"', page)
    assert len(links) == 2 * table["n_eligible"] and all(run == row for run, row in links)


def test_the_ui_address_pxd_prints_opens_the_experiments_runs_in_the_model_training_view(tmp_path) -> None:
    runs = "/#/experiments/12/runs?workflowType=machine_learning"
    served = ui_command(TrackingTarget("http://10.0.0.5:5000/", None))
    assert experiment_page(served, "12") == f"open http://10.0.0.5:5000{runs} in a browser"
    embedded = experiment_page(ui_command(TrackingTarget("http://127.0.0.1:40001", None, store=tmp_path)), "12")
    assert embedded.startswith("mlflow server --backend-store-uri sqlite:///")
    assert embedded.endswith(f"# then open http://127.0.0.1:5000{runs}")
    databricks = ui_command(TrackingTarget("databricks", None))
    assert experiment_page(databricks, "12") == databricks  # no address to take there
