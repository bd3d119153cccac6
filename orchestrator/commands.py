"""Sub-commands beyond `pxd train`: sweep, frontier, stages."""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["add_subcommands"]


def _tracking_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else the embedded store under --root)")
    parser.add_argument("--root", default=None, help="results root for embedded stores (default: PXD_HOME or ./pxd-results)")


def add_subcommands(sub: argparse._SubParsersAction) -> None:
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


def cmd_sweep(args: argparse.Namespace) -> int:
    from orchestrator.cli import _load_yaml, apply_overrides
    from orchestrator.spec import parse_spec
    from orchestrator.sweep import SweepOptions, run_sweep, summary

    spec = parse_spec(apply_overrides(_load_yaml(args.space), args.overrides), source_path=args.space)
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


def _open_tracking(args: argparse.Namespace):
    from orchestrator.tracking import resolve_tracking, results_root

    return resolve_tracking(args.tracking_uri, results_root(args.root))


def cmd_frontier(args: argparse.Namespace) -> int:
    from mlflow.tracking import MlflowClient

    from orchestrator.frontier import format_table, frontier_table, table_to_json
    from orchestrator.sweep import collect_rows, find_sweep_run, sweep_objectives
    from pxd.errors import ConfigError

    target = _open_tracking(args)
    try:
        client = MlflowClient(target.uri)
        parent = find_sweep_run(client, args.sweep)
        if parent is None:
            raise ConfigError("sweep", f"no sweep named or with run id {args.sweep!r} at {target.uri}; check the name and --tracking-uri/--root")
        objectives, reference = sweep_objectives(parent)
        table = frontier_table(collect_rows(client, parent), objectives, reference)
    finally:
        target.close()
    if args.json:
        print(table_to_json(table))
    else:
        print(format_table(table))
        print(f"hypervolume {table['hypervolume']:.6g} (reference {reference}) · sweep {parent.data.tags.get('pxd.sweep')} · parent run {parent.info.run_id}")
    return 0


def cmd_stages(args: argparse.Namespace) -> int:
    from orchestrator.stage_store import list_stages

    target = _open_tracking(args)
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
