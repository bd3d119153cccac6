"""Did distillation pay across a search-quality table (bench/search_table.py)? Every point of such a table
holds, per training seed, the student's val_top1 and its cross-entropy control's (the same architecture,
side, data, epochs and seed trained on labels alone, `search.ce_control`). This groups the points by their
distillation setting (every parameter named `distill.*`), pairs each student with its control, and prints per
setting: the mean gain over the students (a student's gain is its mean over seeds), the 95 % interval
(Student's t over the students), how many students gained, and the mean gain at each student side.

    PYTHONPATH=. python bench/table_gain.py docs/results/<date>/search_quality_table_flowers128.json [...]

A setting with both weights 0 is cross-entropy itself (its gain is 0 up to the control's own noise).
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench.distillation import paired_interval
from bench.search_table import SearchTable, read_table

__all__ = ["gains", "main", "report"]

SIDE = "student.resolution"


def gains(table: SearchTable) -> dict[str, dict[str, Any]]:
    """Per distillation setting (its `distill.*` values as JSON): each student's mean gain over seeds, by
    student (the other parameters as JSON), and the summary over students."""
    if not table.has_controls:
        raise SystemExit("this table has no CE controls (build it with search.ce_control: true)")
    by_setting: dict[str, dict[str, float]] = defaultdict(dict)
    sides: dict[str, int] = {}
    for point in table.points:
        setting = json.dumps({k: v for k, v in point.params.items() if k.startswith("distill.")}, sort_keys=True)
        student = json.dumps({k: v for k, v in point.params.items() if not k.startswith("distill.")}, sort_keys=True)
        deltas = [top1 - ce for top1, ce in zip(point.val_top1, point.ce_val_top1, strict=True)]
        by_setting[setting][student] = statistics.fmean(deltas)
        sides[student] = point.params.get(SIDE, 0)
    found = {}
    for setting, per_student in by_setting.items():
        mean, low, high = paired_interval(list(per_student.values()))
        by_side: dict[int, list[float]] = defaultdict(list)
        for student, gain in per_student.items():
            by_side[sides[student]].append(gain)
        found[setting] = {"students": per_student, "mean": mean, "low": low, "high": high,
                          "gained": sum(gain > 0 for gain in per_student.values()),
                          "by_side": {side: statistics.fmean(values) for side, values in sorted(by_side.items())}}
    return found


def report(table: SearchTable, name: str) -> str:
    found = gains(table)
    sides = sorted({side for row in found.values() for side in row["by_side"]})
    shared = ", ".join(f"{stage['stage']} {stage['arch']}@{stage['resolution']} {stage['val_top1']:.3f}"
                       for stage in table.shared.get("stages", {}).values())
    lines = [f"{name}: gain_vs_ce over {len(next(iter(found.values()))['students'])} students "
             f"× {len(table.seeds)} seeds (seeds {table.seeds}); shared stages (val_top1): {shared}",
             "", "| setting | mean gain | 95 % interval | students gained | " + " | ".join(f"{s} px" for s in sides) + " |",
             "|---|---|---|---|" + "---|" * len(sides)]
    for setting, row in sorted(found.items(), key=lambda item: -item[1]["mean"]):
        interval = "n/a" if row["low"] != row["low"] else f"[{row['low']:+.3f}, {row['high']:+.3f}]"
        cells = " | ".join(f"{row['by_side'].get(s, float('nan')):+.3f}" for s in sides)
        lines.append(f"| {setting} | {row['mean']:+.3f} | {interval} | {row['gained']} / {len(row['students'])} | {cells} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    paths = [Path(p) for p in (sys.argv[1:] if argv is None else argv)]
    if not paths:
        print(__doc__)
        return 2
    print("\n\n".join(report(read_table(path), path.name) for path in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
