"""Pareto dominance, fronts, ranks and hypervolume: the one implementation that the frontier
(`orchestrator.results.frontier`), early stopping (`orchestrator.driver.early_stopping`) and `pxd select`
(through the frontier table) use.

As in Optuna (``optuna/study/_multi_objective.py``), every objective is first normalised to
minimisation (`normalise`: "max" columns negated); everything else here takes such minimisation
points. A point holding NaN is not a value: it is never on a front, never dominates another point and
adds no hypervolume. ±inf compare as ordinary extreme values. Identical points do not dominate each
other, so every copy of a non-dominated point is on the front.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from pxd.metrics import MODES, Mode

__all__ = [
    "as_modes",
    "normalise",
    "dominates",
    "non_dominated_mask",
    "nondominated_ranks",
    "crowding_distance",
    "hypervolume_min",
    "hypervolume",
]

Points = Sequence[Sequence[float]] | np.ndarray


def as_modes(modes: Sequence[str]) -> list[Mode]:
    """`modes` as `Mode`s; ValueError naming the first that is neither "min" nor "max"."""
    for index, mode in enumerate(modes):
        if mode not in MODES:
            raise ValueError(f"objectives[{index}].mode: got {mode!r}; use 'min' or 'max'")
    return [Mode(mode) for mode in modes]


def normalise(points: Points, modes: Sequence[str]) -> np.ndarray:
    """A float copy of ``points`` [n, k] with every objective turned into minimisation."""
    signs = np.array([mode.sign for mode in as_modes(modes)])
    array = np.array(points, dtype=float, ndmin=2)
    if array.shape[1] != len(signs):
        raise ValueError(f"points have {array.shape[1]} columns but {len(signs)} modes")
    return array * signs


def dominates(a: Points, b: Points) -> np.ndarray:
    """Whether minimisation point ``a`` dominates ``b``: no worse on every objective, better on one.
    Broadcasts over leading axes: a front [n, k] against one point [k] answers for each of the n."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return np.all(a <= b, axis=-1) & np.any(a < b, axis=-1)


def non_dominated_mask(points_min: Points) -> np.ndarray:
    """Boolean mask of the rows of ``points_min`` [n, k] that no other row dominates.

    Optuna's own routine (``optuna.study._multi_objective._is_pareto_front``, O(n log n) in 2-D).
    A row holding any NaN is never on the front and never dominates another row.
    """
    from optuna.study._multi_objective import _is_pareto_front  # optuna: imported on first use (start-up cost)

    points = np.array(points_min, dtype=float, ndmin=2)
    if points.ndim != 2:
        raise ValueError(f"points must be a 2-D array [n, k], got shape {points.shape}")
    valid = ~np.isnan(points).any(axis=1)
    mask = np.zeros(len(points), dtype=bool)
    if valid.any():
        mask[valid] = _is_pareto_front(points[valid], assume_unique_lexsorted=False)
    return mask


def nondominated_ranks(points_min: Points) -> list[int]:
    """Pareto rank of each minimisation point, NSGA-II's non-dominated sorting: 0 for the non-dominated
    points, 1 for those that only rank-0 points dominate, and so on. Points holding NaN rank last."""
    if len(points_min) == 0:
        return []
    points = np.array(points_min, dtype=float, ndmin=2)
    ranks = np.zeros(len(points), dtype=int)
    remaining = np.arange(len(points))
    rank = 0
    while remaining.size:
        front = non_dominated_mask(points[remaining])
        if not front.any():  # only NaN points are left
            break
        ranks[remaining[front]] = rank
        remaining = remaining[~front]
        rank += 1
    ranks[remaining] = rank
    return ranks.tolist()


def crowding_distance(points_min: Points) -> list[float]:
    """NSGA-II's crowding distance of each point of one front: per objective, the gap between its two
    neighbours over the front's range, summed; the extremes (and every point of a front of two) get inf."""
    points = [list(map(float, point)) for point in points_min]
    if len(points) <= 2:
        return [math.inf] * len(points)
    distance = [0.0] * len(points)
    for axis in range(len(points[0])):
        ordered = sorted(range(len(points)), key=lambda i: points[i][axis])
        low, high = points[ordered[0]][axis], points[ordered[-1]][axis]
        distance[ordered[0]] = distance[ordered[-1]] = math.inf
        if high == low:
            continue
        for before, current, after in zip(ordered, ordered[1:], ordered[2:]):
            distance[current] += (points[after][axis] - points[before][axis]) / (high - low)
    return distance


def hypervolume_min(points_min: Points, reference_min: Sequence[float]) -> float:
    """Exact hypervolume of minimisation points, bounded by the finite ``reference_min``: the volume
    some point dominates and that dominates the reference. Only points strictly better than the
    reference on every objective count (a NaN point never is); one infinitely good there gives inf.
    Optuna's routine (``optuna._hypervolume.compute_hypervolume``: 2-D sweep, 3-D and WFG above)."""
    from optuna._hypervolume import compute_hypervolume  # optuna: imported on first use (start-up cost)

    reference = np.asarray(reference_min, dtype=float)
    points = np.asarray(points_min, dtype=float).reshape(-1, len(reference))
    inside = points[np.all(points < reference, axis=1)]
    if np.isinf(inside).any():
        return math.inf
    if len(inside) == 0:
        return 0.0
    if inside.shape[1] == 1:
        return float(reference[0] - inside[:, 0].min())
    return float(compute_hypervolume(inside, reference))


def hypervolume(points: Points, modes: Sequence[str], reference: Sequence[float]) -> float:
    """Hypervolume dominated by ``points`` [n, k] and bounded by ``reference``, both in the ORIGINAL
    metric units (e.g. val_top1 in [0, 1], gmacs, pixels): normalised with ``modes`` first, then
    `hypervolume_min`. Exact for any k; intended for n up to a few hundred."""
    reference_min = normalise(np.asarray(reference, dtype=float).reshape(1, -1), modes)[0]
    if not np.all(np.isfinite(reference_min)):
        raise ValueError(f"reference_point: every value must be finite, got {list(reference)}")
    points_min = normalise(np.array(points, dtype=float).reshape(-1, len(modes)), modes)
    return hypervolume_min(points_min, reference_min)
