"""Entry point of ``python -m bench``."""

import sys

print(
    "python -m bench: the benchmarks are not available in this version yet "
    "(see the benchmark issue); nothing was measured",
    file=sys.stderr,
)
sys.exit(69)
