"""Distillation benchmark: does pixel distillation beat cross-entropy where it can win?

For every seed and each of two student resolutions (R/2 and R/4 of the teacher's R), with the same
student budget (epochs, data, crops, initial weights):

    ce            the student trained with cross-entropy only
    ce_10x        the same with 10× the training images (synthetic; a folder: 10× the epochs): the
                  information ceiling of that input at a budget no variant gets (beside ce, it shows
                  how much a better learner could still gain)
    ce_init       control for init_student: CE student initialised from a CE model of the same
                  architecture trained at R (what TAS's initialisation gives without distillation)
    one_stage     teacher → student (`assistant.enabled: false`)
    tas           teacher → assistant → student, student initialised from the assistant
                  (`assistant.init_student: true`, pxd's addition)
    tas_no_init   the same, student from scratch (the paper's TAS)

Distilled variants use pxd's DistillConfig defaults (the paper's α = 0.9, T = 4, η) unless flags say
otherwise. The teacher, the assistant and the CE model at R are trained once per seed and shared; with
`--teacher-checkpoint` every seed distils from that one stored teacher (a sweep's teacher stage, downloaded
from its MLflow run: `stage/checkpoint.pt`), as a team reuses one teacher across sweeps. `--variants` picks
the variants to run; Δ vs ce is paired by seed, with its 95 % interval (Student's t over the seeds).

    PYTHONPATH=. python bench/distillation.py                     # synthetic set at 64 px, seeds 0 1 2
    PYTHONPATH=. python bench/distillation.py --dataset ../shared/datasets/flowers128 --seeds 0 1 2

Nothing here is run by the test suite. Everything goes through pxd's API (`run_tas`, `train_stage`,
`init_from`, `measure_cost`).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
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
from pxd.pipeline import StageOutcome, init_from, prepare_teacher, run_tas
from pxd.train import StageResult, resolve_device, train_stage
from pxd.types import DatasetSplits, ImageSet

__all__ = ["MemoryStageCache", "base_config", "main", "run_ce", "run_distilled", "run_seed", "summarise"]

# variant name → config overrides on top of the base config (None: trained without a teacher).
DISTILL_VARIANTS: dict[str, dict[str, Any] | None] = {
    "one_stage": {"assistant": {"enabled": False}},
    "tas": {"assistant": {"enabled": True, "init_student": True}},
    "tas_no_init": {"assistant": {"enabled": True, "init_student": False}},
}
VARIANTS = ("ce", "ce_10x", "ce_init", *DISTILL_VARIANTS)
CEILING_FACTOR = 10


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


def base_config(args: argparse.Namespace, seed: int, student_resolution: int) -> PipelineConfig:
    if args.dataset == "synthetic":
        dataset = {"kind": "synthetic", "image_size": args.resolution, "num_classes": args.num_classes,
                   "train_per_class": args.train_per_class, "val_per_class": args.val_per_class}
    else:  # an ImageFolder tree, every image (`load_bench_data` caps the training images)
        dataset = {"kind": "imagefolder", "path": args.dataset, "image_size": args.resolution,
                   "train_per_class": 0, "val_per_class": 0}
    distill = {}
    for name in ("kd", "temperature", "isrd", "attention"):
        if getattr(args, name) is not None:
            distill[name] = getattr(args, name)
    teacher = {"arch": args.teacher, "resolution": args.resolution, "epochs": args.teacher_epochs}
    if args.teacher_lr is not None:
        teacher["train"] = {"lr": args.teacher_lr}
    if args.teacher_checkpoint is not None:  # one stored teacher for every seed, used as is
        teacher.update(checkpoint=str(args.teacher_checkpoint), epochs=0)
    return PipelineConfig.from_dict({
        "name": "bench-distillation",
        "seed": seed,
        "dataset": dataset,
        "teacher": teacher,
        "student": {"arch": args.student, "resolution": student_resolution},
        "distill": distill,
        "train": {"epochs": args.epochs, "batch_size": args.batch_size, "device": args.device,
                  **({} if args.lr is None else {"lr": args.lr})},
    })


def load_bench_data(cfg: PipelineConfig, args: argparse.Namespace, seed: int) -> DatasetSplits:
    """The synthetic set as configured; a folder with `--train-per-class` training photos per class
    (drawn with `seed`), the training photos left over joining the val photos as validation (held out,
    never trained on: flowers128 has 736 val photos, too few to resolve a point)."""
    data = load_dataset(cfg.dataset, seed)
    if cfg.dataset.kind == "synthetic" or not args.train_per_class:
        return data
    generator = torch.Generator().manual_seed(seed)
    keep, rest = [], []
    for label in range(data.num_classes):
        members = torch.nonzero(data.train.labels == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        keep.append(members[: args.train_per_class])
        rest.append(members[args.train_per_class:])
    keep, rest = torch.cat(keep).sort().values, torch.cat(rest).sort().values
    train = ImageSet(data.train.images[keep], data.train.labels[keep])
    val = ImageSet(torch.cat([data.val.images, data.train.images[rest]]), torch.cat([data.val.labels, data.train.labels[rest]]))
    fingerprint = hashlib.sha256(f"{data.fingerprint}:train-per-class {args.train_per_class}:seed {seed}".encode()).hexdigest()
    return dataclasses.replace(data, train=train, val=val, fingerprint=fingerprint,
                               caps={"train_per_class": args.train_per_class})


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


def run_ce(cfg: PipelineConfig, data: DatasetSplits, resolution: int, on_epoch: Callable, *, epochs: int | None = None,
           init: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """The student architecture at `resolution`, cross-entropy only (no teacher), measured; and its weights."""
    device = resolve_device(cfg.train.device)
    # Seeded as `run_tas` seeds every model it builds: the same initial weights as the distilled students.
    torch.manual_seed(cfg.seed)
    student = create_model(dataclasses.replace(cfg.student, resolution=resolution), data.num_classes, field="student")
    if init is not None:
        init_from(init, student)
    result = train_stage("student", student, data, resolution=resolution, image_resolution=cfg.teacher.resolution,
                         teacher=None, distill=None, train=cfg.train, epochs=epochs or cfg.student_epochs,
                         seed=cfg.seed, device=device, on_epoch=on_epoch, progress=False)
    cost = measure_cost(student, resolution, device=str(device), repeats=1, warmup=0)
    metrics = {"val_top1": result.metrics["val_top1"], "gmacs": cost.gmacs, "pixels": float(cost.pixels),
               "student_seconds": result.metrics["train_seconds"],
               **{k: v for k, v in result.history[-1].items() if k.startswith("train_")}}
    return metrics, result.state_dict


def run_distilled(cfg: PipelineConfig, data: DatasetSplits, cache: MemoryStageCache, on_epoch: Callable) -> dict[str, float]:
    """One `run_tas` pipeline; upstream accuracies and the student's last-epoch loss terms."""
    result = run_tas(cfg, provider=cache, on_epoch=on_epoch, progress=False, data=data, measure_latency=False)
    metrics = {name: result.metrics[name] for name in ("val_top1", "gmacs", "pixels")}
    metrics.update({k: v for k, v in result.stages["student"].result.history[-1].items() if k.startswith("train_")})
    metrics["student_seconds"] = result.stages["student"].result.metrics["train_seconds"]
    for kind in ("teacher", "assistant"):
        if kind in result.stages:
            metrics[f"{kind}_val_top1"] = result.stages[kind].result.metrics["val_top1"]
    metrics["warnings"] = len(result.warnings)
    return metrics


