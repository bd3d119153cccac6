"""Cost of one live frontier + hypervolume update per completed trial, at 100, 1,000 and 5,000 trials.

Side by side in one run, 3 objectives (val_top1 max, gmacs min, pixels min), realistic values:
- `from scratch`: what pxd did before incremental updates: on every completion, recompute the frontier table over
  all trials with an O(n² k) dominance loop and HSO hypervolume slicing (copied below as `_legacy_*`);
- `incremental`: `orchestrator.results.frontier.IncrementalFrontier.add` (one dominance check against the
  current front, Optuna's exact hypervolume of the front when it changes);
- `table (Optuna)`: today's `frontier_table` recomputed from scratch, for reference (run once at the end
  of a sweep).

    python bench/frontier_updates.py [--sizes 100 1000 5000] [--updates 20]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np

from orchestrator.results.frontier import IncrementalFrontier, TrialRow, frontier_table

OBJECTIVES = [("val_top1", "max"), ("gmacs", "min"), ("pixels", "min")]
REFERENCE = {"val_top1": 0.0, "gmacs": 2.0, "pixels": 50176.0}
IDEAL = {"val_top1": 1.0, "gmacs": 0.0, "pixels": 0.0}


def _metrics(rng: np.random.Generator, count: int) -> list[dict[str, float]]:
    sides = rng.choice([16, 24, 32, 48, 56, 64, 84, 96, 112, 128, 160, 192, 224], size=count)
    gmacs = rng.uniform(0.01, 1.8, size=count)
    # accuracy grows with pixels and compute, plus noise: a front of realistic size
    top1 = np.clip(0.3 + 0.25 * np.log1p(sides / 16) / np.log(15) + 0.2 * gmacs / 1.8 + rng.normal(0, 0.05, count), 0, 1)
    return [{"val_top1": float(a), "gmacs": float(g), "pixels": float(s * s)} for a, g, s in zip(top1, gmacs, sides)]


def _legacy_mask(points: np.ndarray) -> np.ndarray:
    mask = np.ones(len(points), dtype=bool)
    for index, point in enumerate(points):
        mask[index] = not np.any(np.all(points <= point, axis=1) & np.any(points < point, axis=1))
    return mask


def _legacy_hv(points: np.ndarray, reference: np.ndarray) -> float:
    if len(points) == 0:
        return 0.0
    if points.shape[1] == 2:
        order = np.argsort(points[:, 0], kind="stable")
        widths = np.diff(np.append(points[order, 0], reference[0]))
        return float(np.sum(widths * (reference[1] - np.minimum.accumulate(points[order, 1]))))
    points = np.unique(points, axis=0)
    points = points[_legacy_mask(points)]
    points = points[np.argsort(points[:, -1], kind="stable")]
    cuts = np.append(points[:, -1], reference[-1])
    return sum((cuts[i + 1] - cuts[i]) * _legacy_hv(points[: i + 1, :-1], reference[:-1])
               for i in range(len(points)) if cuts[i + 1] > cuts[i])


def _legacy_update(metrics: list[dict[str, float]]) -> float:
    signs = np.array([-1.0, 1.0, 1.0])
    points = np.array([[m["val_top1"], m["gmacs"], m["pixels"]] for m in metrics]) * signs
    reference = np.array([REFERENCE["val_top1"], REFERENCE["gmacs"], REFERENCE["pixels"]]) * signs
    _legacy_mask(points)
    inside = points[np.all(points < reference, axis=1)]
    return _legacy_hv(inside, reference)


def _timed(function, *args) -> float:
    start = time.perf_counter()
    function(*args)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 5000])
    parser.add_argument("--updates", type=int, default=20, help="updates timed at each size (median reported)")
    args = parser.parse_args()
    print(f"# {platform.processor() or platform.machine()}, python {platform.python_version()}")
    print(f"{'trials':>7} {'from scratch ms':>16} {'incremental ms':>15} {'incr. worst ms':>15} {'ratio':>8} "
          f"{'table (Optuna) ms':>18} {'front':>6} {'hv agree':>9}")
    rng = np.random.default_rng(0)
    for size in args.sizes:
        metrics = _metrics(rng, size)
        live = IncrementalFrontier(OBJECTIVES, REFERENCE, IDEAL)
        incremental, worst = [], 0.0
        for index, point in enumerate(metrics):
            duration = _timed(live.add, point)
            worst = max(worst, duration)  # over the whole sweep: the updates that change the front
            if index >= size - args.updates:
                incremental.append(duration)
        legacy_updates = min(args.updates, 3 if size >= 5000 else args.updates)
        legacy = [_timed(_legacy_update, metrics[: size - k]) for k in range(legacy_updates)]
        rows = [TrialRow(str(i), None, m, {}, "COMPLETE") for i, m in enumerate(metrics)]
        table_s = _timed(frontier_table, rows, OBJECTIVES, REFERENCE, IDEAL)
        table = frontier_table(rows, OBJECTIVES, REFERENCE, IDEAL)
        agree = abs(table["hypervolume"] - live.hypervolume) <= 1e-9 * max(1.0, abs(table["hypervolume"]))
        agree = agree and abs(_legacy_update(metrics) - live.hypervolume) <= 1e-6 * max(1.0, live.hypervolume)
        old_ms, new_ms = statistics.median(legacy) * 1e3, statistics.median(incremental) * 1e3
        print(f"{size:>7} {old_ms:>16.2f} {new_ms:>15.3f} {worst * 1e3:>15.2f} {old_ms / new_ms:>7.0f}× "
              f"{table_s * 1e3:>18.1f} {live.size:>6} {str(agree):>9}")


if __name__ == "__main__":
    main()
