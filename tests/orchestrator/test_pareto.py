"""Pareto dominance, ranks, crowding and hypervolume (`orchestrator.results.pareto`): hand-made points
with ties, ±inf and NaN, against independent brute forces."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from orchestrator.results.pareto import (
    as_modes,
    crowding_distance,
    dominates,
    hypervolume,
    hypervolume_min,
    non_dominated_mask,
    nondominated_ranks,
    normalise,
)
from pxd.metrics import Mode

INF = math.inf
NAN = math.nan


# --- dominance -------------------------------------------------------------------------------


def brute_force_mask(points: np.ndarray) -> list[bool]:
    """Textbook definition, written independently: nobody is <= everywhere and < somewhere."""
    result = []
    for a in points:
        dominated = False
        for b in points:
            if all(bj <= aj for bj, aj in zip(b, a)) and any(bj < aj for bj, aj in zip(b, a)):
                dominated = True
        result.append(not dominated)
    return result


def inclusion_exclusion_hv(points_min: np.ndarray, reference: np.ndarray) -> float:
    """Union of boxes [p, reference] by inclusion-exclusion; exponential, only for tiny n."""
    inside = [p for p in points_min if np.all(p < reference)]
    total = 0.0
    for size in range(1, len(inside) + 1):
        for subset in itertools.combinations(inside, size):
            corner = np.max(subset, axis=0)
            total += (-1) ** (size + 1) * float(np.prod(reference - corner))
    return total


def test_simple_domination_and_ties() -> None:
    points = np.array([[1, 3], [2, 2], [3, 1], [3, 3], [2, 2], [1, 4]], dtype=float)
    # (3,3) is dominated by (2,2); the two (2,2) copies do not dominate each other;
    # (1,4) is equal to (1,3) on the first objective and worse on the second: dominated.
    assert non_dominated_mask(points).tolist() == [True, True, True, False, True, False]


def test_equal_on_one_objective_both_kept_when_they_trade_off() -> None:
    points = np.array([[1, 5, 2], [1, 4, 3]], dtype=float)
    assert non_dominated_mask(points).tolist() == [True, True]


def test_infinities_compare_as_extreme_values() -> None:
    points = np.array([[-INF, 5], [0, 0], [INF, -1], [INF, INF], [-INF, 5]], dtype=float)
    # (inf, inf) is dominated by everything; the two (-inf, 5) are identical and both kept.
    assert non_dominated_mask(points).tolist() == [True, True, True, False, True]


def test_nan_row_is_never_on_front_and_never_dominates() -> None:
    points = np.array([[NAN, 0], [1, 1], [0, NAN], [NAN, NAN]], dtype=float)
    assert non_dominated_mask(points).tolist() == [False, True, False, False]
    # (5, 5) would be dominated by (0, 0)-ish values hidden behind a NaN, but a NaN row never
    # dominates: (5, 5) stays on the front.
    assert non_dominated_mask(np.array([[0, NAN], [5, 5]])).tolist() == [False, True]


def test_empty_points() -> None:
    assert non_dominated_mask(np.zeros((0, 3))).tolist() == []


@pytest.mark.parametrize("n_objectives", [2, 3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force_on_random_points_with_ties(n_objectives: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    # Small integer grid so that ties and exact duplicates occur often.
    points = rng.integers(0, 6, size=(60, n_objectives)).astype(float)
    assert non_dominated_mask(points).tolist() == brute_force_mask(points)


def test_normalise_negates_max_only() -> None:
    normalised = normalise(np.array([[0.9, 2.0]]), ["max", "min"])
    assert normalised.tolist() == [[-0.9, 2.0]]


def test_unknown_mode_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="use 'min' or 'max'"):
        normalise(np.array([[1.0]]), ["maximise"])


def test_hypervolume_2d_staircase() -> None:
    # Union of [1,4]x[3,4], [2,4]x[2,4], [3,4]x[1,4]: 3 + 2 + 1 = 6 unit squares.
    points = np.array([[1, 3], [2, 2], [3, 1]], dtype=float)
    assert hypervolume(points, ["min", "min"], [4, 4]) == pytest.approx(6.0)


def test_hypervolume_3d_by_hand() -> None:
    # Boxes 3*3*1 = 9 and 1*1*3 = 3 overlap in [3,4]^3 = 1: 9 + 3 - 1 = 11.
    two = np.array([[1, 1, 3], [3, 3, 1]], dtype=float)
    assert hypervolume(two, ["min"] * 3, [4, 4, 4]) == pytest.approx(11.0)
    # The cube [1,3]^3 (volume 8) minus the corner [1,2]^3 that no point reaches: 7.
    three = np.array([[2, 1, 1], [1, 2, 1], [1, 1, 2]], dtype=float)
    assert hypervolume(three, ["min"] * 3, [3, 3, 3]) == pytest.approx(7.0)


def test_points_not_better_than_reference_contribute_nothing() -> None:
    base = np.array([[1, 3], [2, 2], [3, 1]], dtype=float)
    worse = np.array([[5, 0], [0, 4], [4, 4], [NAN, 0]], dtype=float)  # outside or on the border
    assert hypervolume(np.vstack([base, worse]), ["min", "min"], [4, 4]) == pytest.approx(6.0)
    assert hypervolume(worse, ["min", "min"], [4, 4]) == 0.0
    assert hypervolume(np.zeros((0, 2)), ["min", "min"], [4, 4]) == 0.0


def test_infinitely_good_point_gives_infinite_hypervolume() -> None:
    assert hypervolume(np.array([[-INF, 1.0]]), ["min", "min"], [4, 4]) == INF
    assert hypervolume(np.array([[INF, 0.5]]), ["max", "min"], [0.0, 1.0]) == INF
    # An infinitely BAD value is simply outside the reference box.
    assert hypervolume(np.array([[INF, 1.0], [1, 3]]), ["min", "min"], [4, 4]) == pytest.approx(3)


def test_dominated_and_duplicate_points_do_not_change_hypervolume() -> None:
    base = np.array([[1, 1, 3], [3, 3, 1]], dtype=float)
    extra = np.array([[1, 1, 3], [3.5, 3.5, 3.5], [2, 2, 3]], dtype=float)
    assert hypervolume(np.vstack([base, extra]), ["min"] * 3, [4, 4, 4]) == pytest.approx(11.0)


@pytest.mark.parametrize("n_objectives", [2, 3, 4])
def test_hypervolume_matches_inclusion_exclusion(n_objectives: int) -> None:
    rng = np.random.default_rng(n_objectives)
    for _ in range(5):
        points = rng.uniform(0, 1, size=(7, n_objectives))
        reference = np.full(n_objectives, 0.9)  # some points fall outside the reference box
        expected = inclusion_exclusion_hv(points, reference)
        assert hypervolume(points, ["min"] * n_objectives, reference) == pytest.approx(expected)


def _hso_reference(points: np.ndarray, reference: np.ndarray) -> float:
    """pxd's previous exact hypervolume (HSO slicing, While et al. 2006), kept as the test oracle."""
    if len(points) == 0:
        return 0.0
    if points.shape[1] == 1:
        return float(reference[0] - points[:, 0].min())
    if points.shape[1] == 2:
        order = np.argsort(points[:, 0], kind="stable")
        xs = points[order, 0]
        best_y = np.minimum.accumulate(points[order, 1])
        widths = np.diff(np.append(xs, reference[0]))
        return float(np.sum(widths * (reference[1] - best_y)))
    points = np.unique(points, axis=0)
    keep = [not any(np.all(q <= p) and np.any(q < p) for q in points) for p in points]
    points = points[np.array(keep)]
    points = points[np.argsort(points[:, -1], kind="stable")]
    cuts = np.append(points[:, -1], reference[-1])
    return sum((cuts[i + 1] - cuts[i]) * _hso_reference(points[: i + 1, :-1], reference[:-1])
               for i in range(len(points)) if cuts[i + 1] > cuts[i])


