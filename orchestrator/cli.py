"""The `pxd` command line: train one pipeline, run a sweep, read frontiers and stages back.

Config files set defaults; `--set a.b=value` flags override them; the resolved config is saved with the
run. Bad input exits with status 2 and one line naming the field, before any compute.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from pxd.errors import ConfigError

__all__ = ["main", "build_parser"]

EXIT_BAD_INPUT = 2


def _parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError("--set", f"expected KEY=VALUE (e.g. student.resolution=32), got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `--set a.b=value` flags (values read as YAML) onto a config mapping."""
    for text in overrides:
        key, value = _parse_override(text)
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(key, f"cannot set inside {part!r}, which is not a mapping")
            node = child
        node[parts[-1]] = value
    return raw


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pxd", description="Pixel-distillation sweeps: find the cheapest good low-resolution classifiers.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="run one teacher → assistant → student pipeline from a config file")
    train.add_argument("config", help="a config YAML whose values are all fixed (same format as a search space)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config value, e.g. --set student.resolution=32")
    train.add_argument("--json", action="store_true", help="print the final metrics as JSON")
    train.add_argument("--output", type=Path, default=None, help="directory for student.pt, metrics.json and the resolved config")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.set_defaults(handler=cmd_train)

    from orchestrator import commands  # the heavier sub-commands register themselves

    commands.add_subcommands(sub)
    return parser


def _load_yaml(path: str) -> dict[str, Any]:
    from orchestrator.spec import read_yaml

    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(path, "must be a YAML mapping with sections dataset, teacher, student, ...")
    return raw


def cmd_train(args: argparse.Namespace) -> int:
    from orchestrator.spec import parse_spec

    raw = apply_overrides(_load_yaml(args.config), args.overrides)
    spec = parse_spec(raw, source_path=args.config)
    config = spec.fixed_config()  # errors, naming the field, if anything is still a distribution

    from orchestrator.trial import FINAL_METRICS
    from pxd.pipeline import run_tas

    result = run_tas(config, progress=not args.no_progress and not args.json and sys.stderr.isatty())
    metrics = {name: result.metrics[name] for name in FINAL_METRICS}
    metrics.update({k: v for k, v in result.metrics.items() if k not in metrics})
    if args.output is not None:
        _save_train_output(args.output, result, config)
    if args.json:
        print(json.dumps(metrics, indent=2, sort_keys=False))
    else:
        print(f"student {config.student.arch} @ {config.student.resolution}px  (teacher {config.teacher.arch} @ {config.teacher.resolution}px)")
        for name, value in metrics.items():
            print(f"  {name:<20} {value:.6g}")
    return 0


def _save_train_output(directory: Path, result: Any, config: Any) -> None:
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    torch.save(result.student.state_dict(), directory / "student.pt")
    (directory / "metrics.json").write_text(json.dumps(result.metrics, indent=2))
    (directory / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except ConfigError as exc:
        print(f"pxd: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("pxd: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
