"""Side by side with KRules: alternate runs of the same workload on both, report medians and ratios.

The machines we run on are shared and noisy, so absolute figures drift; alternating the two
implementations in one session and comparing ratios is the fair measure.  Needs an interpreter with
krules-framework installed (``KRULES_BASELINE_PYTHON``, default ``.venv-krules/bin/python``; ``make
bench-compare`` creates it).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from bench._redis import redis_url

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
BASELINE = os.environ.get("KRULES_BASELINE_PYTHON", str(Path(".venv-krules") / "bin" / "python"))

# (workload, our module, figure, higher is better)
FIGURES = [
    ("order_cascade", "bench.order_cascade", "orders_per_s", True),
    ("middleware_overhead", "bench.middleware_overhead", "us_added_per_call", False),
    ("dispatch_cost", "bench.dispatch_cost", "us_per_emit", False),
    ("redis_orders", "bench.redis_orders", "orders_per_s", True),
    ("redis_increments", "bench.redis_increments", "increments_per_s", True),
]

# Which of our increment modes stands against which of KRules' (same kind of write).
_MODES = {
    "storage.update": "immediate writes",
    "exact (use_cache=False)": "immediate writes",
    "subject.cached": "cached writes",
    "cached (default)": "cached writes",
}


def _key(line: dict[str, object]) -> object:
    mode = line.get("mode")
    return _MODES.get(mode, mode) if isinstance(mode, str) else line.get("rules")


def run(cmd: list[str]) -> list[dict[str, object]]:
    out = subprocess.run(
        cmd, check=True, capture_output=True, text=True, env={**os.environ, "BENCH_REPEATS": "1"}
    )
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def main() -> int:
    if not Path(BASELINE).exists():
        print(f"no KRules interpreter at {BASELINE!r}; run `make bench-compare`", file=sys.stderr)
        return 2
    with redis_url() as url:  # one server for both sides of the Redis workload
        os.environ["KRULES_REDIS_URL"] = url
        compare()
    return 0


def compare() -> None:
    for workload, module, figure, higher_better in FIGURES:
        ours: dict[object, list[float]] = {}
        theirs: dict[object, list[float]] = {}
        lost: dict[tuple[bool, object], list[int]] = {}
        for _ in range(ROUNDS):
            for target, cmd in (
                (ours, [sys.executable, "-m", module]),
                (theirs, [BASELINE, "-m", "bench.krules_baseline", workload]),
            ):
                for line in run(cmd):
                    if line["bench"] == workload and figure in line:
                        target.setdefault(_key(line), []).append(float(line[figure]))  # type: ignore[arg-type]
                        if "lost" in line:
                            lost.setdefault((target is ours, _key(line)), []).append(int(line["lost"]))  # type: ignore[call-overload]
        for key in ours:
            a, b = statistics.median(ours[key]), statistics.median(theirs[key])
            print(
                json.dumps(
                    {
                        "bench": f"compare_{workload}",
                        "case": key,
                        "figure": figure,
                        "krules": a,
                        "krules_framework": b,
                        "advantage": round(a / b if higher_better else b / a, 2),
                        "rounds": ROUNDS,
                        **(
                            {"lost": max(lost[(True, key)]), "lost_krules_framework": max(lost[(False, key)])}
                            if (True, key) in lost
                            else {}
                        ),
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    sys.exit(main())