def _brute_mask(points: np.ndarray) -> np.ndarray:
    return np.array([not any(np.all(q <= p) and np.any(q < p) for q in points) for p in points])


@pytest.mark.parametrize("k", [2, 3, 4])
def test_optuna_routines_agree_with_the_previous_exact_implementation(k):
    rng = np.random.default_rng(k)
    for _ in range(20):
        points = rng.integers(0, 6, size=(int(rng.integers(1, 40)), k)).astype(float)  # many ties
        assert np.array_equal(non_dominated_mask(points), _brute_mask(points))
        reference = np.full(k, 6.0)
        assert hypervolume(points, ["min"] * k, reference) == pytest.approx(_hso_reference(points, reference))



# --- modes, dominance of single points, ranks and crowding --------------------------------------


def test_modes_are_checked_and_become_the_registry_enum() -> None:
    assert as_modes(["max", "min", Mode.MIN]) == [Mode.MAX, Mode.MIN, Mode.MIN]
    with pytest.raises(ValueError, match=r"objectives\[1\].mode: got 'minimise'"):
        as_modes(["max", "minimise"])


def test_dominates_one_point_and_a_front_against_a_point() -> None:
    assert dominates([1, 2], [1, 3]) and not dominates([1, 3], [1, 3]) and not dominates([0, 4], [1, 3])
    assert not dominates([NAN, 0], [1, 1]) and not dominates([1, 1], [NAN, 2])  # NaN is not a value
    front = np.array([[1, 3], [2, 2], [0, 5]], dtype=float)
    assert dominates(front, [2, 3]).tolist() == [True, True, False]
    assert dominates([1, 2], front).tolist() == [True, True, False]


