"""Logging the trained student to MLflow so it can be loaded and served, and warming MLflow's model logging up
in the background while the stages train.

The student is logged as tensors plus data (`pxd.students`: its weights and the architecture to rebuild it
from), as an MLflow model whose one flavor is `python_function` with pxd's own loader module, so nothing in
it is unpickled on load; the weights file's sha256 goes to the trial run (`Tag.STUDENT_SHA256`), and
`orchestrator.results.students` reads it back, checked.
"""

from __future__ import annotations

import importlib.metadata
import logging
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import numpy as np
import timm
import torch
from mlflow.entities import LoggedModelOutput, LoggedModelStatus
from mlflow.models import Model, ModelSignature
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.tracking import MlflowClient
from mlflow.types import Schema, TensorSpec
from torch import nn

from orchestrator.results.schema import Tag
from orchestrator.results.students import MODEL_DATA, MODEL_NAME
from pxd.config import ModelConfig
from pxd.students import LOADER_MODULE, save_student, student_architecture, weights_format, write_student

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
                files = _student_folder(folder)
                write_student(torch.nn.Linear(1, 1).state_dict(), {"warm_up": True}, files)
                mlflow.pyfunc.save_model(f"{folder}/model", loader_module=LOADER_MODULE, data_path=str(files),
                                         pip_requirements=_requirements(), signature=_signature((-1, 1), (-1, 1)))
        except Exception:  # noqa: BLE001 - the real log repeats the work and raises what is wrong
            logger.warning("warming up MLflow's model logging failed; the student's log will take longer",
                           exc_info=True)

    def wait(self) -> None:
        if self._thread.is_alive():
            self._thread.join()


def _requirements() -> list[str]:
    """What loading the student needs, stated: inferring it starts a subprocess per trial. pxd itself (the
    loader module) must be installed where it loads, but is not named: it is installed from its source, and a
    requirement on a package index could install something else under its name."""
    stated = [f"torch=={torch.__version__.split('+')[0]}", f"timm=={timm.__version__}"]
    if weights_format() == "safetensors":
        stated.append(f"safetensors=={importlib.metadata.version('safetensors')}")
    return stated


def _student_folder(folder: str) -> Path:
    """Where the student's files are written so that MLflow copies them to `MODEL_DATA` in the model."""
    return Path(folder) / Path(MODEL_DATA).name


def _signature(inputs: tuple[int, ...], outputs: tuple[int, ...]) -> Any:
    """A float32 tensor signature; -1 is any size (the batch)."""

    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), inputs)]),
                          outputs=Schema([TensorSpec(np.dtype(np.float32), outputs)]))


def log_student(student: nn.Module, config: ModelConfig, params: Mapping[str, Any] | None = None) -> str:
    """Log the student so it can be loaded and served: its weights and architecture (`config`, the trial's
    student section), as a logged model of the active (trial) run with `params` (the trial's), and its
    weights file's sha256 on that run. Its signature takes any batch of RGB float32 images at its own
    resolution and gives one row of logits per image. Stated, not inferred from an input example: MLflow
    would then run the model twice more (inferring, then validating a serving example), and save and
    upload two more files, per trial.

    The steps of `mlflow.pyfunc.log_model`, with MLflow's public client calls, minus the requests a sweep
    does not need: it reads the run back for its params (given here), and copies every metric of the run at
    step 0 to the model, one `get-history` request per metric name (a trial's epochs are steps 1 and on, so
    it copies nothing): ~8 of a trial's requests at scale (bench/scale.py)."""
    student.eval()
    resolution = config.resolution
    with torch.no_grad():
        classes = int(student(torch.zeros(1, 3, resolution, resolution)).shape[-1])
    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("log_student logs to the active (trial) run: call it inside mlflow.start_run()")
    client = MlflowClient(mlflow.get_tracking_uri())
    model = client.create_logged_model(run.info.experiment_id, name=MODEL_NAME, source_run_id=run.info.run_id,
                                       params={k: str(v) for k, v in (params or {}).items()})
    try:
        with tempfile.TemporaryDirectory(prefix="pxd-student-") as folder:
            files = _student_folder(folder)
            sha256 = save_student(student, student_architecture(config, classes), files)
            mlflow_model = Model(artifact_path=model.artifact_location, model_uuid=model.model_id,
                                 run_id=run.info.run_id, model_id=model.model_id)
            mlflow.pyfunc.save_model(f"{folder}/model", loader_module=LOADER_MODULE, data_path=str(files),
                                     signature=_signature((-1, 3, resolution, resolution), (-1, classes)),
                                     pip_requirements=_requirements(), mlflow_model=mlflow_model)
            repository = get_artifact_repository(model.artifact_location, tracking_uri=client.tracking_uri)
            repository.log_artifacts(f"{folder}/model")
    except BaseException:
        client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
        raise
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    client.log_outputs(run.info.run_id, [LoggedModelOutput(model.model_id, step=0)])
    client.set_tag(run.info.run_id, Tag.STUDENT_SHA256, sha256)
    return f"models:/{model.model_id}"
