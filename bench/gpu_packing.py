"""GPU packing benchmark: a sweep of small TAS trials packed N to one GPU, busy fraction sampled with NVML.

    python bench/gpu_packing.py [--trials 16] [--concurrency 1 4 8] [--host-data 4] [--channels-last 4]
                                [--device cuda]
                                [--threads 2] [--train-per-class 64] [--out results.json]

What it measures: "several fractional-GPU trials packed on one GPU; GPU busy fraction over a sweep of
small trials (sampled with NVML)". This runs the trial body a sweep runs (`pxd.pipeline.run_tas`: an
assistant per student architecture shared through a stage store, the trial's own student, its latency
timing) in N worker processes that share one GPU, as Ray places N trials that each ask for 1/N of a GPU
(`search.resources.gpu`), and feeds them trials from one queue, as a scheduler does. It does not go
through Ray, Optuna or MLflow: they are not installable on the GPU machine this was written for (the Ray
wheel alone is larger than what can be carried there), so orchestration overhead (`bench/overhead.py`)
is not in these figures; this isolates what packing does to the GPU.

The space is the quickstart's (`search_spaces/quickstart.yaml`: 3 student architectures, 3 input sides,
temperature and ISRD weight drawn), with trials drawn from a seeded generator, the same trials for every
configuration. The teacher is trained once before any configuration (a sweep trains it once, before its
trials); each configuration starts from a stage store holding only that teacher, so it trains its own
assistants. Workers load the data and start CUDA before the clock starts (a sweep's kept worker
processes), so the trial phase is timed from the first trial handed out to the last one finished.

Printed per configuration: trial-phase wall time, trials per minute, median trial wall, stage training
time ÷ (wall × N) (the sweep-efficiency formula of bench/overhead.py, over the trial phase), and, with
NVML, the GPU busy fraction over the trial phase (mean `utilization.gpu`: the share of time at least one
kernel ran) and peak memory. `--host-data N` adds a run at concurrency N with the data kept on the host
(`train.max_device_data_bytes: 0`) beside the default (data resident on the GPU); `--channels-last N` a
run at concurrency N with `train.channels_last: true` beside the default (NCHW). Target: busy ≥ 0.85.
Without NVML (or on `--device cpu`) the busy columns are nan. Not in the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fcntl
import json
import multiprocessing as mp
import os
import platform
import queue
import random
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu_busy import GpuBusySampler, NvmlUnavailable  # noqa: E402

# The quickstart space's fixed sections (search_spaces/quickstart.yaml), as a trial config sees them.
BASE: dict[str, Any] = {
    "name": "gpu-packing",
    "seed": 0,
    "dataset": {"kind": "synthetic", "image_size": 64, "num_classes": 8, "train_per_class": 64, "val_per_class": 32},
    "teacher": {"arch": "resnet10t", "resolution": 64, "epochs": 8},
    "assistant": {"enabled": True, "epochs": 3, "distill": {"temperature": 2.0}},
    "student": {"arch": "resnet10t", "resolution": 32},
    "distill": {"ce": 1.0, "kd": 0.9, "temperature": 2.0, "isrd": 1.0},
    "train": {"optimizer": "sgd", "lr": 0.05, "batch_size": 32, "epochs": 3, "device": "cuda"},
}
ARCHS = ("resnet10t", "mobilenetv3_small_050", "blockwise_resnet")


def draw_trials(n: int, seed: int) -> list[dict[str, Any]]:
    """`n` student/distillation settings drawn from the quickstart's distributions."""
    rng = random.Random(seed)
    trials = []
    for _ in range(n):
        student: dict[str, Any] = {"arch": rng.choice(ARCHS), "resolution": rng.choice([16, 32, 48])}
        if student["arch"] == "blockwise_resnet":
            student |= {"depths": [1, rng.choice([1, 2]), rng.choice([1, 2]), 1],
                        "widths": [16, 32, rng.choice([32, 64]), 64]}
        trials.append({"student": student,
                       "distill": {"temperature": rng.choice([1.0, 2.0]), "isrd": rng.uniform(0.0, 2.0)}})
    return trials


def trial_config(base: dict[str, Any], trial: dict[str, Any]) -> dict[str, Any]:
    raw = copy.deepcopy(base)
    raw["student"] = dict(trial["student"])
    raw["distill"] = raw["distill"] | trial["distill"]
    return raw


