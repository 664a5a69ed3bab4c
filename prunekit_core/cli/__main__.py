"""``python -m prunekit_core.cli``: the ``prunekit`` command (bench/cli_startup.py runs it this way)."""

import sys

from . import main

sys.exit(main())
