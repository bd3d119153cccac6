"""The worker: the Tune trainable that runs one trial, and what a kept worker process holds between trials."""

__all__ = ["trial"]
