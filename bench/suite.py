"""The benchmark suite, one command: every part as its own process, their summaries side by side.

    PYTHONPATH=. python bench/suite.py                          # every part
    PYTHONPATH=. python bench/suite.py --parts search stage_reuse
    PYTHONPATH=. python bench/suite.py --args "overhead=--trials 8"

Parts (each a script in bench/, run with `PYTHONPATH=.` from the repository root so this checkout's
code is measured): `search` (2a search quality, 2b early stopping replayed), `stage_reuse` (2c; 12 trials of
the quickstart's 3 student architectures), `training_step` (2d), `overhead` (2e; `--compare`: cuts off,
fresh worker processes per trial, kept processes with the cuts off, the shipped default), `early_stopping`
(2b in three live sweeps: none, keep_front, classic MO-ASHA), `gpu_packing` (4; only where CUDA is available, else
skipped with a message). A part whose script is absent is skipped with a message. Each
part prints its progress on stderr (shown live) and its summary on stdout (collected); a script that
takes `--out` writes its JSON into `--out-dir`, with `suite.json` (every part's command, exit status,
wall time and summary). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Part:
    script: str  # relative to the repository root
    items: str  # which targets the part measures
    needs_gpu: bool = False  # skipped with a message where CUDA is not available
    # outputs besides --out, relative to the output folder
    outputs: dict[str, str] = field(default_factory=dict)
    # arguments the item needs (before --args, which may override them)
    defaults: tuple[str, ...] = ()


PARTS = {
    "search": Part("bench/search_quality.py", "2a, 2b",
                   {"--table": "search_quality_table.json", "--plot": "search_quality.png"}),
    # 2c asks for ≥ 12 trials over ≥ 3 student architectures: the quickstart space has 3
    "stage_reuse": Part("bench/stage_reuse.py", "2c", defaults=("--trials", "12")),
    "training_step": Part("bench/training_step.py", "2d"),
    # the shipped default (kept worker processes) beside the cuts off and fresh processes per trial
    "overhead": Part("bench/overhead.py", "2e", defaults=("--compare",)),
    # 2b in live sweeps (the replays of `search` keep the sampled points fixed; here the sampler follows
    # what each sweep's trials report): 12 trials, 4 student epochs so MO-ASHA has rungs at 1 and 3
    "early_stopping": Part("bench/early_stopping.py", "2b (live)", defaults=("--trials", "12", "--set", "train.epochs=4")),
    # item 4: trials packed 1, 4 and 8 to a GPU, with channels_last and host-held data beside the default
    "gpu_packing": Part("bench/gpu_packing.py", "4", needs_gpu=True,
                        defaults=("--concurrency", "1", "4", "8", "--channels-last", "4", "--host-data", "4")),
}


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def command_for(name: str, part: Part, out_dir: Path, extra: list[str]) -> list[str]:
    command = [sys.executable, part.script]
    source = (ROOT / part.script).read_text()
    if '"--out"' in source:  # the bench/ convention: --out PATH writes every number as JSON
        command += ["--out", str(out_dir / f"{name}.json")]
    for flag, filename in part.outputs.items():
        command += [flag, str(out_dir / filename)]
    return command + list(part.defaults) + extra


def run_part(command: list[str]) -> tuple[int, str, float]:
    """Run one part: stderr passes through live, stdout is echoed live and kept."""
    started = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    lines = []
    with subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True) as process:
        assert process.stdout is not None
        for line in process.stdout:
            print(line, end="", flush=True)
            lines.append(line)
    return process.returncode, "".join(lines), time.perf_counter() - started


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    parser.add_argument("--out-dir", type=Path, default=ROOT / "pxd-results" / "bench",
                        help="JSON, table and plot of every part, and suite.json")
    parser.add_argument("--args", action="append", default=[], metavar="PART=ARGS",
                        help='extra arguments for one part, e.g. "search=--replays 30"')
    args = parser.parse_args(argv)
    args.extra = {}
    for item in args.args:
        name, _, text = item.partition("=")
        if name not in PARTS or not _:
            parser.error(f"--args {item!r}: expected PART=ARGS with PART one of {', '.join(PARTS)}")
        args.extra[name] = shlex.split(text)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in args.parts:
        part = PARTS[name]
        if not (ROOT / part.script).exists():
            print(f"\n== {name} ({part.items}): skipped, {part.script} is not in this checkout", flush=True)
            results[name] = {"status": "skipped", "script": part.script}
            continue
        if part.needs_gpu and not cuda_available():
            print(f"\n== {name} ({part.items}): skipped, no CUDA GPU here", flush=True)
            results[name] = {"status": "skipped", "script": part.script, "reason": "no CUDA GPU"}
            continue
        command = command_for(name, part, args.out_dir, args.extra.get(name, []))
        print(f"\n== {name} ({part.items}): {shlex.join(command)}", flush=True)
        returncode, summary, wall = run_part(command)
        results[name] = {"status": "ok" if returncode == 0 else f"failed (exit {returncode})", "command": command,
                         "wall_s": wall, "summary": summary}
    print("\n== suite summary")
    for name, result in results.items():
        wall = f", {result['wall_s']:.0f}s" if "wall_s" in result else ""
        print(f"\n-- {name} ({PARTS[name].items}): {result['status']}{wall}")
        if result.get("summary"):
            print(result["summary"].rstrip())
    (args.out_dir / "suite.json").write_text(json.dumps(
        {"date": datetime.date.today().isoformat(), "parts": results}, indent=1))
    print(f"\nwrote {args.out_dir / 'suite.json'}")
    return 0 if all(r["status"] in ("ok", "skipped") for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
