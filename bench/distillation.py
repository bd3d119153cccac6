"""Distillation benchmark (issue 2): what resolution costs, and what distillation buys back.

Two comparisons, measured side by side in one run, for every seed:

(a) resolution trade-off: the student architecture trained with cross-entropy only at the teacher's
    resolution R, at R/2 and at R/4 (`val_top1`, `gmacs`, `pixels`).
(b) at R/4 with the same student budget (same epochs, data, seed, crops and initial weights):
    cross-entropy only, one-stage pixel distillation (teacher → student, `assistant.enabled: false`),
    two-stage TAS (teacher → assistant → student, Guo et al., TPAMI 2024) and TAS with
    `assistant.init_student: false`, which separates distillation from initialising the student with
    the assistant's weights. Each variant also reports the teacher/assistant training it paid for.

    python bench/distillation.py                                  # embedded synthetic set, seeds 0 1
    python bench/distillation.py --dataset ../shared/datasets/flowers128 --parts a --seeds 0

Nothing here is run by the test suite. Everything goes through pxd's API (`run_tas`, `train_stage`,
`measure_cost`); teachers and assistants shared by variants of one seed are trained once (their stage
keys are content-addressed, so equal keys mean identical stages).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pxd.config import PipelineConfig
from pxd.cost import measure_cost
from pxd.data import load_dataset
from pxd.models import create_model
from pxd.pipeline import StageOutcome, run_tas
from pxd.train import StageResult, resolve_device, train_stage
from pxd.types import DatasetSplits

__all__ = ["MemoryStageCache", "base_config", "main", "run_ce", "run_distilled", "run_seed", "summarise"]

# (b): variant name → config overrides on top of the base config (None: cross-entropy only).
DISTILL_VARIANTS: dict[str, dict[str, Any] | None] = {
    "ce_only": None,
    "one_stage": {"assistant": {"enabled": False}},
    "tas": {"assistant": {"enabled": True, "init_student": True}},
    "tas_no_init": {"assistant": {"enabled": True, "init_student": False}},
}
RESOLUTION_DIVISORS = (1, 2, 4)


class MemoryStageCache:
    """A `StageProvider` that keeps every stage in memory, keyed by its stage key (equal keys mean
    identical stages, so variants sharing a teacher or an assistant train it once)."""

    def __init__(self) -> None:
        self.results: dict[str, StageResult] = {}

    def get_or_train(self, kind: str, key: str, describe: dict[str, Any], train: Callable[[], StageResult]) -> StageOutcome:
        reused = key in self.results
        if not reused:
            self.results[key] = train()
        return StageOutcome(result=self.results[key], key=key, reused=reused)


def base_config(args: argparse.Namespace, seed: int) -> PipelineConfig:
    """The shared settings; the student is at R/4 unless a variant says otherwise."""
    if args.dataset == "synthetic":
        dataset = {"kind": "synthetic", "image_size": args.resolution, "num_classes": args.num_classes,
                   "train_per_class": args.train_per_class, "val_per_class": args.val_per_class}
    else:  # an ImageFolder tree; 0 keeps every image
        dataset = {"kind": "imagefolder", "path": args.dataset, "image_size": args.resolution,
                   "train_per_class": 0, "val_per_class": 0}
    return PipelineConfig.from_dict({
        "name": "bench-distillation",
        "seed": seed,
        "dataset": dataset,
        "teacher": {"arch": args.teacher, "resolution": args.resolution, "epochs": args.teacher_epochs},
        "student": {"arch": args.student, "resolution": args.resolution // 4},
        "distill": {"temperature": args.temperature},
        "train": {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "device": args.device},
    })


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for name, value in overrides.items():
        merged[name] = _merge(base.get(name, {}), value) if isinstance(value, dict) else value
    return merged


def _printer(seed: int, variant: str, started: float) -> Callable[[str, int, dict[str, float]], None]:
    def on_epoch(kind: str, epoch: int, record: dict[str, float]) -> None:
        terms = " ".join(f"{name[6:]} {value:.3f}" for name, value in record.items() if name.startswith("train_"))
        print(f"  [{time.perf_counter() - started:6.0f}s] seed {seed} {variant:<11} {kind:<9} epoch {epoch:>2}"
              f"  val_top1 {record['val_top1']:.3f}  {terms}  ({record['epoch_seconds']:.1f}s)", flush=True)

    return on_epoch


def run_ce(cfg: PipelineConfig, data: DatasetSplits, resolution: int, on_epoch: Callable) -> dict[str, float]:
    """The student architecture at `resolution`, cross-entropy only (no teacher), measured."""
    device = resolve_device(cfg.train.device)
    # Seeded as `run_tas` seeds every model it builds: the same initial weights as the distilled students.
    torch.manual_seed(cfg.seed)
    student = create_model(dataclasses.replace(cfg.student, resolution=resolution), data.num_classes, field="student")
    result = train_stage("student", student, data, resolution=resolution, image_resolution=cfg.teacher.resolution,
                         teacher=None, distill=None, train=cfg.train, epochs=cfg.student_epochs, seed=cfg.seed,
                         device=device, on_epoch=on_epoch, progress=False)
    cost = measure_cost(student, resolution, device=str(device), repeats=1, warmup=0)
    return {"val_top1": result.metrics["val_top1"], "gmacs": cost.gmacs, "params_m": cost.params_m,
            "pixels": float(cost.pixels), "student_seconds": result.metrics["train_seconds"],
            "teacher_seconds": 0.0, "assistant_seconds": 0.0,
            **{k: v for k, v in result.history[-1].items() if k.startswith("train_")}}


def run_distilled(cfg: PipelineConfig, data: DatasetSplits, cache: MemoryStageCache, on_epoch: Callable) -> dict[str, float]:
    """One `run_tas` pipeline; the seconds of every stage it used, cached or not (what it paid for)."""
    result = run_tas(cfg, provider=cache, on_epoch=on_epoch, progress=False, data=data, measure_latency=False)
    metrics = {name: result.metrics[name] for name in ("val_top1", "gmacs", "params_m", "pixels")}
    # the student's mean loss terms in its last epoch (train_ce, train_kd, train_isrd, ...), to explain results
    metrics.update({k: v for k, v in result.stages["student"].result.history[-1].items() if k.startswith("train_")})
    for kind in ("teacher", "assistant", "student"):
        stage = result.stages.get(kind)
        metrics[f"{kind}_seconds"] = stage.result.metrics["train_seconds"] if stage else 0.0
        if stage and kind != "student":
            metrics[f"{kind}_val_top1"] = stage.result.metrics["val_top1"]
    return metrics


def run_seed(args: argparse.Namespace, seed: int, started: float) -> dict[str, dict[str, float]]:
    """Every variant of (a) and (b) for one seed, on one dataset load and one stage cache."""
    cfg = base_config(args, seed)
    data = load_dataset(cfg.dataset, seed)
    cache = MemoryStageCache()
    runs: dict[str, dict[str, float]] = {}
    low = cfg.student.resolution
    if "a" in args.parts:
        for divisor in RESOLUTION_DIVISORS:
            resolution = cfg.teacher.resolution // divisor
            name = "ce_only" if resolution == low else f"ce_{resolution}px"
            runs[name] = run_ce(cfg, data, resolution, _printer(seed, name, started))
    if "b" in args.parts:
        for name, overrides in DISTILL_VARIANTS.items():
            if name in runs:  # ce_only at R/4 is shared by (a) and (b)
                continue
            if overrides is None:
                runs[name] = run_ce(cfg, data, low, _printer(seed, name, started))
            else:
                variant = PipelineConfig.from_dict(_merge(cfg.to_dict(), overrides))
                runs[name] = run_distilled(variant, data, cache, _printer(seed, name, started))
    return runs


def _count(seeds: list[int]) -> str:
    return f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''}"


def _mean_spread(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {spread:.3f}"


def summarise(per_seed: dict[int, dict[str, dict[str, float]]], resolution: int) -> str:
    """Markdown tables; ± is the sample standard deviation over seeds, Δ is paired by seed."""
    seeds = sorted(per_seed)
    names = list(per_seed[seeds[0]])

    def column(name: str, metric: str) -> list[float]:
        return [per_seed[seed][name][metric] for seed in seeds]

    lines: list[str] = []
    full = f"ce_{resolution}px"
    part_a = [n for n in (full, f"ce_{resolution // 2}px", "ce_only") if n in names]
    if full in part_a:
        lines += [f"(a) resolution trade-off, cross-entropy only ({_count(seeds)})", "",
                  "| student input | pixels | gmacs | val_top1 | val_top1 / full | pixels / full | gmacs / full |",
                  "|---|---|---|---|---|---|---|"]
        for name in part_a:
            side = int(column(name, "pixels")[0] ** 0.5)
            ratio = [a / b for a, b in zip(column(name, "val_top1"), column(full, "val_top1"))]
            lines.append(f"| {side}×{side} | {column(name, 'pixels')[0]:.0f} | {column(name, 'gmacs')[0]:.4f}"
                         f" | {_mean_spread(column(name, 'val_top1'))} | {statistics.fmean(ratio):.2f}"
                         f" | {column(name, 'pixels')[0] / column(full, 'pixels')[0]:.4f}"
                         f" | {column(name, 'gmacs')[0] / column(full, 'gmacs')[0]:.4f} |")
        lines.append("")
    part_b = [n for n in DISTILL_VARIANTS if n in names]
    if any(n != "ce_only" for n in part_b):
        header = ("| variant | val_top1 | Δ vs ce_only (paired) | per seed | student s | teacher s | assistant s"
                  " | total s / ce_only |")
        lines += [f"(b) student at {resolution // 4}×{resolution // 4}, same student budget ({_count(seeds)})", "",
                  header, "|---|---|---|---|---|---|---|---|"]
        for name in part_b:
            delta = [a - b for a, b in zip(column(name, "val_top1"), column("ce_only", "val_top1"))]
            total = [sum(per_seed[s][name][f"{k}_seconds"] for k in ("teacher", "assistant", "student")) for s in seeds]
            base = [per_seed[s]["ce_only"]["student_seconds"] for s in seeds]
            per = " ".join(f"{v:.3f}" for v in column(name, "val_top1"))
            lines.append(f"| {name} | {_mean_spread(column(name, 'val_top1'))} | {_mean_spread(delta)} | {per}"
                         f" | {statistics.fmean(column(name, 'student_seconds')):.0f}"
                         f" | {statistics.fmean(column(name, 'teacher_seconds')):.0f}"
                         f" | {statistics.fmean(column(name, 'assistant_seconds')):.0f}"
                         f" | {statistics.fmean(t / b for t, b in zip(total, base)):.1f}× |")
        upstream = [f"{kind} val_top1 {_mean_spread(column('tas', f'{kind}_val_top1'))}"
                    for kind in ("teacher", "assistant") if "tas" in names]
        lines += ["", "upstream models (trained once per seed, shared): " + "; ".join(upstream)]
    return "\n".join(lines)


def _environment() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        model = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        cpu = model[0] if model else cpu
    return {"date": datetime.date.today().isoformat(), "cpu": cpu, "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(), "command": " ".join([Path(sys.executable).name, *sys.argv])}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="synthetic", help="'synthetic' or the path of an ImageFolder tree")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--parts", nargs="+", choices=("a", "b"), default=["a", "b"])
    parser.add_argument("--resolution", type=int, default=None, help="teacher resolution R (default 64; 128 for a folder)")
    parser.add_argument("--teacher", default="resnet18")
    parser.add_argument("--student", default="resnet10t")
    parser.add_argument("--teacher-epochs", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=5, help="assistant and student epochs (every variant)")
    parser.add_argument("--temperature", type=float, default=4.0, help="KD temperature T (pxd's default 4)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--num-classes", type=int, default=8, help="synthetic only")
    parser.add_argument("--train-per-class", type=int, default=96, help="synthetic only")
    parser.add_argument("--val-per-class", type=int, default=48, help="synthetic only")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--out", type=Path, default=None, help="write every number and the settings as JSON")
    args = parser.parse_args(argv)
    if args.resolution is None:
        args.resolution = 64 if args.dataset == "synthetic" else 128
    if args.resolution % 4:
        parser.error(f"--resolution must be divisible by 4 (got {args.resolution})")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    environment = _environment()
    print(f"pxd distillation benchmark · {environment['cpu']} · torch {environment['torch']}"
          f" · {environment['torch_threads']} threads · seeds {args.seeds}", flush=True)
    started = time.perf_counter()
    per_seed = {seed: run_seed(args, seed, started) for seed in args.seeds}
    table = summarise(per_seed, args.resolution)
    print(f"\n{table}\n\ntotal wall-clock {time.perf_counter() - started:.0f}s")
    if args.out is not None:
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        payload = {"environment": environment, "settings": settings, "runs": per_seed, "table": table,
                   "wall_seconds": time.perf_counter() - started}
        args.out.write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
