"""Tracking: where MLflow lives (the embedded server, a given URI, credentials kept out of what is written)."""

__all__ = ["server", "credentials"]
