"""A trained student as plain data and tensors, so that loading it runs no code from wherever it was kept.

A student folder holds two files: the weights (`student.safetensors`, or `student.pt` where safetensors is
not installed, read with `torch.load(weights_only=True)`), whose metadata also holds the architecture to
rebuild the student from (`student_architecture`: what `pxd.models.create_model` needs), and a manifest
(`student.json`: the format, the weights file's name and its sha256). Nothing in either is unpickled: the
architecture is JSON, the weights are tensors, and the sha256 covers both. Whoever keeps the folder may
record the sha256 elsewhere too (the orchestrator puts it on the trial's MLflow run) and pass it to
`load_student`, which then trusts that record over the manifest beside the weights.

This module is also the student's MLflow loader module (`_load_pyfunc`), named in the logged model's
`MLmodel` file, so `mlflow.pyfunc.load_model` rebuilds it with this installed code and loads tensors only.
It never imports MLflow.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pxd.errors import PxdError, StudentRefused
from pxd.models import create_model
from pxd.parsing import parse_dataclass
from pxd.sections import ModelConfig, StudentConfig

__all__ = ["LOADER_MODULE", "STUDENT_FORMAT", "MANIFEST", "WEIGHTS_FILES", "student_architecture", "save_student",
           "write_student", "load_student", "rebuild_student", "weights_format", "StudentPredictor"]

LOADER_MODULE = __name__  # what a logged student's MLmodel names as its loader module: this one
STUDENT_FORMAT = "pxd-student/1"
MANIFEST = "student.json"
WEIGHTS_FILES = {"safetensors": "student.safetensors", "torch": "student.pt"}  # weights format → file name
_ARCHITECTURE_KEY = "pxd.architecture"  # in the weights file's metadata: the architecture as JSON
_BUILT_FROM = ("arch", "resolution", "patch_size", "depths", "widths")  # the ModelConfig fields that shape it


def student_architecture(model: ModelConfig, num_classes: int) -> dict[str, Any]:
    """What rebuilds a student: its architecture, input size and head; never its weights' origin (a
    checkpoint path or `pretrained`), so a rebuild reads no file and downloads nothing."""
    fields = {name: getattr(model, name) for name in _BUILT_FROM}
    for name in ("depths", "widths"):
        fields[name] = list(fields[name]) if fields[name] is not None else None
    return {**fields, "num_classes": int(num_classes)}


def rebuild_student(architecture: Mapping[str, Any]) -> nn.Module:
    """A fresh student of `architecture` (as `student_architecture` wrote it), its weights not loaded."""
    fields = {k: v for k, v in architecture.items() if k != "num_classes"}
    num_classes = architecture.get("num_classes")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise PxdError(f"the student's architecture has no valid num_classes: {num_classes!r}")
    config = parse_dataclass(StudentConfig, fields, prefix="student")
    return create_model(config, num_classes, field="student")


def weights_format() -> str:
    """safetensors where it is installed (it comes with timm), else torch's own format."""
    return "safetensors" if importlib.util.find_spec("safetensors") is not None else "torch"


def save_student(model: nn.Module, architecture: Mapping[str, Any], folder: str | Path,
                 fmt: str | None = None) -> str:
    """Write `model`'s weights and `architecture` into `folder`; returns the weights file's sha256."""
    return write_student(model.state_dict(), architecture, folder, fmt)


def write_student(state: Mapping[str, torch.Tensor], architecture: Mapping[str, Any], folder: str | Path,
                  fmt: str | None = None) -> str:
    """`save_student` from a state dict (tensors copied to CPU, contiguous and unshared, as safetensors wants)."""
    fmt = fmt or weights_format()
    if fmt not in WEIGHTS_FILES:
        raise ValueError(f"unknown weights format {fmt!r}; use one of {', '.join(WEIGHTS_FILES)}")
    tensors = {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in state.items()}
    described = json.dumps(dict(architecture), sort_keys=True)
    if fmt == "safetensors":
        from safetensors.torch import save  # optional: only the safetensors format needs it

        payload = save(tensors, metadata={_ARCHITECTURE_KEY: described})
    else:
        buffer = io.BytesIO()
        torch.save({_ARCHITECTURE_KEY: described, "state_dict": tensors}, buffer)
        payload = buffer.getvalue()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / WEIGHTS_FILES[fmt]).write_bytes(payload)
    sha256 = hashlib.sha256(payload).hexdigest()
    manifest = {"format": STUDENT_FORMAT, "weights": WEIGHTS_FILES[fmt], "weights_format": fmt, "sha256": sha256}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return sha256


