"""bench/search_quality.py's table through the real pipeline, on a tiny generated ImageFolder tree: every
point trained with two seeds from one shared teacher and assistant, the table's keys and shapes, a resume
that trains only the missing point, and the replays, report, plot and JSON on the table built."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from bench import search_quality
from bench.search_table import StageCache, grid_points
from orchestrator.space.spec import load_spec
from pxd.errors import ConfigError
from pxd.train import StageResult
from tests.conftest import write_photo_folder

BENCH = Path(__file__).resolve().parents[1] / "bench"
TINY_BLOCKS = {"depths": [1, 1, 1, 1], "widths": [8, 8, 16, 16]}
TINY_SPACE = {
    "name": "tiny-search-quality",
    "seed": 0,
    "dataset": {"kind": "imagefolder", "path": "set-by-the-test", "image_size": 16, "train_per_class": 0,
                "val_per_class": 0},
    "teacher": {"arch": "blockwise_resnet", "resolution": 16, "epochs": 1, **TINY_BLOCKS},
    "assistant": {"enabled": True, "epochs": 1},
    "student": {"arch": "blockwise_resnet", "resolution": {"choice": [4, 8]}, **TINY_BLOCKS},
    "distill": {"kd": {"choice": [0.0, 0.9]}},
    "train": {"batch_size": 8, "epochs": 2, "device": "cpu"},
    "search": {"trials": 2, "max_concurrent": 2, "sampler": {"name": "tpe", "seed": 0},
               "objectives": [{"metric": "val_top1", "mode": "max"}, {"metric": "gmacs", "mode": "min"},
                              {"metric": "pixels", "mode": "min"}],
               "reference_point": {"val_top1": 0.0, "gmacs": 0.01, "pixels": 256},
               "early_stopping": {"kind": "moasha", "grace_period": 1, "reduction_factor": 2},
               "ce_control": True},
}
SEEDS = ["0", "1"]


@pytest.fixture(autouse=True)
def _one_thread_and_own_cache(tmp_path, monkeypatch):
    """Decoded photos go to a per-test cache; one torch thread (a loaded 2-core machine is far slower with two)."""
    monkeypatch.setenv("PXD_CACHE_DIR", str(tmp_path / "pxd-cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _photos(root, classes: int = 3, train: int = 6, val: int = 4) -> None:
    write_photo_folder(root, side=16, classes=classes, train=train, val=val)


@pytest.fixture
def tiny(tmp_path):
    _photos(tmp_path / "photos")
    space = tmp_path / "tiny.yaml"
    space.write_text(yaml.safe_dump(TINY_SPACE))
    return {"space": space, "photos": tmp_path / "photos", "table": tmp_path / "out" / "search_quality_table_tiny.json",
            "stages": tmp_path / "stages"}


def _build(tiny, *extra: str) -> None:
    search_quality.main(["--space", str(tiny["space"]), "--dataset", str(tiny["photos"]), "--seeds", *SEEDS,
                         "--table", str(tiny["table"]), "--stage-dir", str(tiny["stages"]), *extra])


def test_the_table_is_built_resumed_and_replayed(tiny, capsys, tmp_path):
    _build(tiny, "--build-only")
    log = capsys.readouterr().err
    # one teacher and one assistant for every point and seed; a line per point trained
    assert log.count("teacher epoch 1") == 1 and log.count("assistant epoch 1") == 1
    assert sum(" {\"distill.kd\"" in line for line in log.splitlines()) == 4
    payload = json.loads(tiny["table"].read_text())
    assert {"command", "dataset", "machine", "versions", "wall_s", "points", "seeds", "shared_stages"} <= set(payload)
    assert "bench/search_quality.py" in payload["command"] and payload["wall_s"] > 0
    assert payload["dataset"]["classes"] == 3 and payload["dataset"]["path"] == str(tiny["photos"].resolve())
    assert payload["seeds"] == [0, 1] and len(payload["points"]) == 4
    for point in payload["points"]:
        assert point["seeds"] == [0, 1] and len(point["val_top1"]) == 2 and len(point["ce_val_top1"]) == 2
        assert [len(curve) for curve in point["val_top1_curves"]] == [2, 2]
        assert point["val_top1_mean"] == pytest.approx(sum(point["val_top1"]) / 2)
        assert point["val_top1_std"] >= 0 and point["pixels"] == point["params"]["student.resolution"] ** 2
        assert point["gmacs"] > 0 and point["params_m"] > 0
        # pxd reports the best epoch's val_top1
        assert all(top1 == max(curve) for top1, curve in zip(point["val_top1"], point["val_top1_curves"]))

    # resume: a point missing from the file is trained again, alone, from the stored teacher and assistant
    first = payload["points"].pop()
    tiny["table"].write_text(json.dumps(payload))
    _build(tiny, "--build-only")
    log = capsys.readouterr().err
    assert "3 of 4 points done; training 1" in log and "teacher epoch" not in log and "assistant epoch" not in log
    again = json.loads(tiny["table"].read_text())["points"][-1]
    assert again["params"] == first["params"] and again["val_top1"] == pytest.approx(first["val_top1"])

    # a complete table is read as is; other training seeds are refused
    with pytest.raises(ConfigError, match="seeds"):
        search_quality.main(["--space", str(tiny["space"]), "--dataset", str(tiny["photos"]), "--seeds", "0", "2",
                             "--table", str(tiny["table"]), "--build-only"])
    out, plot = tmp_path / "results.json", tmp_path / "curves.png"
    _build(tiny, "--replays", "3", "--samplers", "tpe", "random", "grid", "--out", str(out), "--plot", str(plot))
    printed = capsys.readouterr().out
    assert "accuracy reference: val_top1" in printed and "CE floor" in printed and "| keep_front |" in printed
    result = json.loads(out.read_text())
    assert result["result"]["replays"] == [0, 1, 2] and set(result["result"]["runs"]) == {"tpe", "random", "grid"}
    assert result["result"]["accuracy_reference"]["rule"] == "ce_floor"
    assert len(result["table"]["points"]) == 4 and plot.stat().st_size > 0


@pytest.mark.parametrize("dataset", ["flowers128", "eurosat64"])
def test_the_shipped_dataset_spaces_are_tables_of_at_least_48_points(tiny, dataset):
    args = search_quality.parse_args(["--space", str(BENCH / f"search_quality_{dataset}.yaml"),
                                      "--dataset", str(tiny["photos"])])
    spec = search_quality.load_space(args)
    assert len(grid_points(spec)) >= 48
    assert spec.base.dataset.kind == "imagefolder" and spec.base.dataset.path == str(tiny["photos"].resolve())
    assert spec.base.teacher.resolution == 64 and spec.require_search().ce_control
    # only the searched distillation weights are written: the rest are pxd's DistillConfig defaults
    raw = yaml.safe_load((BENCH / f"search_quality_{dataset}.yaml").read_text())
    assert all(isinstance(value, dict) and "choice" in value for value in raw["distill"].values())
    assert len(raw["distill"]) >= 2


def test_a_teacher_checkpoint_replaces_the_teachers_training(tiny, tmp_path):
    args = search_quality.parse_args(["--space", str(tiny["space"]), "--dataset", str(tiny["photos"]),
                                      "--teacher-checkpoint", str(tmp_path / "teacher.pt")])
    with pytest.raises(ConfigError, match="teacher.checkpoint"):  # checked before any compute
        search_quality.load_space(args)
    assert load_spec(tiny["space"], ["dataset.path=" + str(tiny["photos"])]).base.teacher.epochs == 1


def test_the_stage_cache_shares_upstream_stages_keeps_controls_on_disk_and_never_students(tmp_path):
    def trained(kind: str):
        calls.append(kind)
        return StageResult(kind, {"w": torch.ones(2)}, {"val_top1": 0.5}, [{"val_top1": 0.5}])

    calls: list[str] = []
    cache = StageCache(tmp_path / "stages")
    cache.aliases["teacher-seed1"] = "teacher-seed0"
    with pytest.raises(RuntimeError, match="first seed"):  # a later seed never trains a shared stage itself
        cache.get_or_train("teacher", "teacher-seed1", {}, lambda: trained("teacher"))
    first = cache.get_or_train("teacher", "teacher-seed0", {"arch": "x"}, lambda: trained("teacher"))
    later = cache.get_or_train("teacher", "teacher-seed1", {}, lambda: trained("teacher"))
    assert not first.reused and later.reused and later.result is first.result and calls == ["teacher"]
    cache.get_or_train("student", "student-key", {}, lambda: trained("student"))
    cache.get_or_train("control", "control-key", {}, lambda: trained("control"))
    assert set(cache.results) == {"teacher-seed0"}  # students are never kept; controls are read back from disk
    fresh = StageCache(tmp_path / "stages")  # a resumed build
    assert fresh.get_or_train("control", "control-key", {}, lambda: trained("control")).reused
    assert fresh.get_or_train("teacher", "teacher-seed0", {}, lambda: trained("teacher")).reused
    assert not fresh.get_or_train("student", "student-key", {}, lambda: trained("student")).reused
    assert calls == ["teacher", "student", "control", "student"]
