"""Data cache benchmark: decoding per trial (pxd before its on-disk cache) against the shared on-disk cache.

    python bench/data_cache.py [--images 20000] [--size 64] [--datasets ../shared/datasets/flowers128 ...]

For a generated ImageFolder (seeded 64×64 JPEGs in a temporary folder) and each real dataset given
(skipped when absent), every measurement runs in fresh processes and prints side by side:
- data set-up time of one trial: decoding into memory as before, the first trial (builds the cache)
  and a later trial (maps it);
- peak resident memory: one trial's growth while setting up, and per process with 2 concurrent trials
  that each read every image once (before: private copies; cache: shared mapped pages, whose
  proportional share PSS is also shown);
- training-loop throughput (images/s) through `iterate_batches` + `TwoViewSampler` (loader only, and
  with a forward/backward of a tiny CNN) reading the mapped cache against in-memory tensors.
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MIB = 1024**2


# ---------------------------------------------------------------------------------------------
# worker side: one measurement per fresh process, reported as one JSON line


def memory() -> dict[str, float]:
    """Resident memory of this process in MiB: peak (VmHWM), now (VmRSS), private (RssAnon),
    mapped file pages (RssFile) and the proportional share of shared pages (Pss)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            fields[name] = int(value.split()[0]) / 1024
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            fields["Pss"] = int(line.split()[1]) / 1024
    return fields


def legacy_load(root: Path, size: int) -> tuple:
    """pxd's ImageFolder loading before the shared cache (pxd/data/folder.py at 3f4e749), for comparison:
    every trial decodes every image into a list of arrays, stacks them, then makes the NCHW copy."""
    import torch

    from pxd.data.folder import _class_folders, decode_image, image_files

    classes = _class_folders(root / "train")
    splits = []
    for split in ("train", "val"):
        items = [(root / path, label) for label, name in enumerate(classes) for path in image_files(root, f"{split}/{name}")]
        workers = max(1, min(8, os.cpu_count() or 1))
        with ThreadPoolExecutor(max_workers=workers) as pool:  # HWC arrays, as PIL gave them
            arrays = list(pool.map(lambda item: decode_image(item[0], size).transpose(1, 2, 0), items))
        images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
        splits.append((images, torch.tensor([label for _, label in items])))
    return splits


def wait_for_peers(folder: Path | None, name: str, count: int) -> None:
    if folder is None:
        return
    (folder / name).touch()
    deadline = time.time() + 600
    while len([p for p in folder.iterdir() if p.name.startswith(name.split("-")[0])]) < count and time.time() < deadline:
        time.sleep(0.02)


def touch_all(split_tensors: list) -> int:
    """Read every image once (as an epoch does), so its pages are resident; a uint8 reduction
    allocates nothing, so what grows is the data itself."""
    total = 0
    for images in split_tensors:
        for start in range(0, images.shape[0], 256):
            total += int(images[start : start + 256].max())
    return total


def worker(args: argparse.Namespace) -> dict:
    import torch

    from pxd.config import DatasetConfig
    from pxd.data import load_dataset

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    barrier = Path(args.barrier) if args.barrier else None
    wait_for_peers(barrier, f"start-{os.getpid()}", args.peers)
    before = memory()
    started = time.perf_counter()
    if args.worker == "legacy":
        tensors = [images for images, _ in legacy_load(Path(args.path), args.size)]
    else:
        cfg = DatasetConfig(kind="imagefolder", path=args.path, image_size=args.size, cache_dir=args.cache)
        data = load_dataset(cfg, 0, progress=False)
        tensors = [data.train.images, data.val.images]
    setup_s = time.perf_counter() - started
    after_setup = memory()
    result = {"setup_s": setup_s, "before": before, "rss_before": before["VmRSS"], "hwm_setup": after_setup["VmHWM"],
              "images": sum(t.shape[0] for t in tensors), "decoded_mib": sum(t.numel() for t in tensors) / MIB}
    if args.touch:
        touch_all(tensors)
        wait_for_peers(barrier, f"done-{os.getpid()}", args.peers)  # both processes hold their data now
        result["after_touch"] = memory()
    if args.worker == "throughput":
        result.update(throughput(data, args))
    return result


