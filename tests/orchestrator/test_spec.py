"""Search-space files: shipped spaces, sampling, materialising, samplers, constraints, and errors
that name the field and say what to do."""

from __future__ import annotations

import copy
import math
import pickle
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml

from orchestrator.space.spec import (
    constraint_names,
    constraint_values,
    define_by_run,
    is_feasible,
    load_spec,
    make_sampler,
    materialize,
    optuna_directions,
    parse_spec,
    sample_params,
)
from pxd.config import PipelineConfig
from pxd.errors import ConfigError
from pxd.models import BLOCKWISE_FAMILIES

SPACES = Path(__file__).resolve().parents[2] / "search_spaces"
DEPTH_PARAMS = ("student.depths.1", "student.widths.2")

optuna.logging.set_verbosity(optuna.logging.WARNING)


def small_space() -> dict[str, Any]:
    """A tiny valid search space (synthetic data) that each malformed case breaks in one place."""
    return {
        "name": "unit",
        "seed": 3,
        "dataset": {"kind": "synthetic", "image_size": 32, "num_classes": 4},
        # the teacher's own lr: train.lr is searched (one teacher per sweep)
        "teacher": {"arch": "resnet10t", "resolution": 32, "epochs": 1, "train": {"lr": 0.05}},
        "student": {
            "arch": {"choice": ["resnet10t", "blockwise_resnet"]},
            "resolution": {"int": [8, 32], "step": 8},
            "depths": [1, {"choice": [1, 2]}, 1, 1],
            "widths": [8, 16, {"choice": [16, 32]}, 32],
        },
        "distill": {"kd": {"uniform": [0.0, 1.0]}, "temperature": {"choice": [2.0, 4.0]}},
        "train": {"lr": {"loguniform": [0.01, 0.1]}, "epochs": 1},
        "search": {"trials": 4, "reference_point": {"gmacs": 1.0, "pixels": 2048}},  # above 32 px students
    }


def fixed_config_dict() -> dict[str, Any]:
    raw = small_space()
    raw["student"] = {"arch": "resnet10t", "resolution": 16}
    raw["distill"] = {"kd": 0.5}
    raw["train"] = {"lr": 0.05, "epochs": 1}
    del raw["search"]
    return raw


# ---------------------------------------------------------------------------------------------
# shipped spaces


def test_quickstart_parses_as_shipped_and_is_a_real_search():
    spec = load_spec(SPACES / "quickstart.yaml")
    search = spec.require_search()
    params = {p.name: p.distribution for p in spec.params}
    assert spec.raw["dataset"]["kind"] == "synthetic"
    assert search.trials >= 8 and search.max_concurrent == 2
    assert search.sampler.name in ("nsga2", "tpe") and "seed" in spec.raw["search"]["sampler"]
    archs = params["student.arch"].values
    assert len(archs) >= 2 and any(a in BLOCKWISE_FAMILIES for a in archs)
    sizes = params["student.resolution"].values
    assert len(sizes) >= 3 and max(sizes) <= spec.raw["teacher"]["resolution"] == 64
    assert any(name.startswith("distill.") for name in params)
    assert spec.objective_metrics == ("val_top1", "gmacs", "pixels")
    assert set(search.reference_point) == {"val_top1", "gmacs", "pixels"}


def _with_dataset_path(name: str, path: Path) -> dict[str, Any]:
    raw = yaml.safe_load((SPACES / name).read_text())
    raw["dataset"]["path"] = str(path)
    return raw


def test_imagefolder_pd_space_validates(tmp_path):
    spec = parse_spec(_with_dataset_path("imagefolder_pd.yaml", tmp_path))
    params = {p.name: p.distribution for p in spec.params}
    assert spec.raw["teacher"]["arch"] == "resnet50" and spec.raw["teacher"]["resolution"] == 224
    assert set(params["student.arch"].values) == {"resnet18", "mobilenetv3_large_100", "vit_tiny_patch16_224"}
    assert set(params["student.resolution"].values) == {56, 84, 112}
    assert spec.raw["dataset"]["eval_crop"] == 0.875
    assert spec.require_search().resources.gpu > 0


