"""A local ImageFolder tree, decoded once per machine into the on-disk cache (`pxd.data.cache`).

Nothing is downloaded. Every image is decoded once, at the stored size, into uint8 [N, 3, S, S]
files that every later run maps read-only, so training epochs never touch a decoder again.
"""

from __future__ import annotations

import os
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from pxd.data.cache import load_planned
from pxd.data.plan import Item, Plan, apply_caps, hold_out
from pxd.errors import DatasetError
from pxd.sections import DatasetConfig
from pxd.types import DatasetSplits

__all__ = [
    "IMAGE_EXTENSIONS",
    "IMAGEFOLDER_LAYOUT",
    "imagefolder_layout",
    "load_imagefolder",
    "image_files",
    "decode_image",
    "layout_error",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")

IMAGEFOLDER_LAYOUT = """expected layout:
  <dataset.path>/
    train/
      <class_a>/  img_001.jpg  img_002.png ...
      <class_b>/  ...
    val/     (optional: without it, dataset.val_fraction of train/ is held out, per class)
      <class_a>/  ...   (the same class folders as train/)
    test/    (optional: evaluated once at the end as test_top1, never used to choose)
      <class_a>/  ..."""


def layout_error(message: str, layout: str) -> DatasetError:
    return DatasetError("dataset.path", f"{message}\n{layout}")


def imagefolder_layout(cfg: DatasetConfig) -> tuple[Path, list[str], list[str]]:
    """Check the layout without decoding anything; returns the root, the classes and the split folders."""
    root = Path(cfg.path or "").expanduser()
    if not cfg.path or not root.is_dir():
        raise layout_error(f"{cfg.path!r} is not a folder", IMAGEFOLDER_LAYOUT)
    if not (root / "train").is_dir():
        raise layout_error(f"{root} has no train/ folder", IMAGEFOLDER_LAYOUT)
    classes = _class_folders(root / "train")
    if not classes:
        raise layout_error(f"{root / 'train'} has no class folders", IMAGEFOLDER_LAYOUT)
    present = ["train"]
    for split in ("val", "test"):
        if not (root / split).is_dir():
            continue
        found = _class_folders(root / split)
        if found != classes:
            missing, extra = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
            raise layout_error(
                f"{split}/ and train/ must hold the same class folders; missing in {split}/: {missing}, "
                f"only in {split}/: {extra}",
                IMAGEFOLDER_LAYOUT,
            )
        present.append(split)
    return root, classes, present


def load_imagefolder(cfg: DatasetConfig, seed: int, *, progress: bool | None = None) -> DatasetSplits:
    """`<path>/train/<class>/*`, `val/` (or a held-out part of train/) and an optional `test/`.

    Classes are the sorted train/ folders. Each image is decoded as RGB, its shorter side resized to
    `cfg.image_size` (bilinear, antialiased by PIL's draft + reduce) and centre-cropped square.
    Caps per class (`cfg.per_class_caps()`, 0 = all) are drawn with `seed`. Raises `DatasetError`
    naming what is wrong, including every image that cannot be decoded (unless `on_bad_image: skip`).
    """
    root, classes, present = imagefolder_layout(cfg)
    splits: dict[str, list[Item]] = {}
    for split in present:
        splits[split] = []
        for label, name in enumerate(classes):
            files = image_files(root, f"{split}/{name}")
            if not files:
                raise layout_error(
                    f"{root / split / name} holds no images (extensions: {', '.join(IMAGE_EXTENSIONS)})",
                    IMAGEFOLDER_LAYOUT,
                )
            splits[split] += [Item(relpath, 0, label) for relpath in files]
    if "val" not in splits:
        splits["train"], splits["val"] = hold_out(splits["train"], cfg.val_fraction, cfg.split_seed)
    caps = apply_caps(splits, cfg, seed, str(root))
    plan = Plan("imagefolder", root, classes, cfg.image_size, {s: splits[s] for s in ("train", "val", "test") if s in splits}, caps)
    return load_planned(plan, cfg, lambda items: decode_files(root, items, cfg.image_size), progress=progress)


def _class_folders(folder: Path) -> list[str]:
    return sorted(entry.name for entry in folder.iterdir() if entry.is_dir() and not entry.name.startswith("."))


def image_files(root: Path, folder: str) -> list[str]:
    """Sorted posix paths, relative to `root`, of the images under `root/folder` (hidden entries skipped).

    Plain strings and os.walk: a million files must list in seconds (pathlib objects cost several times more).
    """
    found = []
    for directory, subdirs, names in os.walk(os.path.join(root, folder)):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        prefix = os.path.relpath(directory, root).replace(os.sep, "/")
        found += [f"{prefix}/{n}" for n in names if not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found)


def decode_files(root: Path, items: list[Item], size: int) -> list[np.ndarray | str]:
    """Decode `items` in threads (PIL releases the GIL while decoding); an error message per bad file."""
    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda item: decode_image(root / item.source, size), items))


def decode_image(path: Path, size: int) -> np.ndarray | str:
    """uint8 [3, size, size]: shorter side resized to `size`, centre crop; or why the file is unreadable."""
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
            return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))
    except (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError) as error:
        return f"{type(error).__name__}: {error}"