def throughput(data, args: argparse.Namespace) -> dict:
    """images/s over the same batches, from the mapped cache and from an in-memory copy."""
    import torch
    from torch import nn

    from pxd.data import TwoViewSampler, iterate_batches
    from pxd.types import ImageSet

    mapped = data.train
    in_memory = ImageSet(mapped.images.clone(), mapped.labels.clone())
    sampler = TwoViewSampler(args.size, max(8, args.size // 2), train=True)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, int(mapped.labels.max()) + 1),
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    def run(images: ImageSet, train_step: bool) -> float:
        generator = torch.Generator().manual_seed(0)
        count, started = 0, None
        for step, (batch, labels) in enumerate(iterate_batches(images, args.batch_size, shuffle=True, generator=generator)):
            if step == 3:
                count, started = 0, time.perf_counter()  # after a short warm-up
            if step == args.batches + 3:
                break
            _, student = sampler(batch, generator)
            if train_step:
                loss = nn.functional.cross_entropy(model(student), labels)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            count += batch.shape[0]
        return count / (time.perf_counter() - started)

    results: dict[str, list[float]] = {}
    for repeat in range(2):  # alternate, so neither side always runs first
        for name, images in (("memory", in_memory), ("cache", mapped)):
            for train_step in (False, True):
                key = f"{name}_{'train' if train_step else 'loader'}_ips"
                results.setdefault(key, []).append(run(images, train_step))
    return {key: max(values) for key, values in results.items()}


# ---------------------------------------------------------------------------------------------
# driver side


def generate(root: Path, images: int, size: int, classes: int, seed: int) -> float:
    """A seeded ImageFolder of `images` JPEGs (80 % train/, 20 % val/): smooth colour fields + noise."""
    from PIL import Image

    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    per_class = images // classes
    for label in range(classes):
        hue = rng.integers(0, 256, 3)
        for index in range(per_class):
            split = "train" if index < per_class * 4 // 5 else "val"
            folder = root / split / f"class_{label:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            coarse = (rng.integers(0, 128, (6, 6, 3)) + hue // 2).astype(np.uint8)
            field = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC), dtype=np.int16)
            pixels = np.clip(field + rng.integers(-12, 13, field.shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{index:05d}.jpg", quality=90)
    return time.perf_counter() - started


def spawn(mode: str, path: Path, size: int, cache: Path, *, touch: bool = False, barrier: Path | None = None,
          peers: int = 1, extra: list[str] | None = None) -> subprocess.Popen:
    command = [sys.executable, __file__, "--worker", mode, "--path", str(path), "--size", str(size),
               "--cache", str(cache), "--peers", str(peers), *(extra or [])]
    if touch:
        command.append("--touch")
    if barrier is not None:
        command += ["--barrier", str(barrier)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def collect(process: subprocess.Popen) -> dict:
    out, err = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"worker failed ({process.returncode}):\n{err}")
    return json.loads(out.strip().splitlines()[-1])


def one(mode: str, path: Path, size: int, cache: Path, **kwargs) -> dict:
    return collect(spawn(mode, path, size, cache, **kwargs))


def concurrent(mode: str, path: Path, size: int, cache: Path, scratch: Path) -> list[dict]:
    barrier = Path(tempfile.mkdtemp(dir=scratch, prefix="barrier-"))
    processes = [spawn(mode, path, size, cache, touch=True, barrier=barrier, peers=2) for _ in range(2)]
    return [collect(process) for process in processes]


def measure(name: str, path: Path, size: int, scratch: Path, args: argparse.Namespace) -> dict:
    cache = scratch / f"cache-{name}"
    print(f"[bench] {name}: before (decode in memory) ...", file=sys.stderr, flush=True)
    legacy = one("legacy", path, size, cache)
    print(f"[bench] {name}: first trial (builds the cache) ...", file=sys.stderr, flush=True)
    cold = one("cache", path, size, cache)
    print(f"[bench] {name}: later trial (maps the cache) ...", file=sys.stderr, flush=True)
    warm = one("cache", path, size, cache)
    print(f"[bench] {name}: 2 concurrent trials, before and with the cache ...", file=sys.stderr, flush=True)
    legacy_pair = concurrent("legacy", path, size, cache, scratch)
    cache_pair = concurrent("cache", path, size, cache, scratch)
    print(f"[bench] {name}: throughput ...", file=sys.stderr, flush=True)
    speed = one("throughput", path, size, cache, extra=["--batches", str(args.batches), "--batch-size", str(args.batch_size)])
    return {"name": name, "size": size, "legacy": legacy, "cold": cold, "warm": warm,
            "legacy_pair": legacy_pair, "cache_pair": cache_pair, "speed": speed}


def table(results: list[dict]) -> str:
    def row(label: str, cell) -> str:
        return f"{label:<52}" + "".join(f"{cell(r):>16}" for r in results)

    mib = lambda value: f"{value:,.0f} MiB"  # noqa: E731

    def growth(pair: list[dict], key: str, since: str | None = None) -> float:
        """The larger of the two processes' growth of `key` since just before loading the data."""
        return max(p["after_touch"][key] - p["before"][since or key] for p in pair)

    lines = [
        row("dataset", lambda r: r["name"]),
        row("images (train+val) @ stored px", lambda r: f"{r['cold']['images']:,} @ {r['size']}"),
        row("decoded size", lambda r: mib(r["cold"]["decoded_mib"])),
        row("set-up, before: decode into memory (every trial)", lambda r: f"{r['legacy']['setup_s']:.2f} s"),
        row("set-up, first trial: hash + decode into cache", lambda r: f"{r['cold']['setup_s']:.2f} s"),
        row("set-up, later trial: map the cache", lambda r: f"{r['warm']['setup_s']:.3f} s"),
        row("peak RSS growth in set-up, before", lambda r: mib(r["legacy"]["hwm_setup"] - r["legacy"]["rss_before"])),
        row("peak RSS growth in set-up, first trial (build)", lambda r: mib(r["cold"]["hwm_setup"] - r["cold"]["rss_before"])),
        row("  build growth / decoded size", lambda r: f"{(r['cold']['hwm_setup'] - r['cold']['rss_before']) / r['cold']['decoded_mib']:.2f}x"),
        row("peak RSS growth in set-up, later trial (map)", lambda r: mib(r["warm"]["hwm_setup"] - r["warm"]["rss_before"])),
        row("2 concurrent trials, each reads every image once:", lambda r: ""),
        row("  before: peak RSS growth/process", lambda r: mib(growth(r["legacy_pair"], "VmHWM", "VmRSS"))),
        row("  before: private memory growth/process", lambda r: mib(growth(r["legacy_pair"], "RssAnon"))),
        row("  before: PSS growth/process", lambda r: mib(growth(r["legacy_pair"], "Pss"))),
        row("  cache: peak RSS growth/process", lambda r: mib(growth(r["cache_pair"], "VmHWM", "VmRSS"))),
        row("  cache: private memory growth/process", lambda r: mib(growth(r["cache_pair"], "RssAnon"))),
        row("  cache: shared mapped pages growth/process", lambda r: mib(growth(r["cache_pair"], "RssFile"))),
        row("  cache: PSS growth/process (shared pages / 2)", lambda r: mib(growth(r["cache_pair"], "Pss"))),
        row("process baseline before loading (torch imported)", lambda r: mib(r["warm"]["rss_before"])),
        row("loader img/s: in-memory tensors", lambda r: f"{r['speed']['memory_loader_ips']:,.0f}"),
        row("loader img/s: mapped cache", lambda r: f"{r['speed']['cache_loader_ips']:,.0f}"),
        row("train step img/s: in-memory tensors", lambda r: f"{r['speed']['memory_train_ips']:,.0f}"),
        row("train step img/s: mapped cache", lambda r: f"{r['speed']['cache_train_ips']:,.0f}"),
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20000, help="generated ImageFolder size (train + val)")
    parser.add_argument("--size", type=int, default=64, help="generated image side, also the stored size")
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--datasets", nargs="*", default=["../shared/datasets/flowers128:128", "../shared/datasets/eurosat64:64"],
                        help="real ImageFolder trees as PATH:STORED_SIZE (skipped when absent)")
    parser.add_argument("--batches", type=int, default=30, help="timed batches per throughput run")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=None, help="write every number as JSON")
    # worker options (internal)
    parser.add_argument("--worker", choices=["legacy", "cache", "throughput"], help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--touch", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--barrier", help=argparse.SUPPRESS)
    parser.add_argument("--peers", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    scratch = Path(tempfile.mkdtemp(prefix="pxd-data-bench-", dir=args.workdir))
    try:
        generated = scratch / f"generated-{args.images}"
        print(f"[bench] generating {args.images} JPEGs at {args.size}px in {generated} ...", file=sys.stderr, flush=True)
        generate_s = generate(generated, args.images, args.size, args.classes, seed=0)
        print(f"[bench] generated in {generate_s:.1f} s", file=sys.stderr, flush=True)
        results = [measure(f"generated-{args.images // 1000}k", generated, args.size, scratch, args)]
        for spec in args.datasets:
            location, _, size = spec.rpartition(":")
            path = (REPO / location).resolve()
            if not path.is_dir():
                print(f"[bench] {path} is absent: skipped", file=sys.stderr, flush=True)
                continue
            results.append(measure(path.name, path, int(size), scratch, args))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs; "
          f"generated set written in {generate_s:.1f} s; the OS page cache held the JPEGs in every run")
    print(table(results))
    if args.out:
        args.out.write_text(json.dumps({"generate_s": generate_s, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
