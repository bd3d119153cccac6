"""A sweep's folder under the results root: a new launch claims it; `--resume` finds it and refuses a space
that differs from the one it started with (only the budget may be raised)."""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
import yaml

from orchestrator.driver.budget import raised_only
from orchestrator.results import schema
from orchestrator.space.spec import optuna_directions
from pxd.errors import ConfigError
from pxd.paths import flatten

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from orchestrator.driver.options import SweepOptions
    from orchestrator.space.spec import SweepSpec

__all__ = ["default_name", "claim_sweep", "check_name_is_free"]


def default_name(spec: SweepSpec) -> str:
    # a random suffix: two launches in the same second never share a name
    return f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def claim_sweep(root: Path, spec: SweepSpec, options: SweepOptions) -> tuple[str, Path]:
    """The sweep's name and directory. A new launch claims a directory that did not exist (atomically:
    two launches with one --name cannot both get it); `--resume` finds the sweep and refuses a space that
    differs from the one it started with."""
    if options.resume:
        name = options.name or _latest_sweep(root, spec.name)
        sweep_dir = root / "sweeps" / str(name)
        if name is None or not (sweep_dir / "tune").exists():
            raise ConfigError("--resume", f"no sweep named {name or spec.name + '-*'!r} under {root / 'sweeps'} to resume; "
                                          "check --name and --root")

        stored = yaml.safe_load((sweep_dir / "spec.yaml").read_text())
        raised, refused = raised_only(_space_changes(stored, spec.raw))
        if refused:
            raise ConfigError("--resume", f"the space differs from the one sweep {name!r} started with "
                                          f"({'; '.join(refused)}); resume with the original space (only search.trials "
                                          "and search.timeout_s may be raised), or launch a new sweep")
        if raised:  # the space the sweep now runs; a later resume compares with this one
            (sweep_dir / "spec.yaml").write_text(yaml.safe_dump(spec.raw, sort_keys=False))
        return str(name), sweep_dir
    name = options.name or default_name(spec)
    sweep_dir = root / "sweeps" / name
    sweep_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        sweep_dir.mkdir()
    except FileExistsError:
        raise ConfigError("--name", f"a sweep named {name!r} already exists under {root / 'sweeps'}; pass --resume to "
                                    "continue it, or choose another --name (or none: default names are unique)") from None
    (sweep_dir / "spec.yaml").write_text(yaml.safe_dump(spec.raw, sort_keys=False))
    return name, sweep_dir


def _space_changes(before: dict[str, Any], after: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Differences between two spaces: dotted path → (old value, new value), None where unset."""
    old, new = flatten(before, lists=True), flatten(after, lists=True)
    missing = object()
    return {key: (old.get(key), new.get(key))
            for key in sorted(set(old) | set(new)) if old.get(key, missing) != new.get(key, missing)}


def check_name_is_free(client: MlflowClient, storage_url: str, name: str, spec: SweepSpec, *, resume: bool) -> None:
    """A new sweep's name is new to MLflow and to the Optuna storage; a resumed one's study still has
    the space's objectives."""

    if not resume and schema.find_sweep_run(client, name) is not None:
        raise ConfigError("--name", f"the tracking server already holds a sweep named {name!r}; choose another --name "
                                    "or pass --resume to continue it")
    try:
        study = optuna.load_study(study_name=name, storage=storage_url)
    except KeyError:
        return
    if not resume:
        raise ConfigError("--name", f"the Optuna storage already holds a study named {name!r}; choose another --name "
                                    "or pass --resume to continue it")
    search = spec.require_search()
    stored = (list(study.metric_names or []), [d.name.lower() for d in study.directions])
    wanted = (list(search.objective_metrics), [d.lower() for d in optuna_directions(search.objective_modes)])
    if study.metric_names and stored != wanted or [d for d in stored[1]] != wanted[1]:
        raise ConfigError("--resume", f"the Optuna study {name!r} optimises {stored[0] or stored[1]}, the space "
                                      f"{wanted[0]}; resume with the original space")


def _latest_sweep(root: Path, space_name: str) -> str | None:
    sweeps = sorted((p for p in (root / "sweeps").glob(f"{space_name}-*") if (p / "tune").exists()), key=lambda p: p.stat().st_mtime)
    return sweeps[-1].name if sweeps else None