def test_cifar_space_validates(tmp_path):
    spec = parse_spec(_with_dataset_path("cifar.yaml", tmp_path))
    params = {p.name: p.distribution for p in spec.params}
    assert spec.raw["teacher"]["resolution"] == 32
    assert set(params["student.resolution"].values) == {8, 16, 24, 32}


def test_relative_dataset_path_is_resolved_where_the_sweep_is_launched(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    raw = _with_dataset_path("cifar.yaml", Path("data"))
    spec = parse_spec(raw)
    # trials run in their own working directories: the path must not depend on theirs
    assert spec.raw["dataset"]["path"] == str(tmp_path / "data")


# ---------------------------------------------------------------------------------------------
# sampling and materialising


def _ask_many(spec, count: int) -> list[dict[str, Any]]:
    study = optuna.create_study(directions=optuna_directions(spec.objective_modes), sampler=optuna.samplers.RandomSampler(seed=0))
    space = define_by_run(spec)
    sampled = []
    for _ in range(count):
        trial = study.ask()
        assert space(trial) is None
        sampled.append(dict(trial.params))
    return sampled


def test_define_by_run_samples_inside_ranges_and_depths_only_for_blockwise():
    spec = parse_spec(small_space())
    sampled = _ask_many(spec, 30)
    archs = {params["student.arch"] for params in sampled}
    assert archs == {"resnet10t", "blockwise_resnet"}
    for params in sampled:
        assert params["student.resolution"] in (8, 16, 24, 32)
        assert 0.0 <= params["distill.kd"] <= 1.0
        assert 0.01 <= params["train.lr"] <= 0.1
        assert params["distill.temperature"] in (2.0, 4.0)
        if params["student.arch"] in BLOCKWISE_FAMILIES:
            assert params["student.depths.1"] in (1, 2) and params["student.widths.2"] in (16, 32)
        else:
            assert not set(DEPTH_PARAMS) & set(params)


def test_materialize_gives_the_sampled_config():
    spec = parse_spec(small_space())
    for params in _ask_many(spec, 12):
        config = materialize(spec, params)
        assert isinstance(config, PipelineConfig)
        assert config.student.arch == params["student.arch"]
        assert config.student.resolution == params["student.resolution"]
        assert config.distill.kd == params["distill.kd"] and config.train.lr == params["train.lr"]
        assert config.teacher.resolution == 32  # fixed values pass through
        if params["student.arch"] == "blockwise_resnet":
            assert config.student.depths == (1, params["student.depths.1"], 1, 1)
            assert config.student.widths == (8, 16, params["student.widths.2"], 32)
        else:
            assert config.student.depths is None and config.student.widths is None


def test_materialize_rejects_missing_and_unknown_parameters():
    spec = parse_spec(small_space())
    params = {
        "student.arch": "resnet10t",
        "student.resolution": 16,
        "distill.kd": 1.0,
        "distill.temperature": 4.0,
        "train.lr": 0.05,
    }
    assert materialize(spec, params).student.resolution == 16
    with pytest.raises(ConfigError) as missing:
        materialize(spec, {k: v for k, v in params.items() if k != "distill.kd"})
    assert missing.value.field == "distill.kd"
    with pytest.raises(ConfigError) as unknown:
        materialize(spec, {**params, "student.epochs": 3})
    assert unknown.value.field == "student.epochs"


def test_define_by_run_is_picklable_and_works_in_ray_optuna_search():
    from ray.tune.search.optuna import OptunaSearch

    spec = parse_spec(small_space())
    space = pickle.loads(pickle.dumps(define_by_run(spec)))  # Tune pickles its searcher
    searcher = OptunaSearch(
        space=space, metric=list(spec.objective_metrics), mode=list(spec.objective_modes), sampler=make_sampler(spec)
    )
    for index in range(6):
        config = searcher.suggest(f"trial_{index}")
        assert materialize(spec, config).student.arch == config["student.arch"]


def test_same_sampler_seed_gives_the_same_suggestions():
    spec = parse_spec(small_space())

    def suggestions() -> list[dict[str, Any]]:
        study = optuna.create_study(directions=optuna_directions(spec.objective_modes), sampler=make_sampler(spec))
        return [sample_params(spec, study.ask()) for _ in range(5)]

    assert suggestions() == suggestions()


def test_fixed_blockwise_student_samples_its_depths_always():
    raw = small_space()
    raw["student"]["arch"] = "blockwise_resnet"
    spec = parse_spec(raw)
    assert all(p.condition is None for p in spec.params)
    for params in _ask_many(spec, 3):
        assert set(DEPTH_PARAMS) <= set(params)
        assert materialize(spec, params).student.depths[1] == params["student.depths.1"]


def test_yaml_file_with_exponent_floats_and_int_steps(tmp_path):
    # YAML 1.1 reads `1e-3` (no dot) as a string; a search space must still accept it
    text = yaml.safe_dump(small_space()).replace("\ntrain:\n", "\ntrain:\n  weight_decay: 5e-4\n")
    text = text.replace("0.01", "1e-2")
    path = tmp_path / "space.yaml"
    path.write_text(text)
    spec = load_spec(path)
    lr = next(p.distribution for p in spec.params if p.name == "train.lr")
    assert (lr.kind, lr.low, lr.high) == ("loguniform", 0.01, 0.1)
    assert spec.name == "unit" and spec.source_path == str(path)


# ---------------------------------------------------------------------------------------------
# fixed configs, objectives, constraints, samplers


def test_fixed_config_for_a_file_without_distributions():
    raw = fixed_config_dict()
    spec = parse_spec(raw)
    assert spec.params == () and spec.search is None
    assert spec.fixed_config() == PipelineConfig.from_dict(raw)


def test_fixed_config_refuses_a_search_space():
    with pytest.raises(ConfigError) as error:
        parse_spec(small_space()).fixed_config()
    assert error.value.field == "student.arch"  # the first distribution in the file
    assert "pxd sweep" in error.value.message


def test_objective_defaults_and_modes():
    raw = small_space()
    raw["search"]["objectives"] = [{"metric": "val_top1"}, {"metric": "latency_ms"}]
    raw["search"]["reference_point"] = {"latency_ms": 50}
    spec = parse_spec(raw)
    assert spec.objective_modes == ("max", "min")
    assert optuna_directions(spec.objective_modes) == ["maximize", "minimize"]
    assert spec.require_search().reference_point == {"val_top1": 0.0, "latency_ms": 50.0}
    default = parse_spec(small_space())
    assert default.objective_metrics == ("val_top1", "gmacs", "pixels")
    assert default.objective_modes == ("max", "min", "min")
    assert default.require_search().sampler.seed == 3  # the file's top-level seed


def _constrained(**limits: float):
    raw = small_space()
    raw["search"]["constraints"] = limits
    return parse_spec(raw)


def test_constraint_values_follow_optuna_convention():
    spec = _constrained(max_gmacs=0.5, min_val_top1=0.6)
    # order: max_gmacs, then min_val_top1; ≤ 0 means satisfied
    assert constraint_values(spec, {"gmacs": 0.25, "val_top1": 0.75}) == pytest.approx([-0.25, -0.15])
    assert is_feasible(spec, {"gmacs": 0.25, "val_top1": 0.75})
    assert constraint_values(spec, {"gmacs": 1.5, "val_top1": 0.75}) == pytest.approx([1.0, -0.15])
    assert not is_feasible(spec, {"gmacs": 1.5, "val_top1": 0.75})
    assert not is_feasible(spec, {"gmacs": 0.25, "val_top1": 0.5})
    assert is_feasible(spec, {"gmacs": 0.5, "val_top1": 0.6})  # on the limit counts as satisfied
    # a metric that was never measured cannot be shown to meet its limit
    assert constraint_values(spec, {"val_top1": 0.9})[0] == math.inf
    assert not is_feasible(spec, {"gmacs": math.nan, "val_top1": 0.9})


def test_no_constraints_means_everything_is_feasible():
    spec = parse_spec(small_space())
    assert constraint_values(spec, {"gmacs": 99.0, "val_top1": 0.0}) == []
    assert is_feasible(spec, {"gmacs": 99.0, "val_top1": 0.0})


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("tpe", optuna.samplers.TPESampler),
        ("nsga2", optuna.samplers.NSGAIISampler),
        ("gp", optuna.samplers.GPSampler),
        ("random", optuna.samplers.RandomSampler),
        ("grid", optuna.samplers.GridSampler),
    ],
)
def test_make_sampler_builds_the_named_sampler(name, expected):
    raw = small_space()
    raw["search"]["sampler"] = {"name": name, "seed": 1}
    if name == "grid":
        raw["student"]["resolution"] = {"choice": [8, 16]}
        raw["distill"]["kd"] = {"choice": [0.0, 1.0]}
        raw["train"]["lr"] = 0.05
    sampler = make_sampler(parse_spec(raw))
    assert type(sampler) is expected


