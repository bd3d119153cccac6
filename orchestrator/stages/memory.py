"""What a worker process keeps of the stage store between trials: verified checkpoints and where each stage was found.

A worker process that runs trial after trial (`search.reuse_actors`) downloads the teacher and an assistant
once, not once per trial, and searches MLflow for a complete stage once per stage, not per trial. A
kept result is keyed by its checkpoint's sha256, so it is exactly what a new download would verify; a
complete stage never changes, so a copy verified by its hash stays valid even if its run is tagged
corrupt later.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pxd.memo import remember

if TYPE_CHECKING:
    from pxd.train import StageResult

__all__ = ["StageMemory", "LOADED_LIMIT"]

LOADED_LIMIT = 4  # checkpoints kept (a sweep's teacher and its few assistants), least recently used dropped


@dataclass
class StageMemory:
    """Verified stage checkpoints by (stage run id, sha256), and — when `remember_found` — the (run id, sha256)
    of the complete run found for each (tracking URI, stage key); the stages experiment's id per tracking URI."""

    remember_found: bool = True
    loaded: dict[tuple[str, str], StageResult] = field(default_factory=dict)
    found: dict[tuple[str, str], tuple[str, str]] = field(default_factory=dict)
    experiments: dict[str, str] = field(default_factory=dict)  # tracking URI → the stages experiment's id

    def loaded_result(self, run_id: str, sha256: str) -> StageResult | None:
        return self.loaded.get((run_id, sha256))

    def keep_loaded(self, run_id: str, sha256: str, result: StageResult) -> StageResult:
        return remember(self.loaded, (run_id, sha256), result, LOADED_LIMIT)

    def found_result(self, tracking_uri: str, key: str) -> tuple[StageResult, str] | None:
        """The kept result of the run found before for this stage, and that run's id; None if not kept."""
        found = self.found.get((tracking_uri, key))
        if found is None or found not in self.loaded:
            return None
        return self.loaded[found], found[0]

    def keep_found(self, tracking_uri: str, key: str, run_id: str, sha256: str) -> None:
        if self.remember_found:
            self.found[(tracking_uri, key)] = (run_id, sha256)
