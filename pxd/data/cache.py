"""The on-disk cache of decoded datasets: decoded once per machine, then mapped read-only by every run.

Concurrent trials map the same files, so they share one copy in the OS page cache, and data larger
than memory still trains (the OS pages it in and out). Layout under the cache root
(`dataset.cache_dir`, else `$PXD_CACHE_DIR`, else `$XDG_CACHE_HOME/pxd/datasets`, else
`~/.cache/pxd/datasets`):

    <key>/                          key = <fingerprint[:32]>-f<CACHE_FORMAT_VERSION>-pxd<pxd version>
        train.u8  val.u8  test.u8   uint8 [N, 3, S, S] in C order, no header
        train.labels.npy ...        int64 [N]
        complete.json               written last: fingerprint, versions, counts, skipped images
    <key>.lock                      flock: one process builds, the others wait, then map
    <key>.building-<pid>/           a build in progress, renamed to <key> once complete
    file-hashes/  cifar-labels/     per-machine indexes that make warm loads cheap

A directory without a `complete.json` that matches the fingerprint, the format version and the pxd
version is never read: it is removed and built again.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import json
import logging
import os
import platform
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from pxd.data.fingerprint import file_digests
from pxd.data.plan import Item, Plan, plan_fingerprint
from pxd.errors import DatasetError
from pxd.sections import DatasetConfig
from pxd.types import DatasetSplits, ImageSet

__all__ = ["CACHE_FORMAT_VERSION", "MARKER", "Decoder", "CachedData", "cache_root", "load_planned", "load_or_build"]

LOG = logging.getLogger("pxd.data")

# Bump when the files' layout changes: caches of another format are never read.
CACHE_FORMAT_VERSION = 1
MARKER = "complete.json"
_CHUNK_BYTES = 64 << 20  # decoded bytes held in memory at once while building

# Decodes a chunk of items into uint8 [3, S, S] C-contiguous arrays, or an error message per bad image.
Decoder = Callable[[list[Item]], list["np.ndarray | str"]]


@dataclass
class CachedData:
    splits: dict[str, ImageSet]
    skipped: list[dict[str, Any]]  # {"split", "source", "row", "error"} per image left out
    path: Path
    built: bool  # this call decoded it (False: mapped an existing cache)


def cache_root(cfg: DatasetConfig) -> Path:
    """Where decoded datasets live on this machine (see the module docstring for the order)."""
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser().absolute()
    if os.environ.get("PXD_CACHE_DIR"):
        return Path(os.environ["PXD_CACHE_DIR"]).expanduser().absolute()
    base = Path(os.environ["XDG_CACHE_HOME"]).expanduser() if os.environ.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "pxd" / "datasets"


def pxd_version() -> str:
    try:
        return importlib.metadata.version("pxd")
    except importlib.metadata.PackageNotFoundError:
        return "source"  # a checkout that is not installed: the format version still guards the layout


def load_planned(
    plan: Plan,
    cfg: DatasetConfig,
    decoder: Decoder,
    *,
    progress: bool | None = None,
    digests: dict[str, tuple[int, str]] | None = None,
) -> DatasetSplits:
    """Fingerprint `plan`, map its cache (building it first if needed) and apply `cfg.on_bad_image`."""
    root = cache_root(cfg)
    if digests is None:
        digests = file_digests(plan.root, plan.sources(), root / "file-hashes")
    fingerprint = plan_fingerprint(plan, digests)
    cached = load_or_build(plan, fingerprint, decoder, root, progress=progress)
    if cached.skipped:
        listing = "; ".join(
            f"cannot read image {_describe_item(plan.root, entry)}: {entry['error']}" for entry in cached.skipped[:10]
        )
        more = f" (and {len(cached.skipped) - 10} more)" if len(cached.skipped) > 10 else ""
        if cfg.on_bad_image == "error":
            raise DatasetError(
                "dataset.path",
                f"{len(cached.skipped)} image(s) cannot be decoded: {listing}{more}; remove or replace them, "
                "or set dataset.on_bad_image: skip to leave them out",
            )
        LOG.warning("dataset.on_bad_image is skip: left out %d unreadable image(s): %s%s", len(cached.skipped), listing, more)
    return DatasetSplits(
        train=cached.splits["train"],
        val=cached.splits["val"],
        test=cached.splits.get("test"),
        classes=list(plan.classes),
        fingerprint=fingerprint,
        eval_crop=cfg.eval_crop,
        caps=dict(plan.caps),
        skipped=[_describe_item(Path(), entry) for entry in cached.skipped],
    )


def _describe_item(root: Path, entry: dict[str, Any]) -> str:
    return (root / entry["source"]).as_posix()


def load_or_build(plan: Plan, fingerprint: str, decoder: Decoder, root: Path, *, progress: bool | None = None) -> CachedData:
    """Map the cache of `fingerprint` under `root`, building it first (once, whoever races) if needed."""
    key = f"{fingerprint[:32]}-f{CACHE_FORMAT_VERSION}-pxd{pxd_version()}"
    final = root / key
    marker = _valid_marker(final, fingerprint, quiet=True)
    if marker is not None:
        return _open(final, marker, built=False)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DatasetError("dataset.cache_dir", f"cannot create the dataset cache at {root}: {error}") from error
    with _exclusive(root / f"{key}.lock", plan.root):
        marker = _valid_marker(final, fingerprint, quiet=False)
        if marker is not None:  # another process built it while this one waited
            return _open(final, marker, built=False)
        _remove_leftovers(root, key)
        _check_disk(root, plan)
        building = root / f"{key}.building-{os.getpid()}"
        marker = _build(building, plan, fingerprint, decoder, progress)
        os.rename(building, final)  # atomic: a reader sees no cache or a complete one
        _fsync_dir(root)
    return _open(final, marker, built=True)


@contextmanager
def _exclusive(lock_path: Path, dataset: Path) -> Iterator[None]:
    with lock_path.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            LOG.warning("another process is decoding %s into %s; waiting for it", dataset, lock_path.parent)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _valid_marker(folder: Path, fingerprint: str, *, quiet: bool) -> dict[str, Any] | None:
    """The marker when `folder` holds a complete cache of `fingerprint` in this format, else None."""
    if not folder.exists():
        return None
    problem = None
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        marker, problem = None, f"no readable {MARKER} (a build that did not finish)"
    if marker is not None:
        expected = {"fingerprint": fingerprint, "format": CACHE_FORMAT_VERSION, "pxd_version": pxd_version()}
        wrong = [name for name, value in expected.items() if marker.get(name) != value]
        if wrong:
            problem = f"built for another {' and '.join(wrong)}"
        else:
            image_bytes = 3 * marker["image_size"] ** 2
            for split, count in marker["counts"].items():
                path = folder / f"{split}.u8"
                if not path.is_file() or path.stat().st_size != count * image_bytes:
                    problem = f"{path.name} is not {count} images long"
    if problem is None:
        return marker
    if not quiet:
        LOG.warning("ignoring the dataset cache at %s: %s; decoding it again", folder, problem)
    return None


def _remove_leftovers(root: Path, key: str) -> None:
    """Called under the lock: whatever is there for `key` is invalid or from a crashed build."""
    for path in [root / key, *root.glob(f"{key}.building-*")]:
        if path.exists():
            shutil.rmtree(path)


def _check_disk(root: Path, plan: Plan) -> None:
    count = sum(len(items) for items in plan.splits.values())
    needed = count * (plan.image_bytes() + 8) + (1 << 20)
    free = shutil.disk_usage(root).free
    if needed > free:
        raise DatasetError(
            "dataset.cache_dir",
            f"decoding {count} images of {plan.root} at {plan.image_size}px needs {_gib(needed)} but {root} has "
            f"{_gib(free)} free; free some space or point dataset.cache_dir (or $PXD_CACHE_DIR) at a larger disk",
        )


def _gib(count: int) -> str:
    return f"{count / 1024**3:.2f} GiB"


def _build(building: Path, plan: Plan, fingerprint: str, decoder: Decoder, progress: bool | None) -> dict[str, Any]:
    """Decode chunk by chunk, writing each image straight to its file: memory holds one chunk only."""
    building.mkdir()
    total = sum(len(items) for items in plan.splits.values())
    started = time.perf_counter()
    LOG.info("decoding %d images of %s into %s (once per machine)", total, plan.root, building.parent)
    bar = _progress_bar(total, f"decoding {plan.root.name}", progress)
    image_bytes = plan.image_bytes()
    chunk = max(16, min(1024, _CHUNK_BYTES // image_bytes))
    counts: dict[str, int] = {}
    skipped: list[dict[str, Any]] = []
    for split, items in plan.splits.items():
        labels: list[int] = []
        with (building / f"{split}.u8").open("wb") as out:
            _preallocate(out.fileno(), len(items) * image_bytes, building.parent)
            for start in range(0, len(items), chunk):
                part = items[start : start + chunk]
                for item, decoded in zip(part, decoder(part), strict=True):
                    if isinstance(decoded, str):
                        skipped.append({"split": split, "source": item.source, "row": item.row, "error": decoded})
                        continue
                    out.write(memoryview(decoded).cast("B"))
                    labels.append(item.label)
                if bar is not None:
                    bar.update(len(part))
            out.truncate(out.tell())  # skipped images leave the preallocated tail unused
            out.flush()
            os.fsync(out.fileno())
        np.save(building / f"{split}.labels.npy", np.asarray(labels, dtype=np.int64))
        counts[split] = len(labels)
    if bar is not None:
        bar.close()
    marker = {
        "fingerprint": fingerprint,
        "format": CACHE_FORMAT_VERSION,
        "pxd_version": pxd_version(),
        "image_size": plan.image_size,
        "classes": plan.classes,
        "counts": counts,
        "skipped": skipped,
        "built_by": f"{platform.node()}:{os.getpid()}",
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "decode_seconds": round(time.perf_counter() - started, 3),
    }
    partial = building / f"{MARKER}.partial"
    with partial.open("w") as out:
        json.dump(marker, out, indent=1)
        out.flush()
        os.fsync(out.fileno())
    os.replace(partial, building / MARKER)  # the marker is the last thing written
    LOG.info("decoded %d images in %.1f s", total, marker["decode_seconds"])
    return marker


def _preallocate(descriptor: int, size: int, root: Path) -> None:
    if size <= 0:
        return
    try:
        os.posix_fallocate(descriptor, 0, size)
    except OSError as error:
        raise DatasetError(
            "dataset.cache_dir", f"cannot reserve {_gib(size)} for the dataset cache under {root}: {error}; "
            "free some space or point dataset.cache_dir (or $PXD_CACHE_DIR) at a larger disk",
        ) from error


def _fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _open(folder: Path, marker: dict[str, Any], *, built: bool) -> CachedData:
    size = marker["image_size"]
    splits = {}
    for split, count in marker["counts"].items():
        labels = torch.from_numpy(np.load(folder / f"{split}.labels.npy"))
        if count == 0:  # numpy cannot map an empty file
            images = torch.empty((0, 3, size, size), dtype=torch.uint8)
        else:
            array = np.memmap(folder / f"{split}.u8", dtype=np.uint8, mode="r", shape=(count, 3, size, size))
            with warnings.catch_warnings():
                # The mapping is read-only on purpose (every run shares these pages); pxd never writes
                # into dataset tensors: slicing is read, and every transform makes a new tensor.
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                images = torch.from_numpy(array)
        splits[split] = ImageSet(images=images, labels=labels)
    return CachedData(splits=splits, skipped=list(marker["skipped"]), path=folder, built=built)


def _progress_bar(total: int, description: str, progress: bool | None) -> Any:
    if progress is None:
        progress = sys.stderr.isatty()
    if not progress:
        return None
    return tqdm(total=total, desc=description, unit="img", file=sys.stderr, dynamic_ncols=True)
