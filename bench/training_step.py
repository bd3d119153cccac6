"""Training-step benchmark: one TAS student step against the sum of its parts and a plain timm loop.

    python bench/training_step.py [--student resnet10t] [--resolution 32] [--teacher-resolution 64]
                                  [--batch-size 32] [--isrd 1.0] [--repeats 15] [--steps 5]
                                  [--threads 1] [--device cpu] [--channels-last] [--compile-upstream]
                                  [--out results.json]

The step is pxd's own (`pxd.train.train_step`, what `train_stage` runs per batch) for the student stage of
the TAS chain: the assistant (the student's architecture at the teacher's resolution) forward at high
resolution under no_grad, the student forward/backward at low resolution with the stage's loss terms
(label CE, logit KD, ISRD) from pxd's `Distiller`, and the optimiser's step. Its parts, timed alone on
the same batch:

- upstream: the assistant's forward (`forward_taps`) at the teacher's resolution under no_grad;
- student CE step: `train_step` with no teacher and cross-entropy only (forward, backward, step);
- ISRD: the ISRD term's forward and backward on the student's input map (decoder + L1).

and a plain timm loop: `timm.create_model` of the same student, `model(x)`, cross-entropy, backward, step,
with the same optimiser settings. The two-view sampling of the batch is the same for every variant and
timed separately (it is not in the step).

`--compile-upstream` adds two variants beside the others, with the upstream compiled as
`train.compile_upstream: true` does (`pxd.train.upstream_forward`): `tas_step_compiled_upstream` and
`upstream_compiled`, and prints their ratios to the eager ones and the seconds the first compiled call
took (the compilation, paid once per process and input shape).

Variants are interleaved, in a shuffled order, in every repeat, so machine load affects them alike; each
repeat times `--steps` steps per variant after one warm-up step, and the medians over repeats are
reported with the ratios. On GPU the target is step ≤ 1.15× the sum of its parts. Not in the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F

from pxd.config import DistillConfig, ModelConfig, TrainConfig
from pxd.data import TwoViewSampler
from pxd.device import to_memory_format
from pxd.losses.isrd import ISRDTerm
from pxd.losses.terms import TermContext
from pxd.models import create_model, forward_taps, tap_info
from pxd.train import (
    _make_distiller,
    _optimizer,
    autocast_dtype,
    resolve_device,
    train_step,
    upstream_forward,
)


def build(args: argparse.Namespace, device: torch.device) -> dict[str, Callable[[], Any]]:
    """Every variant as a zero-argument callable running one step on the same batch."""
    torch.manual_seed(0)
    num_classes, high, low = args.num_classes, args.teacher_resolution, args.resolution
    train = TrainConfig(optimizer="sgd", lr=0.01, batch_size=args.batch_size)
    distill = DistillConfig(ce=1.0, kd=0.9, temperature=2.0, isrd=args.isrd)
    channels_last = args.channels_last

    def new_student(resolution: int) -> torch.nn.Module:
        model = create_model(ModelConfig(arch=args.student, resolution=resolution), num_classes, field="student")
        model = model.to(device)
        return model.to(memory_format=torch.channels_last) if channels_last else model

    images = torch.randint(0, 256, (args.batch_size, 3, high, high), dtype=torch.uint8, device=device)
    labels = torch.randint(0, num_classes, (args.batch_size,), device=device)
    sampler = TwoViewSampler(high, low, train=True)
    generator = torch.Generator().manual_seed(0)
    teacher_view, student_view = sampler(images, generator)

    # the TAS student stage: upstream = the assistant, frozen and in eval mode as train_stage leaves it
    assistant = new_student(high).eval()
    for param in assistant.parameters():
        param.requires_grad_(False)
    student = new_student(low).train()
    distiller = _make_distiller(student, assistant, distill, low, high, device)
    step_optimizer = _optimizer(list(student.parameters()) + distiller.student_side_parameters(), train)

    ce_student = new_student(low).train()
    ce_distiller = _make_distiller(ce_student, None, None, low, high, device)
    ce_optimizer = _optimizer(list(ce_student.parameters()), train)

    isrd_info = tap_info(student, low)
    isrd = ISRDTerm(TermContext(student=isrd_info, teacher=tap_info(assistant, high), student_resolution=low,
                                teacher_resolution=high, settings={"temperature": 1.0})).to(device)
    with torch.no_grad():
        taps = forward_taps(student, to_memory_format(student_view, device, channels_last))
    input_map = taps.input_map.detach().clone().requires_grad_(True)

    plain = timm.create_model(args.student, num_classes=num_classes, pretrained=False).to(device).train()
    if channels_last:
        plain = plain.to(memory_format=torch.channels_last)
    plain_optimizer = _optimizer(list(plain.parameters()), train)
    amp = autocast_dtype(device)

    def tas_step() -> None:
        train_step(student, assistant, distiller, step_optimizer, teacher_view, student_view, labels, device=device,
                   channels_last=channels_last)

    def upstream() -> None:
        with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            forward_taps(assistant, to_memory_format(teacher_view, device, channels_last))

    def student_ce_step() -> None:
        train_step(ce_student, None, ce_distiller, ce_optimizer, teacher_view, student_view, labels, device=device,
                   channels_last=channels_last)

    def isrd_term() -> None:
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = isrd(taps, None, labels, teacher_view)
        loss.backward()
        input_map.grad = None
        isrd.zero_grad(set_to_none=True)

    taps = type(taps)(logits=taps.logits, input_map=input_map, feature_map=taps.feature_map)

    def plain_step() -> None:
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = F.cross_entropy(plain(to_memory_format(student_view, device, channels_last)), labels)
        plain_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        plain_optimizer.step()

    def views() -> None:
        sampler(images, generator)

    variants = {"tas_step": tas_step, "upstream": upstream, "student_ce_step": student_ce_step, "isrd": isrd_term,
                "plain_timm_step": plain_step, "views": views}
    if args.compile_upstream:
        compiled = upstream_forward(assistant, compiled=True)

        def tas_step_compiled_upstream() -> None:
            train_step(student, assistant, distiller, step_optimizer, teacher_view, student_view, labels, device=device,
                       channels_last=channels_last, upstream=compiled)

        def upstream_compiled() -> None:
            with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                compiled(to_memory_format(teacher_view, device, channels_last))

        started = time.perf_counter()
        upstream_compiled()  # compiles
        args.compile_seconds = time.perf_counter() - started
        variants |= {"tas_step_compiled_upstream": tas_step_compiled_upstream, "upstream_compiled": upstream_compiled}
    return variants


def timed(run: Callable[[], Any], steps: int, device: torch.device) -> float:
    """Mean seconds per step over `steps` steps, after one warm-up step."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    run()
    sync()
    started = time.perf_counter()
    for _ in range(steps):
        run()
    sync()
    return (time.perf_counter() - started) / steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", default="resnet10t")
    parser.add_argument("--resolution", type=int, default=32, help="the student's input side")
    parser.add_argument("--teacher-resolution", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-classes", type=int, default=8)
    parser.add_argument("--isrd", type=float, default=1.0, help="ISRD weight η")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant per repeat")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (a sweep's trial: 1 per CPU)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    parser.add_argument("--channels-last", action="store_true", help="channels_last on CUDA (train.channels_last)")
    parser.add_argument("--compile-upstream", action="store_true",
                        help="also time the step and the upstream with the upstream compiled (train.compile_upstream)")
    parser.add_argument("--out", type=Path, default=None, help="write every number as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    args.channels_last = args.channels_last and device.type == "cuda"  # as train_stage: ignored on CPU
    variants = build(args, device)
    load_before = os.getloadavg()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    order = random.Random(0)
    for _ in range(args.repeats):
        names = list(variants)
        order.shuffle(names)
        for name in names:
            samples[name].append(timed(variants[name], args.steps, device))
    load_after = os.getloadavg()
    median = {name: statistics.median(values) for name, values in samples.items()}
    parts = median["upstream"] + median["student_ce_step"] + median["isrd"]
    # ratios per repeat too (each repeat's variants ran back to back), and their median
    step_over_parts = statistics.median(
        t / (u + s + i) for t, u, s, i in zip(samples["tas_step"], samples["upstream"], samples["student_ce_step"],
                                              samples["isrd"], strict=True))
    step_over_plain = statistics.median(
        t / p for t, p in zip(samples["tas_step"], samples["plain_timm_step"], strict=True))
    print(f"student {args.student} @ {args.resolution}px, upstream (assistant) @ {args.teacher_resolution}px, "
          f"batch {args.batch_size}, isrd {args.isrd}, device {device}, "
          f"channels_last {args.channels_last}, threads {args.threads}, "
          f"{args.repeats} repeats x {args.steps} steps; "
          f"load average before {load_before[0]:.2f} after {load_after[0]:.2f}")
    print(f"{'variant':<28}{'median ms/step':>16}{'min':>10}{'max':>10}")
    for name, values in samples.items():
        print(f"{name:<28}{median[name] * 1e3:>16.2f}{min(values) * 1e3:>10.2f}{max(values) * 1e3:>10.2f}")
    print(f"{'sum of parts':<28}{parts * 1e3:>16.2f}")
    print(f"step / sum of parts: {median['tas_step'] / parts:.3f} (median of per-repeat ratios {step_over_parts:.3f}); "
          f"GPU target ≤ 1.15{' (CPU: reported only)' if device.type == 'cpu' else ''}")
    print(f"step / plain timm step: {median['tas_step'] / median['plain_timm_step']:.3f} "
          f"(median of per-repeat ratios {step_over_plain:.3f})")
    if args.compile_upstream:
        compiled_over_eager = statistics.median(
            c / t for c, t in zip(samples["tas_step_compiled_upstream"], samples["tas_step"], strict=True))
        print(f"compiled upstream: first call (compilation) {args.compile_seconds:.1f} s; "
              f"upstream compiled / eager {median['upstream_compiled'] / median['upstream']:.3f}; "
              f"TAS step with it / TAS step {median['tas_step_compiled_upstream'] / median['tas_step']:.3f} "
              f"(median of per-repeat ratios {compiled_over_eager:.3f})")
    if args.out:
        args.out.write_text(json.dumps({"settings": vars(args) | {"out": str(args.out)}, "samples_s": samples,
                                        "load_before": load_before, "load_after": load_after,
                                        "python": platform.python_version(), "torch": torch.__version__}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
