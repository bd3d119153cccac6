"""One teacher per sweep, one assistant per student architecture: stage keys hold only what
determines each stage, and a space whose searched values would change the teacher is refused."""

from __future__ import annotations

import copy

import optuna
import pytest

from orchestrator.space.spec import load_spec, materialize, optuna_directions, parse_spec, sample_params
from pxd.errors import ConfigError
from pxd.pipeline import stage_keys
from tests.conftest import TINY_CONFIG


def _space(**edits):
    raw = copy.deepcopy(TINY_CONFIG)
    raw["student"]["arch"] = {"choice": ["blockwise_resnet", "resnet10t"]}
    raw["search"] = {"trials": 4, "reference_point": {"gmacs": 1.0, "pixels": 1024}}
    for path, value in edits.items():
        section, key = path.split("__")
        raw.setdefault(section, {})[key] = value
    return raw


def _keys_of_many_draws(spec, count=12):
    study = optuna.create_study(directions=optuna_directions(spec.objective_modes),
                                sampler=optuna.samplers.RandomSampler(seed=1))
    draws = []
    for _ in range(count):
        params = sample_params(spec, study.ask())
        draws.append((params, stage_keys(materialize(spec, params), "data")))
    return draws


def test_searching_train_settings_is_refused_unless_the_teacher_has_its_own():
    raw = _space(train__lr={"loguniform": [0.01, 0.1]})
    with pytest.raises(ConfigError) as error:
        parse_spec(raw)
    assert error.value.field == "train.lr" and "teacher.train.lr" in error.value.message
    raw = _space(train__batch_size={"choice": [8, 16]})
    with pytest.raises(ConfigError, match="teacher.train.batch_size"):
        parse_spec(raw)
    raw = _space(train__lr={"loguniform": [0.01, 0.1]}, teacher__train={"lr": 0.05})
    draws = _keys_of_many_draws(parse_spec(raw))
    assert len({keys["teacher"] for _, keys in draws}) == 1


def test_train_epochs_may_be_searched_freely():
    draws = _keys_of_many_draws(parse_spec(_space(train__epochs={"choice": [1, 2]})))
    assert len({keys["teacher"] for _, keys in draws}) == 1  # the teacher has teacher.epochs


def test_searched_student_weights_do_not_split_assistants():
    # a continuous kd, a temperature and an lr for the student: still one assistant per architecture
    raw = _space(distill__kd={"uniform": [0.1, 1.0]}, distill__temperature={"choice": [1.0, 2.0, 4.0]},
                 train__lr={"loguniform": [0.01, 0.1]}, teacher__train={"lr": 0.05})
    spec = parse_spec(raw)
    assert any("assistant.distill.kd" in note for note in spec.notes)
    draws = _keys_of_many_draws(spec)
    assistants = {keys["assistant"] for _, keys in draws}
    archs = {params["student.arch"] for params, _ in draws}
    assert len(assistants) == len(archs) == 2
    assert len({keys["student"] for _, keys in draws}) == len(draws)  # every student is its own


def test_the_assistant_may_still_search_its_own_settings():
    raw = _space(assistant__distill={"kd": {"choice": [0.5, 1.0]}})
    spec = parse_spec(raw)
    assert "assistant.distill.kd" in {p.name for p in spec.params}
    draws = _keys_of_many_draws(spec, 16)
    pairs = {(params["student.arch"], params["assistant.distill.kd"]) for params, _ in draws}
    assert len({keys["assistant"] for _, keys in draws}) == len(pairs)


def test_a_single_run_keeps_one_distill_section_for_both_stages():
    config = parse_spec(copy.deepcopy(TINY_CONFIG)).fixed_config()
    assert config.assistant_distill == config.distill and config.teacher_train == config.train


@pytest.mark.parametrize("space", ["quickstart", "imagefolder_pd"])
def test_shipped_spaces_train_one_teacher_and_one_assistant_per_architecture(space, tmp_path):
    raw = load_spec(f"search_spaces/{space}.yaml").raw if space == "quickstart" else None
    if raw is None:
        from orchestrator.space.spec import read_yaml

        raw = read_yaml(f"search_spaces/{space}.yaml")
        raw["dataset"]["path"] = str(tmp_path)
        for split in ("train", "val"):
            (tmp_path / split / "a").mkdir(parents=True)
    spec = parse_spec(raw)
    draws = _keys_of_many_draws(spec, 16)
    assert len({keys["teacher"] for _, keys in draws}) == 1

    def architecture(params):  # block-wise depths/widths make different architectures
        student = materialize(spec, params).student
        return (student.arch, student.depths, student.widths)

    by_arch: dict = {}
    for params, keys in draws:
        if "assistant" in keys:  # a draw with `assistant.enabled: false` distils from the teacher directly
            by_arch.setdefault(architecture(params), set()).add(keys["assistant"])
    assert all(len(keys) == 1 for keys in by_arch.values()), by_arch


@pytest.mark.parametrize(("max_concurrent", "available", "largest", "expected"), [
    (2, 2.0, 2.0, 2.0),  # the laptop default: both trial slots' CPUs
    (8, 64.0, 16.0, 8.0),  # what the slots would hold, not the whole cluster
    (32, 64.0, 16.0, 16.0),  # one task runs on one node
    (2, 1.0, 2.0, 1.0),  # another sweep holds a CPU: only what is free, never waiting for more
    (2, 0.0, 2.0, 1.0),  # nothing free: still one trial's CPUs, as before
])
def test_the_teacher_warm_up_takes_the_cpus_of_the_idle_trial_slots(max_concurrent, available, largest, expected):
    from orchestrator.driver.warmup import warm_up_cpus

    raw = _space(search__max_concurrent=max_concurrent, search__resources={"cpu": 1, "gpu": 0})
    assert warm_up_cpus(parse_spec(raw).require_search(), available, largest) == expected


def test_the_teacher_warm_up_lands_on_a_worker_that_has_imported_and_cached_its_dataset(ray_local, tmp_path):
    """While the driver starts the tracking server, a Ray worker imports torch, timm and MLflow and decodes
    the dataset into its cache; the warm-up task that follows (same call as `warm_teacher`) runs there."""
    from PIL import Image

    from orchestrator.driver.warmup import ready_warm_up_worker

    for split in ("train", "val"):
        for label, colour in (("red", (255, 0, 0)), ("blue", (0, 0, 255))):
            (tmp_path / "data" / split / label).mkdir(parents=True)
            for index in range(2):
                Image.new("RGB", (20, 20), colour).save(tmp_path / "data" / split / label / f"{index}.jpg")
    raw = _space()
    raw["dataset"] = {"kind": "imagefolder", "path": str(tmp_path / "data"), "image_size": 16,
                      "cache_dir": str(tmp_path / "cache")}
    spec = parse_spec(raw)

    ready_pid = ray_local.get(ready_warm_up_worker(spec))
    assert any(path.is_file() for path in (tmp_path / "cache").rglob("*")), "the dataset was not cached"

    def warm_up_probe() -> tuple[int, bool]:
        import os
        import sys

        return os.getpid(), all(name in sys.modules for name in ("torch", "timm", "mlflow.tracking", "sqlalchemy", "pxd.pipeline"))

    task = ray_local.remote(num_cpus=1, max_retries=0)(warm_up_probe)
    assert ray_local.get(task.remote()) == (ready_pid, True)