def test_sampler_options_reach_the_sampler():
    raw = small_space()
    raw["search"]["sampler"] = {"name": "nsga2", "options": {"population_size": 6}}
    assert make_sampler(parse_spec(raw))._population_size == 6


def _constraints_recorded(sampler_name: str) -> bool:
    # Optuna 5 reads constraints set on the trial before tell (what the searcher does)
    raw = small_space()
    raw["search"]["sampler"] = {"name": sampler_name}
    raw["search"]["constraints"] = {"max_gmacs": 0.5}
    spec = parse_spec(raw)
    study = optuna.create_study(directions=optuna_directions(spec.objective_modes), sampler=make_sampler(spec))
    trial = study.ask()
    sample_params(spec, trial)
    for name, value in zip(constraint_names(spec), constraint_values(spec, {"gmacs": 0.75})):
        trial.set_constraint(name, value)
    study.tell(trial, [0.5, 0.75, 256])
    return study.trials[0].constraints == {"max_gmacs": 0.25}


def test_constraints_reach_the_study_as_optuna_reads_them():
    assert constraint_names(parse_spec(small_space())) == ()
    for name in ("tpe", "nsga2", "random"):
        assert _constraints_recorded(name), name


# ---------------------------------------------------------------------------------------------
# malformed specs: each error names the dotted field, is one line, and says what to do


