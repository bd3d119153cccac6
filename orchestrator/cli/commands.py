"""The `pxd` sub-commands: train, sweep, frontier, stages (parser entries and handlers).

What torch, Ray, MLflow, Optuna or matplotlib bring is imported inside the handler that needs it, so that
`pxd --help`, and each command, pays only for its own libraries.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from orchestrator.results.frontier import format_table, frontier_table, table_to_json
from orchestrator.results.hardware import TimingRequest, check_request, compare_tables, hardware_table, remeasure
from orchestrator.results.schema import Tag, collect_rows, require_sweep_run, sweep_objectives
from orchestrator.results.select import Limits, check_limits, check_registry_names, choose_for_sweep, register
from orchestrator.results.students import TRUST_FLAG
from orchestrator.tracking.server import (
    EmbeddedServer,
    TrackingTarget,
    given_tracking_uri,
    resolve_tracking,
    results_root,
)
from pxd.errors import ConfigError
from pxd.metrics import final_metrics, hardware_metric, primary_metric

if TYPE_CHECKING:
    from pxd.config import PipelineConfig
    from pxd.pipeline import PipelineResult

__all__ = ["add_subcommands", "cmd_train", "cmd_sweep", "cmd_frontier", "cmd_stages", "cmd_remeasure", "cmd_select"]


def _tracking_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else the embedded store under --root)")
    parser.add_argument("--root", default=None, help="results root for embedded stores (default: PXD_HOME or ./pxd-results)")


_TRUST_HELP = ("accept students an earlier pxd logged as pickles (MLflow's pytorch flavor): loading one runs code "
               "from whoever can write the tracking server's artifacts. Without it they are refused")


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
    sweep.add_argument("--resume", action="store_true",
                       help="resume the sweep --name (default: the latest sweep of this space) after a crash, "
                            "or to raise search.trials / search.timeout_s")
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
    frontier.add_argument("--hardware", default=None, metavar="LABEL", help="the frontier on a hardware label measured by pxd remeasure")
    frontier.add_argument("--compare", nargs=2, default=None, metavar=("LABEL_A", "LABEL_B"), help="which models leave or join the frontier between two hardware labels")
    frontier.add_argument("--plot", type=Path, default=None, help="write the frontier's plot here (PNG); with --compare, the comparison plot")
    _tracking_flags(frontier)
    frontier.set_defaults(handler=cmd_frontier)

    remeasure = sub.add_parser("remeasure", help="re-time every trained student of a sweep on new hardware (no retraining)")
    remeasure.add_argument("sweep", help="sweep name or parent run id")
    remeasure.add_argument("--hardware", required=True, metavar="LABEL", help="name of the target (letters, digits, _ and -), e.g. laptop-ort")
    remeasure.add_argument("--runtime", default="torch", help="deployment runtime, a name registered in pxd.runtimes "
                           "(torch, torch-compile and onnxruntime ship; default: eager torch); a wrong name lists them")
    remeasure.add_argument("--device", default="cpu", help="cpu or cuda on the target (default: cpu); cuda needs CUDA where the timing runs")
    remeasure.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32", help="compute dtype (bf16/fp16: the torch runtimes, under autocast on the --device; onnxruntime times float32)")
    remeasure.add_argument("--threads", type=int, default=1, help="intra-op threads while timing (default: 1)")
    remeasure.add_argument("--batch", type=int, default=16, help="batch size of the throughput measurement (default: 16)")
    remeasure.add_argument("--repeats", type=int, default=30, help="timed batch-1 passes; the median is reported (default: 30)")
    remeasure.add_argument("--warmup", type=int, default=5, help="untimed passes first (default: 5)")
    remeasure.add_argument("--resource", default=None, metavar="NAME", help="time on the Ray nodes that offer this custom resource (ray start --resources '{\"NAME\": 1}') instead of this machine")
    remeasure.add_argument("--ray-address", default=None, help="with --resource: the Ray cluster (HOST:PORT of its head; default: the cluster of this node)")
    remeasure.add_argument("--json", action="store_true", help="print the hardware frontier as JSON")
    remeasure.add_argument(TRUST_FLAG, action="store_true", help=_TRUST_HELP)
    _tracking_flags(remeasure)
    remeasure.set_defaults(handler=cmd_remeasure)

    select = sub.add_parser("select", help="choose a model from a sweep's frontier and register it (MLflow Model Registry, alias)")
    select.add_argument("sweep", help="sweep name or parent run id")
    select.add_argument("--hardware", default=None, metavar="LABEL", help="choose on this hardware label's frontier and latency (after pxd remeasure)")
    select.add_argument("--max-latency-ms", type=float, default=None, help="latency limit in ms, > 0 (on --hardware, else the sweep's latency_ms)")
    select.add_argument("--max-gmacs", type=float, default=None, help="multiply-accumulates limit in billions, > 0")
    select.add_argument("--max-pixels", type=float, default=None, help="input H × W limit, > 0")
    select.add_argument("--min-top1", type=float, default=None, help=f"minimum {primary_metric()}, a fraction in [0, 1] (0.75, not 75)")
    select.add_argument("--name", default=None, help="registered model name (default: <experiment>-student)")
    select.add_argument("--alias", default="champion", help="registry alias to point at the chosen version (default: champion)")
    select.add_argument("--json", action="store_true", help="print the choice as JSON")
    select.add_argument(TRUST_FLAG, action="store_true", help=_TRUST_HELP)
    _tracking_flags(select)
    select.set_defaults(handler=cmd_select)

    stages = sub.add_parser("stages", help="list the stored teacher/assistant/student stages")
    stages.add_argument("--json", action="store_true", help="print as JSON")
    _tracking_flags(stages)
    stages.set_defaults(handler=cmd_stages)


def cmd_train(args: argparse.Namespace) -> int:
    # the space and the pipeline bring torch, timm and optuna (start-up cost)
    from orchestrator.space.spec import load_spec
    from pxd.pipeline import run_tas

    spec = load_spec(args.config, args.overrides)
    for note in spec.notes:
        print(f"[pxd] note: {note}", file=sys.stderr)
    config = spec.fixed_config()  # errors, naming the field, if a value is a distribution
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
    import torch  # start-up cost

    directory.mkdir(parents=True, exist_ok=True)
    torch.save(result.student.state_dict(), directory / "student.pt")
    (directory / "metrics.json").write_text(json.dumps(result.metrics, indent=2))
    (directory / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    # the content-addressed key of every stage: the same keys a sweep trial with these values records
    (directory / "stages.json").write_text(json.dumps({kind: o.key for kind, o in result.stages.items()}, indent=2))


def cmd_sweep(args: argparse.Namespace) -> int:
    # the driver and the space bring Ray, MLflow, Optuna and torch (start-up cost)
    from orchestrator.driver.finish import summary
    from orchestrator.driver.launch import SweepOptions, run_sweep
    from orchestrator.space.spec import load_spec

    spec = load_spec(args.space, args.overrides)
    for note in spec.notes:
        print(f"[pxd] note: {note}", file=sys.stderr)
    outcome = run_sweep(spec, SweepOptions(
        name=args.name, resume=args.resume, tracking_uri=args.tracking_uri, ray_address=args.ray_address,
        optuna_storage=args.optuna_storage, root=args.root, force_retrain=args.force_retrain, quiet=args.quiet,
    ))
    if args.json:
        print(table_to_json(outcome.table))
    else:
        print(summary(outcome))
    return 0


def _open_tracking(args: argparse.Namespace, *, read_only: bool = False) -> TrackingTarget:
    # a tracking URI of the user's: no results folder is made in the working directory
    create = given_tracking_uri(args.tracking_uri) is None
    return resolve_tracking(args.tracking_uri, results_root(args.root, create=create), read_only=read_only)


def _open_existing(args: argparse.Namespace) -> TrackingTarget:
    """A read-only open of results that must exist (pxd frontier, stages, select, remeasure): a mistyped --root,
    PXD_HOME or sqlite:/// tracking URI is refused, and nothing is created there (MLflow would create a
    new, empty store; `results_root` the folder)."""
    uri = given_tracking_uri(args.tracking_uri)
    if uri is None:
        flag = "PXD_HOME" if not args.root and os.environ.get("PXD_HOME") else "--root"
        root = results_root(args.root, create=False)
        database = Path(EmbeddedServer(root).backend_uri.removeprefix("sqlite:///"))
        if not database.is_file():
            raise ConfigError(flag, f"no pxd results at {root} ({database.name} is not there); check --root (or "
                                    "PXD_HOME), or pass the --tracking-uri the sweep used")
    elif uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///").split("?", 1)[0]).is_file():
        flag = "--tracking-uri" if args.tracking_uri else "MLFLOW_TRACKING_URI"
        raise ConfigError(flag, f"{uri}: no such database file; check the path")
    return _open_tracking(args, read_only=True)


def cmd_frontier(args: argparse.Namespace) -> int:
    from mlflow.tracking import MlflowClient  # start-up cost

    target = _open_existing(args)
    try:
        client = MlflowClient(target.uri)
        parent = require_sweep_run(client, args.sweep)
        if args.compare:
            tables = [hardware_table(client, parent.info.run_id, label) for label in args.compare]
            return _print_comparison(compare_tables(*tables), tables, args)
        if args.hardware:
            table = hardware_table(client, parent.info.run_id, args.hardware)
            reference, ideal = table["reference_point"], table["ideal_point"]
        else:
            objectives, reference, ideal = sweep_objectives(parent)
            table = frontier_table(collect_rows(client, parent), objectives, reference, ideal)
    finally:
        target.close()
    if args.plot is not None:
        # matplotlib (start-up cost)
        from orchestrator.results.artifacts import cost_axes
        from orchestrator.results.plots import plot_png

        # the axes of the PNG the sweep (or pxd remeasure) logged for this frontier
        axes = tuple(o["name"] for o in table["objectives"] if o["name"] != primary_metric()) or cost_axes(table)
        plot_png(table, args.plot, x_metrics=axes)
    if args.json:
        print(table_to_json(table))
    else:
        print(format_table(table))
        on = f" on hardware {args.hardware}" if args.hardware else ""
        print(f"hypervolume{on} {table['hypervolume_normalised']:.4f} normalised ({table['hypervolume']:.6g} against reference "
              f"{reference}, ideal {ideal}) · sweep {parent.data.tags.get(Tag.SWEEP)} · parent run {parent.info.run_id}"
              + (f" · plot {args.plot}" if args.plot else ""))
    return 0


def _print_comparison(comparison: dict, tables: list[dict], args: argparse.Namespace) -> int:
    first, second = comparison["first"], comparison["second"]
    if args.plot is not None:
        from orchestrator.results.plots import plot_comparison_png  # matplotlib (start-up cost)

        plot_comparison_png(tables[0], tables[1], args.plot)
    if args.json:
        print(table_to_json(comparison))
        return 0
    a, b, primary = hardware_metric(first).name, hardware_metric(second).name, primary_metric()
    print(f"{'':<6} {'run_id':<34} {primary:>8} {a:>24} {b:>24}")
    for status, runs in (("stay", comparison["stay"]), ("leave", comparison["leave"]), ("join", comparison["join"])):
        for run in runs:
            metrics = comparison["rows"][run]["metrics"]
            print(f"{status:<6} {run:<34} {metrics.get(primary, float('nan')):>8.4f} "
                  f"{metrics.get(a, float('nan')):>24.4f} {metrics.get(b, float('nan')):>24.4f}")
    print(f"from {first} to {second}: {len(comparison['leave'])} leave the frontier, {len(comparison['join'])} join, "
          f"{len(comparison['stay'])} stay" + (f" · plot {args.plot}" if args.plot else ""))
    return 0


def cmd_remeasure(args: argparse.Namespace) -> int:
    from mlflow.tracking import MlflowClient  # start-up cost

    request = TimingRequest(label=args.hardware, runtime=args.runtime, device=args.device, threads=args.threads,
                            warmup=args.warmup, repeats=args.repeats, batch_size=args.batch, dtype=args.dtype,
                            trust_pickles=args.trust_pickles)
    check_request(request, local=args.resource is None)
    if args.ray_address and not args.resource:
        raise ConfigError("--ray-address", "is for timing on Ray nodes: add --resource NAME (the custom resource "
                                           "of the target nodes), or omit --ray-address to time on this machine")
    if args.ray_address:
        from orchestrator.driver.checks import check_reachable  # brings the space: torch, optuna (start-up cost)

        check_reachable(args.ray_address)
    # the sweep and its students must exist before a server starts or Ray joins (nothing is created)
    lookup = _open_existing(args)
    try:
        client = MlflowClient(lookup.uri)
        parent = require_sweep_run(client, args.sweep)
        if not any(r.state == "COMPLETE" and r.model_uri for r in collect_rows(client, parent)):
            raise ConfigError("sweep", f"{args.sweep} has no complete trial with a logged student to time")
        sweep_run_id, sweep_name = parent.info.run_id, parent.data.tags.get(Tag.SWEEP, args.sweep)
    finally:
        lookup.close()
    if args.resource:
        import ray  # start-up cost

        if not ray.is_initialized():
            try:
                ray.init(address=args.ray_address or "auto", log_to_driver=False, logging_level="ERROR")
            except ConnectionError as exc:
                raise ConfigError("--ray-address", f"no Ray cluster to join ({exc}); pass --ray-address HOST:PORT of "
                                                   "its head, or drop --resource to time on this machine") from None
    target = _open_tracking(args)
    try:
        table = remeasure(MlflowClient(target.uri), target.uri, sweep_run_id, request, resource=args.resource)
    finally:
        target.close()
    if args.json:
        print(table_to_json(table))
    else:
        print(format_table(table))
        shared = len(table["timed"]) - len(set(table.get("timed_runs", table["timed"])))
        print(f"timed {len(table['timed'])} students of {sweep_name} on {args.hardware} ({args.runtime}, {args.device}, "
              f"{args.threads} thread(s)"
              + (f"; {shared} of them share another copy's timing" if shared else "")
              + f"); skipped {len(table['skipped'])}"
              + "".join(f"\n  skipped {k}: {v}" for k, v in table["skipped"].items()))
    return 0


def cmd_select(args: argparse.Namespace) -> int:
    from mlflow.tracking import MlflowClient  # start-up cost

    limits = Limits(max_latency_ms=args.max_latency_ms, max_gmacs=args.max_gmacs, max_pixels=args.max_pixels,
                    min_top1=args.min_top1)
    check_limits(limits)
    check_registry_names(args.name, args.alias)
    # choose on a read-only open (an unknown root, sweep or label, or no feasible point: nothing is created),
    # then register through the tracking server
    lookup = _open_existing(args)
    try:
        choice = choose_for_sweep(MlflowClient(lookup.uri), args.sweep, limits, hardware=args.hardware, name=args.name)
    finally:
        lookup.close()
    target = _open_tracking(args)
    try:
        chosen = register(MlflowClient(target.uri), choice, args.alias, trust_pickles=args.trust_pickles)
        load = _load_instructions(target, chosen["uri"], chosen["input_size"], trust_pickles=chosen["pickled"])
    finally:
        target.close()
    if args.json:
        print(json.dumps({**chosen, "load": load}, indent=2, default=str))
        return 0
    metrics = chosen["metrics"]
    print(f"selected run {chosen['run_id']}: {chosen['params']} at {chosen['input_size']}×{chosen['input_size']} px")
    shown = (primary_metric(), "test_top1", "gmacs", "pixels")
    print("  " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k in shown or k.startswith("latency_ms")))
    print(f"  why: {chosen['why']}")
    print(f"registered {chosen['model_name']} version {chosen['version']} with alias @{chosen['alias']}")
    print("load it:" + "".join(f"\n  {line}" for line in load))
    return 0


def _load_instructions(target: TrackingTarget, uri: str, input_size: int, *, trust_pickles: bool = False) -> list[str]:
    """Shell lines that load the registered model as written, with pxd's checked loader (tensors only,
    `orchestrator.results.students.load_student`). A `models:/` URI resolves through a tracking server, and the
    embedded store's artifacts are proxied (mlflow-artifacts:/), so its server must run."""
    from orchestrator.tracking import credentials  # optuna (start-up cost)

    trusted = ", trust_pickles=True" if trust_pickles else ""  # a pickle the user registered with --trust-pickles
    code = (f"import torch; from orchestrator.results.students import load_student; "
            f"m = load_student({json.dumps(uri)}{trusted}); "
            f"print(m(torch.zeros(1, 3, {input_size}, {input_size})).shape)")
    python = f"python -c {shlex.quote(code)}"
    if target.store is not None:
        server = EmbeddedServer(target.store)
        return [f"mlflow server --backend-store-uri {shlex.quote(server.backend_uri)} --artifacts-destination "
                f"{shlex.quote(str(server.artifacts))} --port 5000 &   # serves the results; stop it with: kill %1",
                f"MLFLOW_TRACKING_URI=http://127.0.0.1:5000 {python}"]
    return [f"MLFLOW_TRACKING_URI={shlex.quote(credentials.without_password(target.uri))} {python}"]


def cmd_stages(args: argparse.Namespace) -> int:
    from orchestrator.stages.listing import list_stages  # mlflow (start-up cost)

    target = _open_existing(args)  # a mistyped --root is refused; no empty store is made there
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
    primary = primary_metric()
    print(f"{'stage':<10} {'key':<14} {'arch':<24} {'res':>4} {primary:>8} {'train_s':>8} {'MB':>7} {'state':<8} run_id")
    for r in rows:
        print(f"{r['stage']:<10} {r['key'][:12]:<14} {str(r['arch'])[:24]:<24} {str(r['resolution']):>4} {r[primary]:>8.4f} "
              f"{r['train_seconds']:>8.1f} {r['size_mb']:>7.2f} {r['state']:<8} {r['run_id']}")
    return 0
