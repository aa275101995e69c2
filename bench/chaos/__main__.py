"""``python -m bench.chaos``: the fault-injection runner (``bench/chaos/runner.py``)."""

import sys

from bench.chaos.runner import main

if __name__ == "__main__":
    sys.exit(main())
