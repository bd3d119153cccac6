"""Which images a run uses, split by split, decided before anything is decoded, and its fingerprint.

A `Plan` lists the items of each split (train, val, optional test) in the order they are stored.
The fingerprint hashes that plan (items, labels, class names, stored size, decoder version) with the
content hash of every file it reads, so it changes exactly when the decoded tensors would.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from pxd.data.fingerprint import FILE_HASH
from pxd.sections import DatasetConfig

__all__ = ["DECODE_VERSION", "SPLITS", "Item", "Plan", "hold_out", "apply_caps", "plan_fingerprint"]

LOG = logging.getLogger("pxd.data")

# Bump when the decoder would produce other pixels for the same file: it is part of every fingerprint.
DECODE_VERSION = "pil-rgb-draft-bilinear-shorter-side-centre-crop-v1"
SPLITS = ("train", "val", "test")


class Item(NamedTuple):  # a tuple, not a frozen dataclass: a million of them build in well under a second
    source: str  # file path relative to the dataset root (posix)
    row: int  # row within the file (a CIFAR batch); 0 for one image per file
    label: int


@dataclass
class Plan:
    kind: str  # "imagefolder" | "cifar"
    root: Path
    classes: list[str]
    image_size: int  # the stored side: images are [3, image_size, image_size]
    splits: dict[str, list[Item]]  # "train", "val" and, when the data has one, "test"
    caps: dict[str, int] = field(default_factory=dict)  # per-class caps in force

    def sources(self) -> list[str]:
        return sorted({item.source for items in self.splits.values() for item in items})

    def image_bytes(self) -> int:
        return 3 * self.image_size * self.image_size


def hold_out(items: list[Item], fraction: float, seed: int) -> tuple[list[Item], list[Item]]:
    """Split `items` into (kept, held out): per class, `round(fraction · n)` drawn with `seed`.

    Stratified: every class with at least two items keeps one and holds out at least one. Both
    parts keep the input order (so each is a contiguous, ordered block in the cache).
    """
    by_label: dict[int, list[int]] = defaultdict(list)
    for position, item in enumerate(items):
        by_label[item.label].append(position)
    held: set[int] = set()
    for label, positions in by_label.items():
        count = len(positions)
        wanted = min(max(round(fraction * count), 1), count - 1) if count >= 2 else 0
        held.update(random.Random(f"{seed}:{label}").sample(positions, wanted))  # str seeds are stable
    kept = [item for position, item in enumerate(items) if position not in held]
    return kept, [item for position, item in enumerate(items) if position in held]


def _cap(items: list[Item], cap: int, key: str) -> list[Item]:
    """At most `cap` items per class, chosen by a seeded draw, kept in their order; all when cap is 0."""
    if cap <= 0:
        return items
    by_label: dict[int, list[int]] = defaultdict(list)
    for position, item in enumerate(items):
        by_label[item.label].append(position)
    chosen: set[int] = set()
    for label, positions in by_label.items():
        chosen.update(positions if cap >= len(positions) else random.Random(f"{key}:{label}").sample(positions, cap))
    return [item for position, item in enumerate(items) if position in chosen]


def apply_caps(splits: dict[str, list[Item]], cfg: DatasetConfig, seed: int, where: str) -> dict[str, int]:
    """Cap train and val per class (test is never capped) in place; returns and prints the caps in force."""
    train_cap, val_cap = cfg.per_class_caps()
    caps = {name: cap for name, cap in (("train_per_class", train_cap), ("val_per_class", val_cap)) if cap > 0}
    if not caps:
        return caps
    before = {split: len(splits[split]) for split in ("train", "val")}
    splits["train"] = _cap(splits["train"], train_cap, f"{seed}:train")
    splits["val"] = _cap(splits["val"], val_cap, f"{seed}:val")
    LOG.warning(
        "dataset caps in force for %s: %s; using %d of %d training and %d of %d validation images "
        "(set dataset.train_per_class / val_per_class to 0 to use every image)",
        where, ", ".join(f"{name}={cap}" for name, cap in caps.items()),
        len(splits["train"]), before["train"], len(splits["val"]), before["val"],
    )
    return caps


def plan_fingerprint(plan: Plan, digests: dict[str, tuple[int, str]]) -> str:
    """sha256 hex of the plan and the content of every file it reads (no absolute path, no mtime)."""
    digest = hashlib.sha256()
    header = {"kind": plan.kind, "image_size": plan.image_size, "decoder": DECODE_VERSION,
              "file_hash": FILE_HASH, "classes": plan.classes}
    digest.update(json.dumps(header, sort_keys=True).encode())
    for split in SPLITS:
        if split in plan.splits:
            digest.update(f"\n[{split}]".encode())
            digest.update("".join(f"\n{source}\t{row}\t{label}" for source, row, label in plan.splits[split]).encode())
    digest.update(b"\n[files]")
    digest.update("".join(f"\n{source}\t{digests[source][0]}\t{digests[source][1]}" for source in plan.sources()).encode())
    return digest.hexdigest()
