"""Entry point: ``python -m agent.bench``."""

import sys

from agent.bench.cli import main

sys.exit(main())