def _set(path: str, value: Any):
    def edit(raw: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value

    return edit


def _delete(path: str):
    def edit(raw: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = raw
        for part in parents:
            node = node[part]
        del node[last]

    return edit


MALFORMED = [
    # (edit, expected field, a fragment of the advice)
    (_set("serach", {"trials": 2}), "serach", "did you mean 'search'"),
    (_set("search.trails", 2), "search.trails", "did you mean 'trials'"),
    (_set("distill.kd", {"choice": [1.0], "uniform": [0.0, 1.0]}), "distill.kd", "exactly one"),
    (_set("distill.kd", {"uniform": [2.0, 1.0]}), "distill.kd", "lo < hi"),
    (_set("distill.kd", {"uniform": [0.0, 2.0]}), "distill.kd", "α = kd / (1 + kd)"),  # the earlier additive kd
    (_set("train.lr", {"loguniform": [0.0, 0.1]}), "train.lr", "use uniform"),
    (_set("student.arch", {"choice": []}), "student.arch", "non-empty list"),
    (_set("student.arch", {"choice": ["resnet10t", "resnet1800", "blockwise_resnet"]}), "student.arch", "resnet1800"),
    (_set("student.resolution", {"choice": [16, 64]}), "student.resolution", "student ≤ teacher"),
    (_set("teacher.resolution", {"choice": [32, 64]}), "teacher.resolution", "set a single value"),
    (_set("dataset.num_classes", {"int": [2, 8]}), "dataset.num_classes", "set a single value"),
    (_set("search.sampler", {"name": "grid"}), "student.resolution", "make it {choice"),  # an int range
    (_set("search.objectives", [{"metric": "val_top1"}, {"metric": "acc"}]), "search.objectives.1.metric", "use one of"),
    (_set("search.objectives", [{"metric": m} for m in ("val_top1", "gmacs", "gmacs")]), "search.objectives.2.metric", "remove"),
    (_set("search.objectives", [{"metric": "val_top1"}]), "search.objectives", "at least two"),
    (_delete("search.reference_point.gmacs"), "search.reference_point.gmacs", "gmacs:"),
    (_delete("search.reference_point.pixels"), "search.reference_point.pixels", "pixels: 2048"),
    (_set("search.constraints", {"max_gmacs": -0.5}), "search.constraints.max_gmacs", "> 0"),
    (_set("search.trials", 0), "search.trials", "≥ 1"),
    (_set("search.sampler", {"name": "cmaes"}), "search.sampler.name", "use one of"),
    (_set("search.sampler", {"name": "nsga2", "options": {"population_size": 1}}), "search.sampler.options", "fix"),
    (_set("search.sampler", {"name": "nsga2", "options": {"pop_size": 8}}), "search.sampler.options.pop_size", "known:"),
    (_set("student.resolution", {"uniform": [8.0, 32.0]}), "student.resolution", "{int: [lo, hi]"),
    (_set("student.resolution", {"int": [8, 30], "step": 8}), "student.resolution", "use [8, 24]"),
    (_set("student.arch", {"choice": ["resnet10t", "mobilenetv3_small_050"]}), "student.depths", "remove"),
    (_delete("student.widths"), "student.arch", "one per stage"),
    (_set("train.lr", {"choice": [0.1, -0.1]}), "train.lr", "must be > 0"),
    (_set("search.resources", {"gpu": 1.5}), "search.resources.gpu", "whole number"),
    (_set("search.latency", {"device": "tpu"}), "search.latency.device", "auto, cpu or cuda"),
    (_set("student.bogus", 1), "student.bogus", "known keys"),
    (_delete("search"), "search", "add a search: section"),
    (_set("search", None), "search.trials", "trials: 20"),
]


@pytest.mark.parametrize(("edit", "field", "advice"), MALFORMED, ids=[case[1] for case in MALFORMED])
def test_malformed_spec_names_the_field_and_what_to_do(edit, field, advice):
    raw = small_space()
    edit(raw)
    with pytest.raises(ConfigError) as error:
        parse_spec(raw)
    assert error.value.field == field
    assert "\n" not in str(error.value)
    assert advice in error.value.message


def test_the_small_space_itself_is_valid():
    # guards the malformed cases: each must fail because of its one edit
    assert len(parse_spec(copy.deepcopy(small_space())).params) == 7


def test_unreadable_or_non_mapping_files_name_the_file(tmp_path):
    cases = {
        "missing.yaml": None,
        "bad.yaml": "student: {arch: [resnet10t\nsearch: {trials: 2}\n",
        "list.yaml": "- a\n- b\n",
        "empty.yaml": "",
    }
    for name, text in cases.items():
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
        with pytest.raises(ConfigError) as error:
            load_spec(path)
        assert error.value.field == str(path), name
        assert "\n" not in str(error.value), name
    with pytest.raises(ConfigError, match="fix the syntax"):
        load_spec(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="check the path"):
        load_spec(tmp_path / "missing.yaml")


def test_yaml_is_loaded_safely(tmp_path):
    path = tmp_path / "tagged.yaml"
    path.write_text("name: !!python/object/apply:os.getcwd []\n")
    with pytest.raises(ConfigError) as error:
        load_spec(path)
    assert error.value.field == str(path)
