"""`pxd train` end to end, and bad input: one line naming the field, exit 2, nothing trained."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

from orchestrator.cli import main


@pytest.fixture
def tiny_file(tmp_path, tiny_raw):
    def write(raw=None, name="tiny.yaml"):
        path = tmp_path / name
        path.write_text(yaml.safe_dump(raw if raw is not None else tiny_raw))
        return path

    return write


def test_pxd_train_prints_the_final_metrics_as_json(tiny_file, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "orchestrator.cli", "train", str(tiny_file()), "--json", "--output", str(out),
               "--set", "student.resolution=8"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    metrics = json.loads(done.stdout)
    for name in ("val_top1", "gmacs", "params_m", "pixels", "latency_ms"):
        assert name in metrics
    assert metrics["pixels"] == 64.0, "--set overrides the file"
    assert 0.0 <= metrics["val_top1"] <= 1.0 and metrics["gmacs"] > 0
    state = torch.load(out / "student.pt", weights_only=True)
    assert any(key.endswith("weight") for key in state)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["student"]["resolution"] == 8


def test_shipped_train_config_is_valid():
    from orchestrator.space.spec import load_spec

    config = load_spec("configs/train.yaml").fixed_config()
    assert config.student.resolution < config.teacher.resolution


BAD_INPUTS = [
    ("student.arch", lambda raw: raw["student"].update(arch="resnet_does_not_exist")),
    ("student.resolution", lambda raw: raw["student"].update(resolution=64)),
    ("teacher.resolution", lambda raw: raw["teacher"].update(resolution=0)),
    ("teacher.epochs", lambda raw: raw["teacher"].update(epochs=0)),
    ("train.epochs", lambda raw: raw["train"].update(epochs=-1)),
    ("distill.foo", lambda raw: raw["distill"].update(foo=1.0)),
    ("dataset.path", lambda raw: raw["dataset"].update(kind="imagefolder", path="/no/such/folder")),
    ("student.resolution", lambda raw: raw["student"].update(resolution={"choice": [8, 16]})),
    ("train.optimizer", lambda raw: raw["train"].update(optimizer="lion")),
]


@pytest.mark.parametrize("field, corrupt", BAD_INPUTS, ids=[f for f, _ in BAD_INPUTS])
def test_bad_train_config_is_one_line_naming_the_field(field, corrupt, tiny_raw, tiny_file, tmp_path, capsys):
    corrupt(tiny_raw)
    out = tmp_path / "out"
    assert main(["train", str(tiny_file(tiny_raw)), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pxd: error: ") and "\n" not in err
    assert field in err
    assert not out.exists(), "nothing is trained or written for bad input"


def test_unreadable_files_name_the_file(tmp_path, capsys):
    missing = tmp_path / "missing.yaml"
    assert main(["train", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err
    broken = tmp_path / "broken.yaml"
    broken.write_text("teacher: [unclosed\n")
    assert main(["train", str(broken)]) == 2
    assert "is not valid YAML" in capsys.readouterr().err
