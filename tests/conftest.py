"""Shared test fixtures: tiny configs that train in seconds on 2 CPU cores."""

from __future__ import annotations

import copy
import os
from typing import Any

import pytest

# Ray and MLflow read these at import; keep test runs quiet and local.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

TINY_CONFIG: dict[str, Any] = {
    "name": "tiny",
    "seed": 0,
    "dataset": {"kind": "synthetic", "image_size": 32, "num_classes": 4, "train_per_class": 16, "val_per_class": 8},
    "teacher": {"arch": "blockwise_resnet", "resolution": 32, "epochs": 2, "depths": [1, 1, 1, 1], "widths": [16, 16, 32, 32]},
    "assistant": {"enabled": True, "epochs": 1},
    "student": {"arch": "blockwise_resnet", "resolution": 16, "epochs": 1, "depths": [1, 1, 1, 1], "widths": [8, 16, 16, 32]},
    "distill": {"ce": 1.0, "kd": 1.0, "temperature": 4.0, "isrd": 0.5},
    "train": {"optimizer": "sgd", "lr": 0.05, "batch_size": 16, "epochs": 1, "device": "cpu"},
}


@pytest.fixture
def tiny_raw() -> dict[str, Any]:
    """A fresh copy of the tiny single-point config (as a YAML file would give it)."""
    return copy.deepcopy(TINY_CONFIG)


def write_photo_folder(root, *, side: int = 32, classes: int = 3, train: int = 6, val: int = 4) -> None:
    """A tiny ImageFolder tree (`train/`, `val/`) of coloured noise, one hue per class, made by the test."""
    import torch
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", train), ("val", val)):
        for label in range(classes):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for index in range(count):
                pixels = torch.rand(side, side, 3, generator=generator) * 80
                pixels[..., label] += 150
                Image.fromarray(pixels.to(torch.uint8).numpy()).save(folder / f"{index}.png")
