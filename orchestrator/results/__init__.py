"""Results: the MLflow run schema (writer and reader), Pareto maths and frontiers, plots, logged students read back
safely, `pxd select`, `pxd remeasure`."""

__all__ = ["schema", "run_creation", "pareto", "frontier", "plots", "artifacts", "students", "select", "hardware"]