def test_ranks_peel_fronts_and_ties_share_a_rank() -> None:
    # minimise both: (1, 3) and (2, 1) are the front, (2, 3) is dominated by both, (3, 4) by all
    assert nondominated_ranks([(1, 3), (2, 1), (2, 3), (3, 4)]) == [0, 0, 1, 2]
    assert nondominated_ranks([(2, 2), (2, 2), (3, 3)]) == [0, 0, 1]
    assert nondominated_ranks([(-INF, 5), (0, 0), (INF, INF)]) == [0, 0, 1]
    assert nondominated_ranks([]) == []


def test_a_point_with_nan_ranks_last() -> None:
    assert nondominated_ranks([(NAN, 0), (1, 1), (2, 2)]) == [2, 0, 1]
    assert nondominated_ranks([(NAN, NAN)]) == [0]


@pytest.mark.parametrize("seed", [0, 1])
def test_ranks_match_the_definition_on_random_points_with_ties(seed: int) -> None:
    points = np.random.default_rng(seed).integers(0, 5, size=(40, 2)).astype(float)
    ranks = nondominated_ranks(points)
    for i, point in enumerate(points):
        dominating = [ranks[j] for j, other in enumerate(points) if dominates(other, point)]
        # rank = 1 + the highest rank among the points that dominate it (0 when none does)
        assert ranks[i] == (max(dominating) + 1 if dominating else 0)


def test_crowding_distance_gives_extremes_inf_and_interior_points_their_neighbours_gap() -> None:
    # (1, 2): neighbours 0 and 3 on x, 1 and 4 on y, each over a range of 4; (3, 1): 1 and 4 on x, 0 and 2 on y
    assert crowding_distance([(0, 4), (1, 2), (3, 1), (4, 0)]) == [INF, 3 / 4 + 3 / 4, 3 / 4 + 2 / 4, INF]
    assert crowding_distance([(0, 1), (1, 0)]) == [INF, INF]
    assert crowding_distance([(1, 1), (1, 1), (1, 1)])[1] == 0.0  # no spread on either axis


def test_hypervolume_min_counts_only_points_inside_the_reference_box() -> None:
    assert hypervolume_min(np.array([[1, 3], [2, 2], [3, 1], [5, 0]], dtype=float), [4, 4]) == pytest.approx(6.0)
    assert hypervolume_min(np.zeros((0, 2)), [4, 4]) == 0.0
    assert hypervolume_min(np.array([[1.0]]), [3.0]) == 2.0
