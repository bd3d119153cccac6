"""The `pxd` command line: the parser and error-to-exit-code mapping (`main`) and the sub-commands (`commands`)."""

from orchestrator.cli.main import EXIT_BAD_INPUT, build_parser, main

__all__ = ["main", "build_parser", "EXIT_BAD_INPUT"]
