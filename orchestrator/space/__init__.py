"""The search space: a YAML file → `SweepSpec` (the base config, distributions, the `search:` section, constraints)."""

__all__ = ["spec", "search", "samplers", "constraints", "distributions", "fields"]