def run_seed(args: argparse.Namespace, seed: int, started: float) -> dict[int, dict[str, dict[str, float]]]:
    """Every variant at every student resolution for one seed, on one dataset load and one stage cache."""
    cache = MemoryStageCache()
    data = None
    runs: dict[int, dict[str, dict[str, float]]] = {}
    high_ce_state = None
    for resolution in args.student_resolutions:
        cfg = base_config(args, seed, resolution)
        data = data or load_bench_data(cfg, args, seed)
        if high_ce_state is None and "ce_init" in args.variants:
            high, high_ce_state = run_ce(cfg, data, cfg.teacher.resolution, _printer(seed, f"ce@{cfg.teacher.resolution}", started))
            runs[cfg.teacher.resolution] = {"ce": high}
        row: dict[str, dict[str, float]] = {}
        tag = f"@{resolution}"
        row["ce"], _ = run_ce(cfg, data, resolution, _printer(seed, "ce" + tag, started))
        if not args.no_ceiling and "ce_10x" in args.variants:
            if cfg.dataset.kind == "synthetic":  # 10× the images (the val split does not change)
                more = dataclasses.replace(cfg.dataset, train_per_class=cfg.dataset.train_per_class * CEILING_FACTOR)
                big = load_dataset(more, seed)
                assert torch.equal(big.val.images, data.val.images)
                row["ce_10x"], _ = run_ce(cfg, big, resolution, _printer(seed, "ce_10x" + tag, started))
            else:
                row["ce_10x"], _ = run_ce(cfg, data, resolution, _printer(seed, "ce_10x" + tag, started),
                                          epochs=cfg.student_epochs * CEILING_FACTOR)
        if "ce_init" in args.variants:
            row["ce_init"], _ = run_ce(cfg, data, resolution, _printer(seed, "ce_init" + tag, started), init=high_ce_state)
        for name, overrides in DISTILL_VARIANTS.items():
            if name not in args.variants:
                continue
            variant = PipelineConfig.from_dict(_merge(cfg.to_dict(), overrides))
            row[name] = run_distilled(variant, data, cache, _printer(seed, name + tag, started))
        runs[resolution] = row
    return runs


