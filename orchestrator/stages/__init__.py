"""Stages: content-addressed stages on MLflow (look-up, integrity, partial checkpoints), single-flight leases."""

__all__ = ["store", "leases"]
