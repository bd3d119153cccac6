"""The `pxd` sub-commands: train, sweep, frontier, stages (parser entries and handlers)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:
    from orchestrator.tracking import TrackingTarget
    from pxd.config import PipelineConfig
    from pxd.pipeline import PipelineResult

__all__ = ["add_subcommands", "cmd_train", "cmd_sweep", "cmd_frontier", "cmd_stages"]


def _tracking_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else the embedded store under --root)")
    parser.add_argument("--root", default=None, help="results root for embedded stores (default: PXD_HOME or ./pxd-results)")


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train", help="run one teacher → assistant → student pipeline from a config file")
    train.add_argument("config", help="a config YAML whose values are all fixed (same format as a search space)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config value, e.g. --set student.resolution=32 or student.depths.1=2")
    train.add_argument("--json", action="store_true", help="print the final metrics as JSON")
    train.add_argument("--output", type=Path, default=None, help="directory for student.pt, metrics.json, stages.json (stage keys) and the resolved config")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.set_defaults(handler=cmd_train)

    sweep = sub.add_parser("sweep", help="run a Ray Tune + Optuna multi-objective search over TAS pipelines")
    sweep.add_argument("space", help="a search-space YAML (see search_spaces/)")
    sweep.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a value of the space, e.g. --set search.trials=4")
    sweep.add_argument("--name", default=None, help="sweep name (default: <space name>-<timestamp>)")
    sweep.add_argument("--resume", action="store_true", help="resume the sweep --name (default: the latest sweep of this space) after a crash")
    sweep.add_argument("--ray-address", default=None, help="join a Ray cluster (HOST:6379 of its head; run the driver on a Ray node); default: start Ray locally")
    sweep.add_argument("--optuna-storage", default=None, help="Optuna RDB URL, e.g. postgresql+psycopg2://USER@HOST/optuna (default: sqlite file beside the sweep's results)")
    sweep.add_argument("--force-retrain", action="store_true", help="retrain every teacher and assistant instead of reusing stored stages")
    sweep.add_argument("--quiet", action="store_true", help="no live progress lines")
    sweep.add_argument("--json", action="store_true", help="print the frontier table as JSON")
    _tracking_flags(sweep)
    sweep.set_defaults(handler=cmd_sweep)

    frontier = sub.add_parser("frontier", help="print the frontier of a past sweep from MLflow")
    frontier.add_argument("sweep", help="sweep name or parent run id")
    frontier.add_argument("--json", action="store_true", help="print as JSON")
    _tracking_flags(frontier)
    frontier.set_defaults(handler=cmd_frontier)

    stages = sub.add_parser("stages", help="list the stored teacher/assistant/student stages")
    stages.add_argument("--json", action="store_true", help="print as JSON")
    _tracking_flags(stages)
    stages.set_defaults(handler=cmd_stages)


def cmd_train(args: argparse.Namespace) -> int:
    from orchestrator.spec import load_spec
    from pxd.metrics import final_metrics
    from pxd.pipeline import run_tas

    config = load_spec(args.config, args.overrides).fixed_config()  # errors, naming the field, if a value is a distribution
    result = run_tas(config, progress=not args.no_progress and not args.json and sys.stderr.isatty())
    metrics = {name: result.metrics[name] for name in final_metrics() if name in result.metrics}
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


def _save_train_output(directory: Path, result: PipelineResult, config: PipelineConfig) -> None:
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    torch.save(result.student.state_dict(), directory / "student.pt")
    (directory / "metrics.json").write_text(json.dumps(result.metrics, indent=2))
    (directory / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    # the content-addressed key of every stage: the same keys a sweep trial with these values records
    (directory / "stages.json").write_text(json.dumps({kind: o.key for kind, o in result.stages.items()}, indent=2))


def cmd_sweep(args: argparse.Namespace) -> int:
    from orchestrator.spec import load_spec
    from orchestrator.sweep import SweepOptions, run_sweep, summary

    spec = load_spec(args.space, args.overrides)
    for note in spec.notes:
        print(f"[pxd] note: {note}", file=sys.stderr)
    outcome = run_sweep(spec, SweepOptions(
        name=args.name, resume=args.resume, tracking_uri=args.tracking_uri, ray_address=args.ray_address,
        optuna_storage=args.optuna_storage, root=args.root, force_retrain=args.force_retrain, quiet=args.quiet,
    ))
    if args.json:
        from orchestrator.frontier import table_to_json

        print(table_to_json(outcome.table))
    else:
        print(summary(outcome))
    return 0


def _open_tracking(args: argparse.Namespace, *, read_only: bool = False) -> TrackingTarget:
    from orchestrator.tracking import resolve_tracking, results_root

    return resolve_tracking(args.tracking_uri, results_root(args.root), read_only=read_only)


def cmd_frontier(args: argparse.Namespace) -> int:
    from mlflow.tracking import MlflowClient

    from orchestrator.frontier import format_table, frontier_table, table_to_json
    from orchestrator.schema import Tag, collect_rows, find_sweep_run, sweep_objectives
    from pxd.errors import ConfigError

    target = _open_tracking(args, read_only=True)
    try:
        client = MlflowClient(target.uri)
        parent = find_sweep_run(client, args.sweep)
        if parent is None:
            raise ConfigError("sweep", f"no sweep named or with run id {args.sweep!r} at {target.uri}; check the name and --tracking-uri/--root")
        objectives, reference, ideal = sweep_objectives(parent)
        table = frontier_table(collect_rows(client, parent), objectives, reference, ideal)
    finally:
        target.close()
    if args.json:
        print(table_to_json(table))
    else:
        print(format_table(table))
        print(f"hypervolume {table['hypervolume_normalised']:.4f} normalised ({table['hypervolume']:.6g} against reference "
              f"{reference}, ideal {ideal}) · sweep {parent.data.tags.get(Tag.SWEEP)} · parent run {parent.info.run_id}")
    return 0


def cmd_stages(args: argparse.Namespace) -> int:
    from orchestrator.stage_store import list_stages

    target = _open_tracking(args, read_only=True)
    try:
        rows = list_stages(target.uri)
    finally:
        target.close()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no stored stages", file=sys.stderr)
        return 0
    header = f"{'stage':<10} {'key':<14} {'arch':<24} {'res':>4} {'val_top1':>8} {'train_s':>8} {'MB':>7} {'state':<8} run_id"
    print(header)
    for r in rows:
        print(f"{r['stage']:<10} {r['key'][:12]:<14} {str(r['arch'])[:24]:<24} {str(r['resolution']):>4} {r['val_top1']:>8.4f} "
              f"{r['train_seconds']:>8.1f} {r['size_mb']:>7.2f} {r['state']:<8} {r['run_id']}")
    return 0
