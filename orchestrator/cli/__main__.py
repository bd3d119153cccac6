"""`python -m orchestrator.cli`: the `pxd` command."""

import sys

from orchestrator.cli.main import main

sys.exit(main())
