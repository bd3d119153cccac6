"""Local image datasets: an ImageFolder tree, or CIFAR-10/100 in its python pickle format.

Nothing is downloaded. Every image is decoded once into one uint8 tensor [N, 3, S, S] kept in memory,
so training epochs never touch the disk or a decoder again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pxd.config import DatasetConfig
from pxd.errors import DatasetError
from pxd.types import DatasetSplits, ImageSet

__all__ = ["IMAGE_EXTENSIONS", "load_imagefolder", "load_cifar"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")

IMAGEFOLDER_LAYOUT = """expected layout:
  <dataset.path>/
    train/
      <class_a>/  img_001.jpg  img_002.png ...
      <class_b>/  ...
    val/
      <class_a>/  ...   (the same class folders as train/)
      <class_b>/  ..."""

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


def _layout_error(message: str, layout: str) -> DatasetError:
    return DatasetError("dataset.path", f"{message}\n{layout}")


# ---------------------------------------------------------------------------------------------
# ImageFolder


def imagefolder_layout(cfg: DatasetConfig) -> tuple[Path, list[str]]:
    """Check the ImageFolder layout without decoding anything; returns the root and the classes."""
    root = Path(cfg.path or "").expanduser()
    if not cfg.path or not root.is_dir():
        raise _layout_error(f"{cfg.path!r} is not a folder", IMAGEFOLDER_LAYOUT)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise _layout_error(f"{root} has no {split}/ folder", IMAGEFOLDER_LAYOUT)
    classes = _class_folders(root / "train")
    if not classes:
        raise _layout_error(f"{root / 'train'} has no class folders", IMAGEFOLDER_LAYOUT)
    val_classes = _class_folders(root / "val")
    if val_classes != classes:
        missing = sorted(set(classes) - set(val_classes))
        extra = sorted(set(val_classes) - set(classes))
        raise _layout_error(
            f"val/ and train/ must hold the same class folders; missing in val/: {missing}, only in val/: {extra}",
            IMAGEFOLDER_LAYOUT,
        )
    return root, classes


def load_imagefolder(cfg: DatasetConfig, seed: int) -> DatasetSplits:
    """Load `<path>/train/<class>/*` and `<path>/val/<class>/*` (classes: the sorted train folders).

    Each image is decoded as RGB, its shorter side resized to `cfg.image_size` (antialiased) and
    centre-cropped square. `train_per_class`/`val_per_class` > 0 keep that many images per class,
    picked deterministically from `seed`; 0 keeps all. Raises `DatasetError` naming what is wrong.
    """
    root, classes = imagefolder_layout(cfg)
    picked: dict[str, list[tuple[Path, int]]] = {}
    for split, cap in (("train", cfg.train_per_class), ("val", cfg.val_per_class)):
        picked[split] = []
        for label, name in enumerate(classes):
            files = _image_files(root / split / name)
            if not files:
                raise _layout_error(
                    f"{root / split / name} holds no images (extensions: {', '.join(IMAGE_EXTENSIONS)})",
                    IMAGEFOLDER_LAYOUT,
                )
            picked[split] += [(path, label) for path in _pick(files, cap, f"{seed}:{split}:{name}")]
    splits = {split: _decode_all(items, cfg.image_size) for split, items in picked.items()}
    files = [path for split in ("train", "val") for path, _ in picked[split]]
    return DatasetSplits(
        train=splits["train"],
        val=splits["val"],
        classes=classes,
        fingerprint=_fingerprint(cfg, seed, root, files),
        eval_crop=cfg.eval_crop,
    )


def _class_folders(folder: Path) -> list[str]:
    return sorted(entry.name for entry in folder.iterdir() if entry.is_dir() and not entry.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    found = []
    for directory, subdirs, names in os.walk(folder):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        found += [Path(directory) / n for n in names if not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found)


def _pick(items: list[Any], cap: int, key: str) -> list[Any]:
    """`cap` items chosen by a seeded shuffle, kept in their sorted order; all when cap is 0."""
    if cap <= 0 or cap >= len(items):
        return list(items)
    chosen = sorted(random.Random(key).sample(range(len(items)), cap))  # str seeds are stable across runs
    return [items[i] for i in chosen]


def _decode_all(items: list[tuple[Path, int]], size: int) -> ImageSet:
    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:  # PIL releases the GIL while decoding
        arrays = list(pool.map(lambda item: _decode(item[0], size), items))
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor([label for _, label in items], dtype=torch.int64)
    return ImageSet(images=images, labels=labels)


def _decode(path: Path, size: int) -> np.ndarray:
    try:
        with Image.open(path) as opened:
            opened.draft("RGB", (size, size))  # JPEG: decode at a reduced scale that is still ≥ size
            image = opened.convert("RGB")
            width, height = image.size
            factor = size / min(width, height)
            new_w, new_h = max(size, round(width * factor)), max(size, round(height * factor))
            image = image.resize((new_w, new_h), Image.Resampling.BILINEAR, reducing_gap=None)
            left, top = (new_w - size) // 2, (new_h - size) // 2
            image = image.crop((left, top, left + size, top + size))
            return np.asarray(image, dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise DatasetError("dataset.path", f"cannot read image {path}: {error}; remove or replace it") from error


def _fingerprint(cfg: DatasetConfig, seed: int, root: Path, files: list[Path]) -> str:
    """sha256 of config, seed and each used file's relative path, size and mtime (cheap: no file bytes)."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"config": dataclasses.asdict(cfg), "seed": seed}, sort_keys=True).encode())
    for path in files:
        stat = path.stat()
        digest.update(f"\n{path.relative_to(root).as_posix()}\t{stat.st_size}\t{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# CIFAR


def cifar_layout(cfg: DatasetConfig, num_classes: int) -> tuple[Path, str, tuple[Any, ...]]:
    """Check the CIFAR python-format files are present without reading them."""
    if num_classes not in CIFAR_LAYOUT:
        raise ValueError(f"num_classes must be 10 or 100 (got {num_classes})")
    layout = CIFAR_LAYOUT[num_classes]
    if num_classes == 10:
        subfolder, meta_file, label_key, names_key = "cifar-10-batches-py", "batches.meta", "labels", "label_names"
        train_files, val_files = [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]
    else:
        subfolder, meta_file, label_key, names_key = "cifar-100-python", "meta", "fine_labels", "fine_label_names"
        train_files, val_files = ["train"], ["test"]
    root = Path(cfg.path or "").expanduser()
    if not cfg.path or not root.is_dir():
        raise _layout_error(f"{cfg.path!r} is not a folder", layout)
    if not (root / train_files[0]).exists() and (root / subfolder).is_dir():
        root = root / subfolder
    missing = [name for name in [*train_files, *val_files, meta_file] if not (root / name).is_file()]
    if missing:
        raise _layout_error(f"{root} is missing {', '.join(missing)}", layout)

    return root, layout, (meta_file, label_key, names_key, train_files, val_files)


def load_cifar(cfg: DatasetConfig, seed: int, num_classes: int) -> DatasetSplits:
    """Load CIFAR-10 (`num_classes=10`) or CIFAR-100 (100) from the python pickle files.

    `cfg.path` is the folder holding the batch files or its parent (with `cifar-10-batches-py/` or
    `cifar-100-python/`). CIFAR's release has no validation split, so its official **test** batch
    becomes pxd's **val** split, the one used for model selection: there is no held-out test set.
    Images are always 32×32 (`cfg.image_size` is ignored). Per-class caps work as for ImageFolder.
    The pickles are read with an unpickler that only builds numpy arrays, so a file cannot run code.
    """
    root, layout, names = cifar_layout(cfg, num_classes)
    meta_file, label_key, names_key, train_files, val_files = names
    classes = [str(name) for name in _read_pickle(root / meta_file, layout).get(names_key, [])]
    if len(classes) != num_classes:
        raise _layout_error(f"{root / meta_file} must list {num_classes} {names_key!r} (found {len(classes)})", layout)
    train = _read_batches(root, train_files, label_key, num_classes, layout)
    val = _read_batches(root, val_files, label_key, num_classes, layout)
    train = _cap_per_class(train, cfg.train_per_class, f"{seed}:train")
    val = _cap_per_class(val, cfg.val_per_class, f"{seed}:val")
    files = [root / name for name in [*train_files, *val_files, meta_file]]
    return DatasetSplits(
        train=train, val=val, classes=classes, fingerprint=_fingerprint(cfg, seed, root, files), eval_crop=cfg.eval_crop
    )


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
        raise _layout_error(f"cannot read {path} as a CIFAR python pickle: {error}", layout) from error
    if not isinstance(content, dict):
        raise _layout_error(f"{path} does not hold a dict as CIFAR python pickles do", layout)
    return {key.decode("latin1") if isinstance(key, bytes) else key: value for key, value in content.items()}


def _read_batches(root: Path, names: list[str], label_key: str, num_classes: int, layout: str) -> ImageSet:
    images, labels = [], []
    for name in names:
        batch = _read_pickle(root / name, layout)
        data, batch_labels = batch.get("data"), batch.get(label_key)
        if not isinstance(data, np.ndarray) or batch_labels is None:
            raise _layout_error(f"{root / name} lacks 'data' (uint8 array) or {label_key!r}", layout)
        batch_labels = np.asarray(batch_labels, dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != batch_labels.shape[0]:
            raise _layout_error(f"{root / name}: 'data' must be [N, 3072] with N labels (got {data.shape})", layout)
        if batch_labels.size and (batch_labels.min() < 0 or batch_labels.max() >= num_classes):
            raise _layout_error(f"{root / name}: labels must be in [0, {num_classes})", layout)
        images.append(torch.from_numpy(data.astype(np.uint8).reshape(-1, 3, 32, 32)))
        labels.append(torch.from_numpy(batch_labels))
    return ImageSet(images=torch.cat(images).contiguous(), labels=torch.cat(labels))


def _cap_per_class(images: ImageSet, cap: int, key: str) -> ImageSet:
    if cap <= 0:
        return images
    keep = []
    for label in torch.unique(images.labels).tolist():
        members = torch.nonzero(images.labels == label).flatten().tolist()
        keep += _pick(members, cap, f"{key}:{label}")
    index = torch.tensor(sorted(keep), dtype=torch.int64)
    return ImageSet(images=images.images[index].contiguous(), labels=images.labels[index])
