"""Logged students, read back without running code from the tracking server.

A trial logs its student (`orchestrator.worker.model_log.log_student`) as an MLflow model whose only flavor
is `python_function` with pxd's own loader module (`pxd.students`) and the student's files under
`MODEL_DATA`: its weights as tensors with the architecture to rebuild it from, and a manifest; the weights
file's sha256 goes to the trial run's tag `pxd.student_sha256`. Anyone who can write the tracking server's
artifacts can replace those files; only who can write the run can change the tag.

`load_student` (what `pxd remeasure` times, what `pxd select` checks before registering, and the line pxd
prints for users) resolves a model URI or a trial run to the run that logged it, downloads the model,
checks it is pxd's format, checks the weights against the run's tag, and rebuilds the student from tensors
only. It refuses, naming the run (`StudentRefused`):
- a weights file whose sha256 differs from the run's tag, or a run with no tag;
- a pickled PyTorch model (MLflow's `pytorch` flavor, what pxd logged before): unpickling it runs whatever
  code the file names. Students an earlier pxd logged load with `trust_pickles=True` (`--trust-pickles`),
  the user accepting that risk; never a pickle in place of a student logged as tensors (its run has a tag).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from orchestrator.results.schema import Tag
from orchestrator.tracking.server import fluent_tracking_uri
from pxd.errors import StudentRefused

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient
    from torch import nn

__all__ = ["TRUST_FLAG", "MODEL_NAME", "MODEL_DATA", "TENSORS", "PICKLE", "StudentSource", "student_source",
           "load_student", "check_student"]

TRUST_FLAG = "--trust-pickles"
MODEL_NAME = "student"  # the logged model's name on its trial run
MODEL_DATA = "data/student"  # the student's files inside the logged model (its MLmodel's python_function data)
TENSORS, PICKLE = "tensors", "pickle"  # how a logged student is stored: pxd's files, or a pickled module


@dataclass(frozen=True)
class StudentSource:
    """A logged student: a URI naming one fixed model (an alias resolved once) and the run that logged it."""

    model_uri: str
    run_id: str | None

    @property
    def named(self) -> str:
        return f"the student of run {self.run_id}" if self.run_id else f"the student {self.model_uri}"


def student_source(client: MlflowClient, reference: str) -> StudentSource:
    """Where `reference` (models:/m-ID, models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN/PATH, or a trial
    run id) leads, and which run logged it, asked of the tracking server (never of the model's files)."""
    if reference.startswith("models:/"):
        rest = reference.removeprefix("models:/")
        if rest.startswith("m-") and "/" not in rest and "@" not in rest:
            return StudentSource(reference, client.get_logged_model(rest).source_run_id)
        name, alias_sign, alias = rest.partition("@")
        if alias_sign:
            version = client.get_model_version_by_alias(name, alias)
        else:
            name, _, number = rest.rpartition("/")
            version = client.get_model_version(name, number)
        model_id = getattr(version, "model_id", None)
        uri = f"models:/{model_id}" if model_id else f"models:/{name}/{version.version}"
        return StudentSource(uri, version.run_id)
    if reference.startswith("runs:/"):
        return StudentSource(reference, reference.removeprefix("runs:/").split("/", 1)[0])
    logged = client.get_run(reference).data.tags.get(Tag.MODEL_URI)
    if not logged:
        raise StudentRefused(f"run {reference} has no logged student (no tag {Tag.MODEL_URI}): only a COMPLETE "
                             "trial logs one")
    return StudentSource(student_source(client, logged).model_uri, reference)


def load_student(reference: str, tracking_uri: str | None = None, *, trust_pickles: bool = False) -> nn.Module:
    """The logged student `reference` names, checked and rebuilt from tensors (module docstring), on the
    CPU in eval mode. `tracking_uri`: None is MLflow's own (MLFLOW_TRACKING_URI)."""
    with _downloaded(reference, tracking_uri) as (local, source, sha256):
        kind = _checked_kind(local, source, sha256, trust_pickles)
        if kind == PICKLE:
            import mlflow.pytorch  # start-up cost; only for a pickled student the user chose to trust

            return mlflow.pytorch.load_model(str(local), map_location="cpu")
        return _rebuilt(local, source, sha256)


def check_student(reference: str, tracking_uri: str | None = None, *, trust_pickles: bool = False) -> str:
    """What `load_student` checks, without unpickling a trusted pickle: `TENSORS` (checked and rebuilt) or
    `PICKLE` (refused unless `trust_pickles`); `StudentRefused` naming the run otherwise."""
    with _downloaded(reference, tracking_uri) as (local, source, sha256):
        kind = _checked_kind(local, source, sha256, trust_pickles)
        if kind == TENSORS:
            _rebuilt(local, source, sha256)
        return kind


def _rebuilt(local: Path, source: StudentSource, sha256: str | None) -> nn.Module:
    """The student's files checked against its run's sha256, and the student rebuilt from their tensors."""
    from pxd.students import load_student as load_student_files  # torch and timm (start-up cost of the CLI)

    return load_student_files(local / MODEL_DATA, expected_sha256=sha256, source=source.named,
                              recorded_by=f"its run's tag {Tag.STUDENT_SHA256}")


@contextlib.contextmanager
def _downloaded(reference: str, tracking_uri: str | None) -> Iterator[tuple[Path, StudentSource, str | None]]:
    """The model's files in a temporary folder, where they came from, and the sha256 its run recorded."""
    import mlflow  # start-up cost of the CLI, as in every results module
    from mlflow.tracking import MlflowClient

    scope = fluent_tracking_uri(tracking_uri) if tracking_uri else contextlib.nullcontext()
    with scope, tempfile.TemporaryDirectory(prefix="pxd-student-") as folder:
        client = MlflowClient(tracking_uri)
        source = student_source(client, reference)
        sha256 = client.get_run(source.run_id).data.tags.get(Tag.STUDENT_SHA256) if source.run_id else None
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source.model_uri, dst_path=folder))
        yield local, source, sha256


