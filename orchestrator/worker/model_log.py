"""Logging the trained student to MLflow so it can be loaded and served, and warming MLflow's model logging up
in the background while the stages train."""

from __future__ import annotations

import logging
import tempfile
import threading
from typing import Any

import mlflow
import mlflow.pytorch
import numpy as np
import timm
import torch
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec
from torch import nn

__all__ = ["ModelLoggingWarmUp", "log_student"]

logger = logging.getLogger(__name__)


class ModelLoggingWarmUp:
    """MLflow's first model log in a process spends seconds building
    its map of every installed package's modules, to check the model's requirements against the
    environment, and importing its model machinery. A trial is a process of its own and logs one model,
    so every trial paid that on its critical path. Saving a one-parameter model to a temporary directory
    in a background thread, once the first epoch of a stage is done, pays it while the stages train; the
    trial waits for it before timing latency (it would disturb the timing) and before logging the
    student. It only saves time where the trial has CPU to spare beside training (a GPU trial, more cores
    than trial CPUs); on a saturated CPU it moves the work into training. A trial that trains nothing logs
    cold. A failed warm-up only costs the time back: the real log does the same work and reports its own
    errors."""

    def __init__(self, enabled: bool = True) -> None:
        self._enabled = enabled
        self._thread = threading.Thread(target=self._run, name="pxd-model-logging-warm-up", daemon=True)

    def start(self) -> None:
        if self._enabled and self._thread.ident is None:
            self._thread.start()

    @staticmethod
    def _run() -> None:

        try:

            with tempfile.TemporaryDirectory(prefix="pxd-warm-up-") as folder:
                mlflow.pytorch.save_model(torch.nn.Linear(1, 1), f"{folder}/model", pip_requirements=_requirements(),
                                          signature=_signature((-1, 1), (-1, 1)), serialization_format="pickle")
        except Exception:  # noqa: BLE001 - the real log repeats the work and raises what is wrong
            logger.warning("warming up MLflow's model logging failed; the student's log will take longer",
                           exc_info=True)

    def wait(self) -> None:
        if self._thread.is_alive():
            self._thread.join()


def _requirements() -> list[str]:
    # explicit requirements: inferring them starts a subprocess per trial

    return [f"torch=={torch.__version__.split('+')[0]}", f"timm=={timm.__version__}"]


def _signature(inputs: tuple[int, ...], outputs: tuple[int, ...]) -> Any:
    """A float32 tensor signature; -1 is any size (the batch)."""

    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), inputs)]),
                          outputs=Schema([TensorSpec(np.dtype(np.float32), outputs)]))


def log_student(student: nn.Module, resolution: int) -> str:
    """Log the student so it can be loaded and served: its signature takes any batch of RGB float32 images at
    its own resolution and gives one row of logits per image. Stated, not inferred from an input example:
    MLflow would then run the model twice more (inferring, then validating a serving example), and save and
    upload two more files, per trial."""

    student.eval()
    with torch.no_grad():
        classes = int(student(torch.zeros(1, 3, resolution, resolution)).shape[-1])
    info = mlflow.pytorch.log_model(
        student,
        name="student",
        signature=_signature((-1, 3, resolution, resolution), (-1, classes)),
        pip_requirements=_requirements(),
        # the whole module: MLflow 3.17's default (pt2, torch.export) pins the batch size of the input
        # example (1), and a deployed student must take any batch (pxd remeasure times batch N too)
        serialization_format="pickle",
    )
    return str(info.model_uri)