def load_student(folder: str | Path, *, expected_sha256: str | None = None, source: str | None = None,
                 recorded_by: str = "the record it was checked against") -> nn.Module:
    """The student in `folder`, rebuilt from its architecture with its tensors loaded, in eval mode.

    Its weights file must match `expected_sha256` when given (the authority: a record kept apart from the
    files, such as the trial run's tag), else the sha256 in its manifest; `StudentRefused` naming `source`
    otherwise, before anything is read from the weights."""
    source = source or f"the student in {folder}"
    fmt, name, manifest_sha256 = _manifest(Path(folder), source)
    payload = (Path(folder) / name).read_bytes()
    actual = hashlib.sha256(payload).hexdigest()
    expected, by = (expected_sha256, recorded_by) if expected_sha256 else (manifest_sha256, f"its {MANIFEST}")
    if actual != expected:
        raise StudentRefused(f"{source}: its weights file {name} has sha256 {actual[:16]}…, but {by} says "
                             f"{str(expected)[:16]}…: it changed after it was logged, so it is not loaded; "
                             "re-run the trial to log it again")
    architecture, state = _read_weights(fmt, payload, source)
    model = rebuild_student(architecture)
    model.load_state_dict(state, strict=True)
    return model.eval()


def _manifest(folder: Path, source: str) -> tuple[str, str, str]:
    """(weights format, weights file name, sha256) from the folder's manifest, each checked."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise StudentRefused(f"{source}: no readable {MANIFEST} ({exc}); it is not a student pxd saved") from None
    fmt = manifest.get("weights_format") if isinstance(manifest, dict) else None
    if manifest.get("format") != STUDENT_FORMAT or fmt not in WEIGHTS_FILES or \
            manifest.get("weights") != WEIGHTS_FILES[fmt] or not isinstance(manifest.get("sha256"), str):
        raise StudentRefused(f"{source}: {MANIFEST} is not a {STUDENT_FORMAT} manifest; it is not a student this "
                             "pxd saved")
    return fmt, WEIGHTS_FILES[fmt], manifest["sha256"]


def _read_weights(fmt: str, payload: bytes, source: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The architecture and the tensors of a verified weights file; tensors only, nothing unpickled."""
    try:
        if fmt == "safetensors":
            from safetensors.torch import load  # optional: only the safetensors format needs it

            state = load(payload)
            (length,) = struct.unpack("<Q", payload[:8])  # the format's header: its length, then JSON
            described = json.loads(payload[8:8 + length]).get("__metadata__", {}).get(_ARCHITECTURE_KEY)
        else:
            loaded = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
            state, described = loaded["state_dict"], loaded[_ARCHITECTURE_KEY]
        architecture = json.loads(described)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one refusal naming the student
        raise StudentRefused(f"{source}: its weights file cannot be read as {fmt} tensors "
                             f"({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(architecture, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise StudentRefused(f"{source}: its weights file holds no architecture and tensors")
    return architecture, dict(state)


class StudentPredictor:
    """What `mlflow.pyfunc.load_model` wraps: logits (float32, one row per image) of a float32 batch of
    RGB images at the student's resolution; `get_raw_model()` is the `torch.nn.Module`."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module.eval()

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> np.ndarray:
        batch = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.inference_mode():
            return self.module(batch).float().numpy()

    def get_raw_model(self) -> nn.Module:
        return self.module


def _load_pyfunc(data_path: str) -> StudentPredictor:
    """MLflow's loader-module entry (`mlflow.pyfunc.load_model`): the student in `data_path`, checked
    against the sha256 in its manifest (the files' own record: it catches corruption; a trusted record
    kept apart is what `orchestrator.results.students.load_student` checks)."""
    return StudentPredictor(load_student(data_path))
