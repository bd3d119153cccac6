"""The `pxd` command line: train one pipeline, run a sweep, read frontiers and stages back.

Config files set defaults; `--set a.b=value` flags override them; the resolved config is saved with the
run. Bad input exits with status 2 and one line naming the field, before any compute. The sub-commands
live in `orchestrator.cli.commands`; this module only builds the parser and maps errors to exit codes.
"""

from __future__ import annotations

import argparse
import os
import sys

from orchestrator.cli import commands
from orchestrator.tracking.server import login_error
from pxd.errors import ConfigError, StudentRefused

__all__ = ["main", "build_parser", "EXIT_BAD_INPUT"]

EXIT_BAD_INPUT = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pxd", description="Pixel-distillation sweeps: find the cheapest good low-resolution classifiers.")
    commands.add_subcommands(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except (ConfigError, StudentRefused) as exc:  # bad input, or a logged student pxd will not load
        print(f"pxd: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("pxd: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        refused = login_error(exc)  # a tracking server that refused the credentials; anything else propagates
        if refused is None:
            raise
        print(f"pxd: error: {refused}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
