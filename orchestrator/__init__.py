"""pxd's sweeps: Ray Tune + Optuna over TAS pipelines, tracked in MLflow, read back as Pareto frontiers.

Rooms, lowest first; a room imports only from rooms before it (docs/architecture.md, tests/test_architecture.py):
`tracking` → `space` → `results` → `stages` → `worker` → `driver` → `cli`.
"""

ROOMS = ("tracking", "space", "results", "stages", "worker", "driver", "cli")
