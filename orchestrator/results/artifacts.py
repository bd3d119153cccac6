"""A frontier's artifacts on its sweep's MLflow run: the table (CSV, JSON), a PNG and the interactive Pareto page."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.results.frontier import write_table
from orchestrator.results.plots import plot_html, plot_png
from orchestrator.tracking import credentials
from pxd import metrics as registry
from pxd.metrics import Mode

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

__all__ = ["cost_axes", "log_frontier"]


def cost_axes(table: dict[str, Any]) -> tuple[str, ...]:
    """Every cost metric the table's trials have (registered, lower is better), hardware latencies
    included: the axes a reader of the Pareto page may choose from."""
    present = {key for row in table["rows"] for key in row["metrics"]}
    axes = [m.name for m in registry.METRICS.values() if m.mode is Mode.MIN and m.summary and m.name in present]
    return tuple(axes + sorted(k for k in present if k.startswith("latency_ms.") and k not in axes))


def log_frontier(client: MlflowClient, parent: Any, table: dict[str, Any], path: str, *,
                 png_axes: tuple[str, ...]) -> None:
    """A frontier's artifacts under `path` of the sweep's run: CSV and JSON, a PNG of `png_axes`, and
    the interactive page with every cost axis to choose from, its points linked to their MLflow runs."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_table(table, folder)
        plot_png(table, folder / "frontier.png", x_metrics=png_axes)
        axes = tuple(dict.fromkeys((*png_axes, *cost_axes(table))))
        plot_html(table, folder / "frontier.html", x_metrics=axes, experiment_id=parent.info.experiment_id,
                  tracking_uri=credentials.without_password(client.tracking_uri))
        client.log_artifacts(parent.info.run_id, str(folder), path)
