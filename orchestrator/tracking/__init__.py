"""Tracking: where MLflow lives (the embedded server, a given URI), credentials kept out of what is written, and
requests that survive a server restart."""

__all__ = ["server", "credentials", "retries"]
