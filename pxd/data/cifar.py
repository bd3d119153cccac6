"""CIFAR-10/100 in its python pickle format, stored in the on-disk cache like any dataset.

CIFAR's release has a training set and a test set, and no validation set. pxd keeps the official
test set as the held-out **test** split (`test_top1`, reported once, never used to choose) and
draws **val**, which selects epochs and frontiers, from the training batches: a stratified
`dataset.val_fraction` drawn with `dataset.split_seed`. Images are always 32×32. The pickles are read
with an unpickler that can only build numpy arrays, so a file cannot run code.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pxd.data.cache import cache_root, load_planned
from pxd.data.fingerprint import file_digests
from pxd.data.folder import layout_error
from pxd.data.plan import Item, Plan, apply_caps, hold_out
from pxd.sections import DatasetConfig
from pxd.types import DatasetSplits

__all__ = ["CIFAR_LAYOUT", "CifarFiles", "cifar_layout", "load_cifar"]

CIFAR_SIZE = 32

CIFAR_LAYOUT = {
    10: """expected layout (the CIFAR-10 python version, or its parent folder):
  <dataset.path>/        (or <dataset.path>/cifar-10-batches-py/)
    data_batch_1 ... data_batch_5
    test_batch
    batches.meta""",
    100: """expected layout (the CIFAR-100 python version, or its parent folder):
  <dataset.path>/        (or <dataset.path>/cifar-100-python/)
    train
    test
    meta""",
}


@dataclass(frozen=True)
class CifarFiles:
    root: Path  # the folder holding the batch files
    layout: str
    meta: str
    label_key: str
    names_key: str
    train: tuple[str, ...]
    test: tuple[str, ...]


def cifar_layout(cfg: DatasetConfig, num_classes: int) -> CifarFiles:
    """Check the CIFAR python-format files are present without reading them."""
    if num_classes not in CIFAR_LAYOUT:
        raise ValueError(f"num_classes must be 10 or 100 (got {num_classes})")
    layout = CIFAR_LAYOUT[num_classes]
    if num_classes == 10:
        subfolder, meta, label_key, names_key = "cifar-10-batches-py", "batches.meta", "labels", "label_names"
        train, test = tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",)
    else:
        subfolder, meta, label_key, names_key = "cifar-100-python", "meta", "fine_labels", "fine_label_names"
        train, test = ("train",), ("test",)
    root = Path(cfg.path or "").expanduser()
    if not cfg.path or not root.is_dir():
        raise layout_error(f"{cfg.path!r} is not a folder", layout)
    if not (root / train[0]).exists() and (root / subfolder).is_dir():
        root = root / subfolder
    missing = [name for name in [*train, *test, meta] if not (root / name).is_file()]
    if missing:
        raise layout_error(f"{root} is missing {', '.join(missing)}", layout)
    return CifarFiles(root, layout, meta, label_key, names_key, train, test)


def load_cifar(cfg: DatasetConfig, seed: int, num_classes: int, *, progress: bool | None = None) -> DatasetSplits:
    """Load CIFAR-10 (`num_classes=10`) or CIFAR-100 (100): train, val (from train) and the official test.

    `cfg.path` is the folder holding the batch files or its parent (with `cifar-10-batches-py/` or
    `cifar-100-python/`). Per-class caps (drawn with `seed`) apply to train and val, never to test.
    """
    files = cifar_layout(cfg, num_classes)
    classes = [str(name) for name in _read_pickle(files.root / files.meta, files.layout).get(files.names_key, [])]
    if len(classes) != num_classes:
        raise layout_error(
            f"{files.root / files.meta} must list {num_classes} {files.names_key!r} (found {len(classes)})", files.layout
        )
    root = cache_root(cfg)
    digests = file_digests(files.root, [*files.train, *files.test], root / "file-hashes")

    def items(names: tuple[str, ...]) -> list[Item]:
        found = []
        for name in names:
            labels = _batch_labels(files, name, num_classes, digests[name][1], root / "cifar-labels")
            found += [Item(name, row, int(label)) for row, label in enumerate(labels)]
        return found

    train, val = hold_out(items(files.train), cfg.val_fraction, cfg.split_seed)
    splits = {"train": train, "val": val, "test": items(files.test)}
    caps = apply_caps(splits, cfg, seed, str(files.root))
    plan = Plan("cifar", files.root, classes, CIFAR_SIZE, splits, caps)
    return load_planned(plan, cfg, _BatchRows(files, num_classes), progress=progress, digests=digests)


class _BatchRows:
    """Decoder for CIFAR items: copies rows out of one batch file at a time (bounded memory)."""

    def __init__(self, files: CifarFiles, num_classes: int) -> None:
        self.files = files
        self.num_classes = num_classes
        self.name: str | None = None
        self.data: np.ndarray | None = None

    def __call__(self, items: list[Item]) -> list[np.ndarray | str]:
        rows = []
        for item in items:
            if item.source != self.name:
                self.data, _ = _read_batch(self.files, item.source, self.num_classes)
                self.name = item.source
            rows.append(np.ascontiguousarray(self.data[item.row].reshape(3, CIFAR_SIZE, CIFAR_SIZE)))
        return rows


def _batch_labels(files: CifarFiles, name: str, num_classes: int, digest: str, label_dir: Path) -> np.ndarray:
    """A batch's labels, remembered per content hash so a warm load does not unpickle image data."""
    remembered = label_dir / f"{digest}.npy"
    if remembered.is_file():
        return np.load(remembered)
    _, labels = _read_batch(files, name, num_classes)
    label_dir.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=label_dir, suffix=".npy.partial")
    with os.fdopen(handle, "wb") as out:
        np.save(out, labels)
    os.replace(partial, remembered)
    return labels


def _read_batch(files: CifarFiles, name: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [N, 3072], int64 labels [N]) of one batch file, checked."""
    path = files.root / name
    batch = _read_pickle(path, files.layout)
    data, labels = batch.get("data"), batch.get(files.label_key)
    if not isinstance(data, np.ndarray) or labels is None:
        raise layout_error(f"{path} lacks 'data' (uint8 array) or {files.label_key!r}", files.layout)
    labels = np.asarray(labels, dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * CIFAR_SIZE**2 or data.shape[0] != labels.shape[0]:
        raise layout_error(f"{path}: 'data' must be [N, 3072] with N labels (got {data.shape})", files.layout)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise layout_error(f"{path}: labels must be in [0, {num_classes})", files.layout)
    return data.astype(np.uint8, copy=False), labels


class _ArrayUnpickler(pickle.Unpickler):
    """Allows only what CIFAR pickles contain (numpy arrays); anything else is refused, not executed."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if module.startswith("numpy.core"):  # numpy ≥ 2 renamed numpy.core to numpy._core
            module = module.replace("numpy.core", "numpy._core") if hasattr(np, "_core") else module
        return super().find_class(module, name)


def _read_pickle(path: Path, layout: str) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            content = _ArrayUnpickler(handle, encoding="latin1").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError, ImportError) as error:
        raise layout_error(f"cannot read {path} as a CIFAR python pickle: {error}", layout) from error
    if not isinstance(content, dict):
        raise layout_error(f"{path} does not hold a dict as CIFAR python pickles do", layout)
    return {key.decode("latin1") if isinstance(key, bytes) else key: value for key, value in content.items()}
