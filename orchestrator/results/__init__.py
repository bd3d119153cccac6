"""Results: the MLflow run schema (writer and reader), Pareto maths and frontiers, plots, `pxd select`, `pxd remeasure`."""

__all__ = ["schema", "pareto", "frontier", "plots", "artifacts", "select", "hardware"]
