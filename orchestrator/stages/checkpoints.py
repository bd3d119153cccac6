"""A stage still training saves its training state into its run as an incomplete stage (`pxd.stage_partial`),
alternating between two artifacts so the one its tag names is always whole; the next holder of the
stage's lease resumes from it."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from typing import Any, Protocol

import torch

from orchestrator.results.schema import Tag

__all__ = ["PARTIAL_DIR", "PARTIAL_SLOTS", "IncompleteStage", "StageRunWriter"]


class StageRunWriter(Protocol):
    """What an incomplete stage needs of the store that trains it."""

    client: Any

    def holder_tags(self) -> dict[str, str]: ...

    def upload(self, run_id: str, artifact: str, payload: bytes) -> None: ...


# An incomplete stage's training state alternates between two artifacts, so the one its tag names is
# always whole, even if the trainer dies while uploading the other.
PARTIAL_DIR = "stage/partial"


PARTIAL_SLOTS = ("state-a.pt", "state-b.pt")


class IncompleteStage:
    """A stage run still training, where its training state goes at each checkpoint; a new stage's run is
    created (`create_with`) at its first checkpoint, so a short stage leaves no incomplete run behind."""

    def __init__(self, store: StageRunWriter, run_id: str | None, artifact: str | None) -> None:
        self.store = store
        self.run_id = run_id
        self.artifact = artifact  # the slot its tag names
        self.create_with: Callable[[], str] | None = None

    def take_over(self, epoch: int) -> None:
        """The current lease holder continues this run after `epoch`."""
        self.store.client.update_run(self.run_id, status="RUNNING")
        for name, value in {**self.store.holder_tags(), Tag.STAGE_RESUMED_FROM: str(epoch)}.items():
            self.store.client.set_tag(self.run_id, name, value)

    def save(self, state: dict[str, Any]) -> None:

        buffer = io.BytesIO()
        torch.save(state, buffer)
        payload = buffer.getvalue()
        if self.run_id is None:
            self.run_id = self.create_with()
        # the slot the tag does not name, so the named one stays whole until the tag moves
        artifact = next(f"{PARTIAL_DIR}/{slot}" for slot in PARTIAL_SLOTS if f"{PARTIAL_DIR}/{slot}" != self.artifact)
        self.store.upload(self.run_id, artifact, payload)
        partial = {"epoch": state["epoch"], "artifact": artifact, "sha256": hashlib.sha256(payload).hexdigest(),
                   "layout": state["version"]}
        self.store.client.set_tag(self.run_id, Tag.STAGE_PARTIAL, json.dumps(partial))
        self.artifact = artifact