class FileStageStore:
    """Stages shared by the worker processes through a folder: a stage is trained once, under a file
    lock, and loaded by every later trial that needs it (what the sweep's stage store and leases do)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def get_or_train(self, kind: str, key: str, describe: dict[str, Any], train: Any) -> Any:
        import torch

        from pxd.pipeline import StageOutcome

        path = self.root / f"{kind}-{key}.pt"
        with open(self.root / f"{kind}-{key}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if path.exists():
                return StageOutcome(result=torch.load(path, weights_only=False), key=key, reused=True)
            result = train()
            partial = path.with_suffix(".partial")
            torch.save(result, partial)
            os.replace(partial, path)
            return StageOutcome(result=result, key=key, reused=False)


def worker(rank: int, base: dict[str, Any], trials: list[dict[str, Any]], store: str, threads: int,
           tasks: Any, results: Any) -> None:
    """Load the data and start the device, say ready, then run trials from `tasks` until a None."""
    try:
        import torch

        from pxd.config import PipelineConfig
        from pxd.data import load_dataset
        from pxd.pipeline import run_tas
        from pxd.train import resolve_device

        torch.set_num_threads(threads)
        cfg0 = PipelineConfig.from_dict(trial_config(base, trials[0]))
        device = resolve_device(cfg0.train.device)
        data = load_dataset(cfg0.dataset, cfg0.seed)
        if device.type == "cuda":
            torch.zeros(1, device=device).sum().item()  # the CUDA context, before the clock starts
        provider = FileStageStore(Path(store))
        results.put(("ready", rank, None))
        while (index := tasks.get()) is not None:
            started = time.perf_counter()
            cfg = PipelineConfig.from_dict(trial_config(base, trials[index]))
            outcome = run_tas(cfg, provider=provider, data=data, progress=False)
            results.put(("done", rank, {
                "index": index, "wall_s": time.perf_counter() - started, "timings": outcome.timings,
                "val_top1": outcome.metrics["val_top1"], "arch": cfg.student.arch,
                "resolution": cfg.student.resolution,
                "reused": {kind: stage.reused for kind, stage in outcome.stages.items()}}))
    except BaseException:  # reported to the driver, which stops this configuration
        results.put(("error", rank, traceback.format_exc()))


def _stop(procs: list[Any]) -> None:
    for proc in procs:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.terminate()


def run_configuration(base: dict[str, Any], trials: list[dict[str, Any]], teacher_store: Path, *, concurrency: int,
                      threads: int, gpu_index: int | None, timeout_s: float) -> dict[str, Any]:
    ctx = mp.get_context("spawn")  # CUDA cannot be used in a forked child
    store = Path(tempfile.mkdtemp(prefix="pxd-packing-store-"))
    for file in teacher_store.glob("teacher-*.pt"):
        shutil.copy(file, store / file.name)
    tasks, results = ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=worker, args=(rank, base, trials, str(store), threads, tasks, results), daemon=True)
             for rank in range(concurrency)]
    done: list[dict[str, Any]] = []
    error: str | None = None
    sampler = GpuBusySampler(gpu_index) if gpu_index is not None else None
    start = end = time.time()
    with contextlib.ExitStack() as stack:
        if sampler is not None:
            stack.enter_context(sampler)
        stack.callback(shutil.rmtree, store, ignore_errors=True)
        stack.callback(_stop, procs)
        for proc in procs:
            proc.start()
        try:
            ready = 0
            while ready < concurrency and error is None:
                kind, rank, payload = results.get(timeout=timeout_s)
                ready += kind == "ready"
                error = payload if kind == "error" else None
            start = time.time()
            for index in range(len(trials) if error is None else 0):
                tasks.put(index)
            for _ in procs:
                tasks.put(None)
            while error is None and len(done) < len(trials):
                kind, rank, payload = results.get(timeout=timeout_s)
                if kind == "error":
                    error = payload
                elif kind == "done":
                    done.append(payload)
                    print(f"[bench] concurrency {concurrency}: trial {len(done)}/{len(trials)} "
                          f"({payload['arch']} @ {payload['resolution']}px) {payload['wall_s']:.1f} s",
                          file=sys.stderr)
        except queue.Empty:
            error = f"no word from the workers in {timeout_s:.0f} s"
        end = time.time()
    wall = end - start
    training = sum(r["timings"].get("training", 0.0) for r in done)
    out: dict[str, Any] = {
        "concurrency": concurrency, "trials": len(done), "error": error, "trial_phase_s": wall,
        "trials_per_min": 60 * len(done) / wall if wall > 0 else float("nan"),
        "trial_wall_median_s": statistics.median(r["wall_s"] for r in done) if done else float("nan"),
        "training_s": training,
        "efficiency": training / (wall * concurrency) if wall > 0 else float("nan"),
        "results": done,
    }
    if sampler is not None:
        out["gpu_busy"] = sampler.summary(start=start, end=end)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8], help="trials sharing the GPU")
    parser.add_argument("--host-data", type=int, default=None, metavar="N",
                        help="also run concurrency N with the data kept on the host")
    parser.add_argument("--channels-last", type=int, default=None, metavar="N",
                        help="also run concurrency N with train.channels_last: true")
    parser.add_argument("--device", default="cuda", help="cuda | cpu (cpu: to try the benchmark without a GPU)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads per worker process")
    parser.add_argument("--train-per-class", type=int, default=64)
    parser.add_argument("--teacher-epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="the seed trials are drawn with")
    parser.add_argument("--gpu-index", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=300, help="seconds without word from a worker")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import torch

    from pxd.config import PipelineConfig
    from pxd.pipeline import prepare_teacher

    base = copy.deepcopy(BASE)
    base["train"]["device"] = args.device
    base["dataset"]["train_per_class"] = args.train_per_class
    base["teacher"]["epochs"] = args.teacher_epochs
    trials = draw_trials(args.trials, args.seed)
    gpu_index: int | None = None
    if args.device == "cuda":
        try:
            with GpuBusySampler(args.gpu_index) as probe:
                print(f"[bench] sampling {probe.name} (GPU {args.gpu_index}) with NVML", file=sys.stderr)
            gpu_index = args.gpu_index
        except NvmlUnavailable as error:
            print(f"[bench] no busy fraction: {error}", file=sys.stderr)

    teacher_store = Path(tempfile.mkdtemp(prefix="pxd-packing-teacher-"))
    started = time.perf_counter()
    teacher = prepare_teacher(PipelineConfig.from_dict(trial_config(base, trials[0])),
                              provider=FileStageStore(teacher_store), progress=False)
    teacher_s = time.perf_counter() - started
    print(f"[bench] teacher trained once: {teacher_s:.1f} s, val_top1 {teacher.result.metrics['val_top1']:.3f}",
          file=sys.stderr)

    device = torch.cuda.get_device_name(args.gpu_index) if args.device == "cuda" else platform.processor() or "cpu"
    print(f"{args.trials} quickstart trials (seed {args.seed}), device {device}, {os.cpu_count()} CPUs, "
          f"{args.threads} threads per worker, torch {torch.__version__}; teacher once: {teacher_s:.1f} s")
    print(f"{'configuration':<30}{'trials':>7}{'phase s':>9}{'trials/min':>11}{'trial s':>9}"
          f"{'train/(wall·N)':>16}{'GPU busy':>10}{'any kernel':>11}{'mem MiB':>9}", flush=True)
    plans = [(f"{c} per device, data on device", base, c) for c in args.concurrency]
    if args.host_data:
        host = copy.deepcopy(base)
        host["train"]["max_device_data_bytes"] = 0
        plans.append((f"{args.host_data} per device, data on host", host, args.host_data))
    if args.channels_last:
        channels_last = copy.deepcopy(base)
        channels_last["train"]["channels_last"] = True
        plans.append((f"{args.channels_last} per device, channels_last", channels_last, args.channels_last))
    runs: list[tuple[str, dict[str, Any]]] = []
    for label, config, concurrency in plans:  # each row as it comes: a long run cut short keeps the others
        r = run_configuration(config, trials, teacher_store, concurrency=concurrency, threads=args.threads,
                              gpu_index=gpu_index, timeout_s=args.timeout)
        runs.append((label, r))
        if r["error"]:
            print(f"[bench] {label}: stopped: {r['error']}", file=sys.stderr)
        busy = r.get("gpu_busy", {})
        print(f"{label:<30}{r['trials']:>7}{r['trial_phase_s']:>9.1f}{r['trials_per_min']:>11.1f}"
              f"{r['trial_wall_median_s']:>9.2f}{r['efficiency']:>16.3f}"
              f"{busy.get('busy_fraction', float('nan')):>10.3f}{busy.get('any_kernel_fraction', float('nan')):>11.3f}"
              f"{busy.get('memory_used_max_mib', float('nan')):>9.0f}", flush=True)
        if args.out:
            args.out.write_text(json.dumps({"settings": vars(args) | {"out": str(args.out)}, "teacher_s": teacher_s,
                                            "device": device, "torch": torch.__version__,
                                            "runs": [{"label": name} | run for name, run in runs]},
                                           indent=2, default=str))
    shutil.rmtree(teacher_store, ignore_errors=True)
    measured = [b for _, r in runs if (b := r.get("gpu_busy", {}).get("busy_fraction", float("nan"))) == b]
    if measured:
        best = max(measured)
        print(f"best GPU busy fraction over a trial phase: {best:.3f} vs target 0.85 "
              f"({'met' if best >= 0.85 else f'missed by {0.85 - best:.3f}'})")
    return 1 if any(r["error"] for _, r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
