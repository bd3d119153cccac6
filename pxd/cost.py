"""What a model costs to run: parameters, multiply-accumulates, input pixels, latency, throughput.

`gmacs` counts one multiply-add as 1 (torch's FlopCounterMode counts 2 FLOPs per MAC), over the
matrix products and convolutions (incl. attention) of one image; norms, activations and pooling are
not counted, as in fvcore/ptflops conventions. Everything but latency and throughput is
deterministic.

Latency and throughput depend on the architecture, the input and how they are timed, not on the
weights; a `LatencyCache` lets the trials of a sweep that train the same architecture at the same
input reuse one measurement instead of timing it again (`measure_cost(..., cache=...)`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from pxd.memo import ProcessMemory
from pxd.models import eval_mode
from pxd.runtimes import AUTOCAST_DTYPES, device_name, get_runtime, time_calls

__all__ = [
    "Cost",
    "count_params",
    "count_gmacs",
    "measure_latency",
    "measure_cost",
    "static_cost",
    "RuntimeTiming",
    "measure_runtime",
    "LatencyCache",
]


@dataclass
class Cost:
    params_m: float  # parameters, millions
    gmacs: float  # multiply-accumulates per image, billions
    pixels: int  # H × W of the input per image
    latency_ms: float  # median batch-1 latency
    throughput_ips: float  # images per second at `batch_size`
    batch_size: int  # batch used for throughput
    device: str
    dtype: str
    threads: int  # torch.get_num_threads() while measuring
    warmup: int
    repeats: int
    device_name: str = ""  # CPU model or GPU name, for re-measurement on other hardware
    latency_reused: bool = False  # latency and throughput come from a `LatencyCache`, not timed for this model

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def count_params(model: nn.Module) -> float:
    """Parameters in millions (every parameter, trainable or not; buffers are not parameters)."""
    return sum(p.numel() for p in model.parameters()) / 1e6


def count_gmacs(model: nn.Module, resolution: int, channels: int = 3) -> float:
    """Billions of multiply-accumulates for one `channels`×`resolution`×`resolution` image."""
    param = next(model.parameters())
    image = torch.zeros(1, channels, resolution, resolution, device=param.device, dtype=param.dtype)
    counter = FlopCounterMode(display=False)
    # The fused CPU attention kernel has no FLOP formula in torch; the math backend runs attention as
    # plain batched matmuls, which the counter sees.
    with eval_mode(model), torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), counter:
        model(image)
    return counter.get_total_flops() / 2 / 1e9


def measure_latency(
    model: nn.Module,
    resolution: int,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    warmup: int = 3,
    repeats: int = 10,
    batch_size: int = 1,
) -> dict[str, Any]:
    """Median wall time of one forward pass of a `batch_size` batch, on a copy of `model`.

    The copy is moved to `device`, in eval mode, in the default (NCHW) memory format; for bf16/fp16 it
    runs under autocast. The caller's model is left as it was.
    """
    if repeats < 1 or warmup < 0 or batch_size < 1:
        raise ValueError(f"need repeats ≥ 1, warmup ≥ 0, batch_size ≥ 1 (got {repeats}, {warmup}, {batch_size})")
    if dtype not in AUTOCAST_DTYPES and dtype != torch.float32:
        raise ValueError(f"dtype must be float32, bfloat16 or float16 (got {dtype})")
    target = torch.device(device)
    # float32 weights: autocast, not the weights' dtype, decides the compute dtype.
    runner = get_runtime("torch").runner(model, resolution, target, torch.get_num_threads())
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, resolution, resolution, generator=generator).to(target)
    times_s = time_calls(runner, images, warmup=warmup, repeats=repeats, device=target, dtype=dtype)
    median_s = statistics.median(times_s)
    return {
        "latency_ms": median_s * 1e3,
        "throughput_ips": batch_size / median_s,
        "batch_size": batch_size,
        "device": str(target),
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "warmup": warmup,
        "repeats": repeats,
        "device_name": device_name(target),
    }


_TIMED = ("latency_ms", "throughput_ips", "batch_size", "device", "dtype", "threads", "warmup", "repeats",
          "device_name")  # the `Cost` fields a `LatencyCache` holds


class LatencyCache:
    """Latency measurements keyed by everything that decides them: the architecture (the caller's
    description plus the module structure and parameter shapes), input resolution, device and its name,
    dtype, threads, warm-up, repeats, throughput batch, torch version, and `scope` (e.g. the sweep: a
    measurement is reused within it, never across sweeps). Held in the process's `memory` (its `latency`
    table, shared by every cache given the same memory) and, with `directory`, in one JSON file per key, so
    other processes on the same machine (the sweep's other trials) reuse it too. With neither, nothing is
    reused.
    """

    def __init__(self, scope: str, directory: str | Path | None = None, memory: ProcessMemory | None = None) -> None:
        self.scope = scope
        self.directory = Path(directory) if directory is not None else None
        self.memory = memory

    def key(self, model: nn.Module, resolution: int, architecture: dict[str, Any], settings: dict[str, Any]) -> str:
        structure = hashlib.sha256(repr(model).encode())
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            structure.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        payload = {"scope": self.scope, "architecture": architecture, "structure": structure.hexdigest(),
                   "model_class": type(model).__qualname__, "resolution": resolution, "torch": torch.__version__,
                   **settings}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:40]

    def get(self, key: str) -> dict[str, Any] | None:
        kept = self.memory.latency if self.memory is not None else {}
        if key in kept:
            return dict(kept[key])
        if self.directory is None:
            return None
        try:
            timing = json.loads((self.directory / f"{key}.json").read_text())
        except (OSError, ValueError):  # absent, or being replaced: time it again
            return None
        kept[key] = timing
        return dict(timing)

    def put(self, key: str, timing: dict[str, Any]) -> None:
        if self.memory is not None:
            self.memory.latency[key] = dict(timing)
        if self.directory is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        partial = self.directory / f"{key}.{os.getpid()}.partial"
        partial.write_text(json.dumps(timing))
        os.replace(partial, self.directory / f"{key}.json")  # a reader sees no file or a whole one


def measure_cost(
    model: nn.Module,
    resolution: int,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    warmup: int = 3,
    repeats: int = 10,
    throughput_batch: int = 16,
    cache: LatencyCache | None = None,
    architecture: dict[str, Any] | None = None,
    static: Cost | None = None,
) -> Cost:
    """Every cost figure of `model` at `resolution`: batch-1 latency, batch-`throughput_batch`
    throughput. The model's device, dtype and train/eval modes are unchanged afterwards.

    With `cache`, latency and throughput are timed once per key (`LatencyCache`; `architecture` describes
    the model, e.g. its config) and reused after that, with `latency_reused` set on the result. `static`: the
    model's `static_cost` at `resolution` when the caller has it (not counted again).
    """
    target = torch.device(device)
    settings = {"device": str(target), "device_name": device_name(target), "dtype": str(dtype),
                "threads": torch.get_num_threads(), "warmup": warmup, "repeats": repeats, "batch": throughput_batch}
    key = cache.key(model, resolution, architecture or {}, settings) if cache is not None else None
    timed = cache.get(key) if cache is not None and key is not None else None
    reused = timed is not None
    if timed is None:
        single = measure_latency(
            model, resolution, device=device, dtype=dtype, warmup=warmup, repeats=repeats, batch_size=1
        )
        batched = measure_latency(
            model, resolution, device=device, dtype=dtype, warmup=warmup, repeats=repeats, batch_size=throughput_batch
        )
        timed = {**{name: single[name] for name in _TIMED if name in single},
                 "throughput_ips": batched["throughput_ips"], "batch_size": throughput_batch}
        if cache is not None and key is not None:
            cache.put(key, timed)
    static = static or static_cost(model, resolution)
    return Cost(
        params_m=static.params_m,
        gmacs=static.gmacs,
        pixels=static.pixels,
        latency_reused=reused,
        **{name: timed[name] for name in _TIMED},
    )


def static_cost(model: nn.Module, resolution: int) -> Cost:
    """What `model` costs at `resolution` by its architecture and input alone (parameters, MACs, pixels),
    known before any training; nothing is timed (latency and throughput are NaN)."""
    nan = float("nan")
    return Cost(params_m=count_params(model), gmacs=count_gmacs(model, resolution), pixels=resolution * resolution,
                latency_ms=nan, throughput_ips=nan, batch_size=0, device="", dtype="", threads=torch.get_num_threads(),
                warmup=0, repeats=0)


# ---------------------------------------------------------------------------------------------------
# Deployment runtimes: latency as users will deploy (`pxd remeasure`; the runtimes: `pxd.runtimes`)

NOISY_CV = 0.10  # a coefficient of variation above this is reported as a noisy measurement


@dataclass
class RuntimeTiming:
    """One model timed on one runtime: what a hardware label records."""

    runtime: str
    device: str
    device_name: str
    dtype: str
    threads: int
    batch_size: int  # the batch of `throughput_ips`
    warmup: int
    repeats: int
    latency_ms: float  # median, batch 1
    latency_cv: float  # coefficient of variation of the batch-1 repeats (stdev / mean)
    throughput_ips: float  # images per second at `batch_size`
    noisy: bool  # latency_cv above NOISY_CV: the number should not be trusted as is

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def measure_runtime(
    model: nn.Module,
    resolution: int,
    *,
    runtime: str = "torch",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    threads: int | None = None,
    warmup: int = 5,
    repeats: int = 30,
    batch_size: int = 16,
) -> RuntimeTiming:
    """Median batch-1 latency (and its spread) and batch-`batch_size` throughput of `model` on `runtime`.

    Warm-up passes first (they include compilation for torch-compile); `threads` fixes the intra-op
    threads for the measurement (torch and ONNX Runtime alike); on CUDA every pass is synchronised, and
    `dtype` bf16/fp16 runs under autocast (torch runtimes), in the default (NCHW) memory format.
    """
    if repeats < 2 or warmup < 0 or batch_size < 1:
        raise ValueError(f"need repeats ≥ 2, warmup ≥ 0, batch_size ≥ 1 (got {repeats}, {warmup}, {batch_size})")
    target = torch.device(device)
    chosen = get_runtime(runtime)
    previous_threads = torch.get_num_threads()
    threads = threads or previous_threads
    torch.set_num_threads(threads)
    try:
        run = chosen.runner(model, resolution, target, threads)
        generator = torch.Generator().manual_seed(0)
        timings = []
        for batch, count in ((1, repeats), (batch_size, max(3, repeats // 4))):
            images = torch.randn(batch, 3, resolution, resolution, generator=generator).to(target)
            timings.append(time_calls(run, images, warmup=warmup, repeats=count, device=target, dtype=dtype,
                                      autocast=chosen.autocast))
        single, batched = timings
    finally:
        torch.set_num_threads(previous_threads)
    median = statistics.median(single)
    cv = statistics.stdev(single) / statistics.fmean(single)
    return RuntimeTiming(
        runtime=runtime, device=str(target), device_name=device_name(target), dtype=chosen.reported_dtype(dtype),
        threads=threads, batch_size=batch_size, warmup=warmup, repeats=repeats, latency_ms=median * 1e3,
        latency_cv=cv, throughput_ips=batch_size / statistics.median(batched), noisy=cv > NOISY_CV,
    )
