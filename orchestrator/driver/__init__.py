"""The driver: launching a sweep (Ray, Tune, the searcher), its budget, progress, attempts, CPU lending, early stopping."""

__all__ = ["launch", "budget", "progress", "attempts", "lending", "early_stopping", "searcher"]
