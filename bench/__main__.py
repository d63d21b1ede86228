"""Run every benchmark and print their JSON lines: ``python -m bench`` (or ``make bench``)."""

from __future__ import annotations

import importlib
import subprocess
import sys

MEMORY = ["bench.order_cascade", "bench.dispatch_cost", "bench.middleware_overhead", "bench.default_chain"]
REDIS = [
    "bench.redis_orders",
    "bench.redis_increments",
    "bench.stream_orders",
    "bench.stream_scaleout",
    "bench.timers",
]


def main() -> int:
    failed = 0
    for name in MEMORY + REDIS:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError:
            continue
        # one process per benchmark: no warm caches or heap left over from the previous one
        failed |= subprocess.call([sys.executable, "-m", name])
    return failed


if __name__ == "__main__":
    sys.exit(main())