def _flavors(local: Path) -> dict[str, Any]:
    """The model's flavors from its MLmodel file, read as plain YAML (MLflow's own loader is not used: it
    would import whatever module, or run whatever code path, the file names)."""
    try:
        flavors = yaml.safe_load((local / "MLmodel").read_text()).get("flavors")
    except (OSError, yaml.YAMLError, AttributeError):
        return {}
    return flavors if isinstance(flavors, dict) else {}


def _checked_kind(local: Path, source: StudentSource, sha256: str | None, trust_pickles: bool) -> str:
    """TENSORS or PICKLE when this student may be read so; `StudentRefused` naming its run otherwise."""
    from pxd.students import LOADER_MODULE  # torch and timm (start-up cost of the CLI)

    flavors = _flavors(local)
    function = flavors.get("python_function") or {}
    if function.get("loader_module") == LOADER_MODULE and function.get("data") == MODEL_DATA:
        if not sha256:
            raise StudentRefused(f"{source.named} has no recorded sha256 (tag {Tag.STUDENT_SHA256} on its run), so "
                                 "its files cannot be checked; not loaded. Re-run the trial to log it again")
        return TENSORS
    if "pytorch" not in flavors:
        raise StudentRefused(f"{source.named} is not a student pxd logged (MLflow flavors: "
                             f"{', '.join(sorted(flavors)) or 'none'}); not loaded")
    if sha256:
        raise StudentRefused(f"{source.named} was logged as tensors (its run records their sha256), but its files "
                             "now hold a pickled PyTorch model: they were replaced after logging. Not loaded, "
                             f"{TRUST_FLAG} or not; re-run the trial to log it again")
    if not trust_pickles:
        raise StudentRefused(f"{source.named} is a pickled PyTorch model (logged by a pxd before students were "
                             "saved as tensors); unpickling it runs code from whoever can write the tracking "
                             "server's artifacts, so it is not loaded. Re-run the trial to log it as tensors, or "
                             f"pass {TRUST_FLAG} (trust_pickles=True) to load it anyway, accepting that risk")
    return PICKLE
