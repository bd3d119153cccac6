"""Latency runtimes: how a model runs while it is timed, one registry entry each, and the one timing loop.

A `Runtime` says which optional module it needs, whether bf16/fp16 run under torch autocast (a runtime
that does not honour them runs, and reports, float32), and how to prepare a model into a callable that
takes a batch. `time_calls` times every runtime (`pxd.cost.measure_runtime`, `pxd remeasure`) and the
latency measured after training (`pxd.cost.measure_latency`, the torch runtime), the same way.

Adding a runtime is one `Runtime(...)` row in `RUNTIMES` at the end of this file (or a `register` call
from outside it); the CLI's `--runtime` choices and the checks of a remeasure request come from `RUNTIMES`.
"""

from __future__ import annotations

import copy
import importlib
import io
import platform
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["AUTOCAST_DTYPES", "Runtime", "RUNTIMES", "register", "get_runtime", "time_calls", "device_name"]

# What torch autocast runs in reduced precision; float32 runs as it is.
AUTOCAST_DTYPES = (torch.bfloat16, torch.float16)

# model (a float32 copy in eval mode, on `device`), input side, device, intra-op threads → a callable
# taking a batch (a torch tensor on `device`)
Prepare = Callable[[nn.Module, int, torch.device, int], Callable[[torch.Tensor], Any]]


@dataclass(frozen=True)
class Runtime:
    name: str
    prepare: Prepare
    # bf16/fp16 run under torch.autocast; False: the runtime runs, and reports, float32 whatever is asked
    autocast: bool = True
    module: str | None = None  # the optional module it needs (an import name), if any
    install: str = ""  # how a user gets that module

    @property
    def dtypes(self) -> tuple[str, ...]:
        """The dtypes it honours, as a config or request names them."""
        return ("float32", "bfloat16", "float16") if self.autocast else ("float32",)

    def runner(self, model: nn.Module, resolution: int, device: torch.device, threads: int) -> Callable[[torch.Tensor], Any]:
        """A callable taking a batch, running a float32 eval copy of `model` (the caller's is left alone)."""
        if self.module is not None:
            try:
                importlib.import_module(self.module)
            except ImportError as exc:
                raise RuntimeError(f"the {self.name} runtime needs the optional extra: {self.install}") from exc
        runner = copy.deepcopy(model).to(device=device, dtype=torch.float32).eval()
        return self.prepare(runner, resolution, device, threads)

    def reported_dtype(self, dtype: torch.dtype) -> str:
        return str(dtype).removeprefix("torch.") if self.autocast else "float32"


def time_calls(
    run: Callable[[torch.Tensor], Any],
    images: torch.Tensor,
    *,
    warmup: int,
    repeats: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    autocast: bool = True,
) -> list[float]:
    """Seconds of each of `repeats` calls `run(images)`, after `warmup` untimed ones (compilation, caches),
    under inference mode and, for bf16/fp16 with `autocast`, torch autocast. On CUDA every call is
    synchronised before and after, so a time is the call's own."""
    sync: Callable[[], None] = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    context: Any = (torch.autocast(device_type=device.type, dtype=dtype)
                    if autocast and dtype in AUTOCAST_DTYPES else nullcontext())
    times = []
    with torch.inference_mode(), context:
        for step in range(warmup + repeats):
            sync()
            start = time.perf_counter()
            run(images)
            sync()
            if step >= warmup:
                times.append(time.perf_counter() - start)
    return times


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model: what a timing was measured on."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")  # Linux names the CPU model here; platform.processor() does not
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "cpu"


def _onnxruntime(model: nn.Module, resolution: int, device: torch.device, threads: int) -> Callable[[torch.Tensor], Any]:
    """The model exported to ONNX (batch axis dynamic) in an ONNX Runtime session with `threads` threads."""
    import onnxruntime as ort  # the optional extra: imported only when this runtime is used

    buffer = io.BytesIO()
    example = torch.zeros(1, 3, resolution, resolution, device=device)
    torch.onnx.export(model, (example,), buffer, input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    providers = ["CUDAExecutionProvider"] if device.type == "cuda" else ["CPUExecutionProvider"]
    session = ort.InferenceSession(buffer.getvalue(), options, providers=providers)
    return lambda batch: session.run(None, {"image": batch.cpu().numpy()})


# The runtimes, one row each; `register` adds one from outside this file.
RUNTIMES: dict[str, Runtime] = {runtime.name: runtime for runtime in (
    Runtime("torch", prepare=lambda model, resolution, device, threads: model),
    Runtime("torch-compile", prepare=lambda model, resolution, device, threads: torch.compile(model)),
    Runtime("onnxruntime", prepare=_onnxruntime, autocast=False, module="onnxruntime",
            install="pip install 'pxd[onnx]'"),
)}


def register(runtime: Runtime) -> Runtime:
    """Add a runtime; a name may be registered once."""
    if runtime.name in RUNTIMES:
        raise ValueError(f"runtime {runtime.name!r} is already registered")
    RUNTIMES[runtime.name] = runtime
    return runtime


def get_runtime(name: str) -> Runtime:
    try:
        return RUNTIMES[name]
    except KeyError:
        raise ValueError(f"unknown runtime {name!r}; use one of {tuple(RUNTIMES)}") from None
