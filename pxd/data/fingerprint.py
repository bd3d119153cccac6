"""What a dataset is, from its content: relative paths, sizes and a hash of each file's bytes.

Never absolute paths or modification times, so two copies of one dataset (two Ray nodes, a moved
folder) have the same fingerprint and hence share stage keys. Hashing every byte costs one read of
the dataset; a per-machine index (`<cache root>/file-hashes/`) remembers each file's hash beside its
size, mtime, ctime and inode, so later loads only `stat` the files, the way `git status` does.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pxd.errors import DatasetError

__all__ = ["FILE_HASH", "file_digests"]

FILE_HASH = "blake2b-256"  # recorded in the index: a different hash would never match
_READ_BYTES = 1 << 20
_CHUNK = 2048  # files per batch of thread-pool work: bounds the futures held at once


def _hash_file(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=32)
    with path.open("rb") as handle:
        while block := handle.read(_READ_BYTES):  # hashlib releases the GIL on large updates
            digest.update(block)
    return digest.hexdigest()


def _stat_key(path: str) -> list[int]:
    stat = os.stat(path)
    # ctime cannot be set back by a user (unlike mtime), so an edit in place is always noticed.
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]


def file_digests(root: Path, relpaths: list[str], index_dir: Path | None) -> dict[str, tuple[int, str]]:
    """`relpath → (size in bytes, blake2b hex of the bytes)` for files under `root`.

    Hashes found in the index at `index_dir` are reused when the file's stat is unchanged; the rest
    are computed (in threads) and written back. Raises `DatasetError` naming a file that cannot be read.
    """
    index_path = index_dir / f"{hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:24]}.json" if index_dir else None
    known = _read_index(index_path)
    found: dict[str, tuple[int, str]] = {}
    todo: list[tuple[str, list[int]]] = []
    base = str(root)
    for relpath in relpaths:
        try:
            key = _stat_key(os.path.join(base, relpath))
        except OSError as error:
            raise DatasetError("dataset.path", f"cannot read {root / relpath}: {error}") from error
        entry = known.get(relpath)
        if entry is not None and entry[:4] == key:
            found[relpath] = (key[0], entry[4])
        else:
            todo.append((relpath, key))
    if not todo:
        return found

    def digest(relpath: str) -> str:
        try:
            return _hash_file(root / relpath)
        except OSError as error:
            raise DatasetError("dataset.path", f"cannot read {root / relpath}: {error}") from error

    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for start in range(0, len(todo), _CHUNK):
            chunk = todo[start : start + _CHUNK]
            for (relpath, key), hexdigest in zip(chunk, pool.map(digest, [relpath for relpath, _ in chunk])):
                found[relpath] = (key[0], hexdigest)
                known[relpath] = [*key, hexdigest]
    if index_path is not None:
        _write_index(index_path, root, known)
    return found


def _read_index(path: Path | None) -> dict[str, list]:
    if path is None or not path.is_file():
        return {}
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # a damaged index only costs a re-hash; it is rewritten below
    if not isinstance(content, dict) or content.get("hash") != FILE_HASH:
        return {}
    files = content.get("files")
    return files if isinstance(files, dict) else {}


def _write_index(path: Path, root: Path, files: dict[str, list]) -> None:
    """Atomic replace: concurrent loaders may both write; each reader sees one whole index."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".partial")
    with os.fdopen(handle, "w") as out:
        json.dump({"hash": FILE_HASH, "root": str(root.resolve()), "files": files}, out)
    os.replace(partial, path)