def _count(seeds: list[int]) -> str:
    return f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''}"


def _mean_spread(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {spread:.3f}"


# two-sided 95 % quantiles of Student's t by degrees of freedom (seeds − 1)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086,
       23: 2.069, 29: 2.045}


def paired_interval(deltas: list[float]) -> tuple[float, float, float]:
    """Mean of paired differences and its 95 % interval (t over the seeds; n = 1: no interval)."""
    mean = statistics.fmean(deltas)
    if len(deltas) < 2:
        return mean, float("nan"), float("nan")
    degrees = len(deltas) - 1  # between tabulated ones, the next lower one's quantile (a little wider)
    half = T95[max(df for df in T95 if df <= degrees)] * statistics.stdev(deltas) / len(deltas) ** 0.5
    return mean, mean - half, mean + half


def summarise(per_seed: dict[int, dict[int, dict[str, dict[str, float]]]], args: argparse.Namespace) -> str:
    """Markdown tables; ± is the sample standard deviation over seeds, Δ is paired by seed."""
    seeds = sorted(per_seed)
    lines: list[str] = []
    high = args.resolution
    if high in per_seed[seeds[0]]:
        high_ce = [per_seed[s][high]["ce"]["val_top1"] for s in seeds]
        lines += [f"CE at the teacher's resolution {high}×{high} (student arch): {_mean_spread(high_ce)}"]
    distilled = [n for n in DISTILL_VARIANTS if n in per_seed[seeds[0]][args.student_resolutions[0]]]
    for key in ("teacher_val_top1", "assistant_val_top1"):
        values = [per_seed[s][args.student_resolutions[0]][n].get(key) for s in seeds for n in distilled]
        if values and all(v is not None for v in values):
            lines.append(f"{key.replace('_val_top1', '')} val_top1 {_mean_spread(values)}")
    lines.append("")
    for resolution in args.student_resolutions:
        names = [n for n in VARIANTS if n in per_seed[seeds[0]][resolution]]

        def column(name: str, metric: str = "val_top1") -> list[float]:
            return [per_seed[s][resolution][name][metric] for s in seeds]

        lines += [f"student at {resolution}×{resolution} ({_count(seeds)})", "",
                  "| variant | val_top1 | Δ vs ce (paired) | 95 % interval | Δ vs ce_init (paired) | per seed | student s |",
                  "|---|---|---|---|---|---|---|"]
        for name in names:
            delta_ce = [a - b for a, b in zip(column(name), column("ce"))]
            mean, low, high_end = paired_interval(delta_ce)
            interval = "n/a" if low != low else f"[{low:+.3f}, {high_end:+.3f}]"
            delta_init = (_mean_spread([a - b for a, b in zip(column(name), column("ce_init"))])
                          if "ce_init" in names else "n/a")
            per = " ".join(f"{v:.3f}" for v in column(name))
            lines.append(f"| {name} | {_mean_spread(column(name))} | {mean:+.3f} | {interval} | {delta_init}"
                         f" | {per} | {statistics.fmean(column(name, 'student_seconds')):.0f} |")
        lines.append("")
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
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--resolution", type=int, default=None, help="teacher resolution R (default 64; 128 for a folder)")
    parser.add_argument("--student-resolutions", type=int, nargs="+", default=None, help="default R/2 and R/4")
    parser.add_argument("--teacher", default="resnet10t")
    parser.add_argument("--student", default="resnet10t")
    parser.add_argument("--teacher-epochs", type=int, default=30,
                        help="the teacher trains once per seed, to convergence (a user distils a good teacher)")
    parser.add_argument("--epochs", type=int, default=5, help="assistant and student epochs (every variant)")
    parser.add_argument("--temperature", type=float, default=None, help="KD temperature T (default: pxd's)")
    parser.add_argument("--kd", type=float, default=None, help="α (default: pxd's DistillConfig default)")
    parser.add_argument("--isrd", type=float, default=None, help="ISRD weight η (default: pxd's DistillConfig default)")
    parser.add_argument("--attention", type=float, default=None, help="attention-transfer weight (default: pxd's)")
    parser.add_argument("--teacher-checkpoint", type=Path, default=None,
                        help="one stored teacher for every seed (teacher.checkpoint; --teacher-epochs is then unused)")
    parser.add_argument("--save-teacher", type=Path, default=None,
                        help="train one teacher (first seed, every training image) into this file, or reuse the file, "
                             "and distil every seed from it")
    parser.add_argument("--teacher-lr", type=float, default=None, help="the teacher's own SGD lr (default: --lr)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS,
                        help="variants to run (ce always runs: every Δ is paired against it)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=None, help="SGD lr of every stage (default: pxd's train.lr)")
    parser.add_argument("--num-classes", type=int, default=8, help="synthetic only")
    parser.add_argument("--train-per-class", type=int, default=64,
                        help="synthetic: images made; folder: training photos per class, the rest validate (0 = all train)")
    parser.add_argument("--val-per-class", type=int, default=250, help="synthetic only (8 × 250 = 2,000 val images)")
    parser.add_argument("--no-ceiling", action="store_true", help="skip ce_10x (the slowest variant)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--out", type=Path, default=None, help="write every number and the settings as JSON")
    args = parser.parse_args(argv)
    if args.save_teacher is not None and args.teacher_checkpoint is not None:
        parser.error("--save-teacher and --teacher-checkpoint: give one (--save-teacher reuses its file where it exists)")
    if args.resolution is None:
        args.resolution = 64 if args.dataset == "synthetic" else 128
    if args.student_resolutions is None:
        args.student_resolutions = [args.resolution // 2, args.resolution // 4]
    return args


def stored_teacher(args: argparse.Namespace, started: float) -> dict[str, float]:
    """`--save-teacher`: the one teacher every seed distils from, trained here unless its file exists."""
    path = args.save_teacher
    if path.exists():
        print(f"teacher: reusing {path}", flush=True)
        return {}
    cfg = base_config(args, args.seeds[0], args.student_resolutions[0])
    outcome = prepare_teacher(cfg, provider=MemoryStageCache(), on_epoch=_printer(args.seeds[0], "teacher", started))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": outcome.result.state_dict}, path)
    metrics = {"val_top1": outcome.result.metrics["val_top1"], "train_seconds": outcome.result.metrics["train_seconds"]}
    print(f"teacher: val_top1 {metrics['val_top1']:.3f} after {cfg.teacher.epochs} epochs, stored in {path}", flush=True)
    return metrics


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    environment = _environment()
    print(f"pxd distillation benchmark · {environment['cpu']} · torch {environment['torch']}"
          f" · {environment['torch_threads']} threads · seeds {args.seeds}", flush=True)
    started = time.perf_counter()
    teacher = {}
    if args.save_teacher is not None:
        teacher = stored_teacher(args, started)
        args.teacher_checkpoint, args.save_teacher = args.save_teacher, None
    per_seed: dict[int, Any] = {}
    for seed in args.seeds:
        per_seed[seed] = run_seed(args, seed, started)
        table = summarise(per_seed, args)
        if args.out is not None:  # after every seed: an interrupted run keeps the seeds it finished
            settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
            payload = {"environment": environment, "settings": settings, "teacher": teacher, "runs": per_seed, "table": table,
                       "wall_seconds": time.perf_counter() - started, "seeds_done": sorted(per_seed)}
            args.out.write_text(json.dumps(payload, indent=2))
    print(f"\n{table}\n\ntotal wall-clock {time.perf_counter() - started:.0f}s")
    if args.out is not None:
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
