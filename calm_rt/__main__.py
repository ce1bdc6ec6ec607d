"""``python -m calm_rt`` is the ``calm-rt`` command."""

import sys

from calm_rt.cli import main

sys.exit(main())
