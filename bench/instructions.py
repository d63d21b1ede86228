"""Instructions per order of the order cascade, ours and KRules', counted by valgrind (callgrind).

Wall-clock figures on a shared machine drift by tens of percent from run to run; instruction counts
do not.  Each implementation runs the cascade twice under callgrind (200 and 2,200 orders, after
200 warm-up orders); the difference divided by 2,000 is the cost of one order without start-up.
Needs ``valgrind`` and a KRules interpreter (``KRULES_BASELINE_PYTHON``, ``make bench-compare``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench._common import report

BASELINE = os.environ.get("KRULES_BASELINE_PYTHON", str(Path(".venv-krules") / "bin" / "python"))
SMALL, LARGE, WARM_UP = 200, 2200, 200

OURS = """
import asyncio, sys
from bench.order_cascade import build
async def main(n):
    emit = build().engine().emit
    for i in range({warm}): await emit("order.submitted", f"w-{{i}}", {{"total": 10}})
    for i in range(n): await emit("order.submitted", f"order-{{i}}", {{"total": 10}})
asyncio.run(main(int(sys.argv[1])))
"""

THEIRS = """
import asyncio, sys
from krules_core.container import KRulesContainer
async def main(n):
    c = KRulesContainer()
    on, when, middleware, emit = c.handlers()
    @on("order.submitted")
    async def validate_order(ctx):
        if ctx.payload["total"] > 0:
            await ctx.emit("order.validated")
    @on("order.validated")
    async def process_payment(ctx):
        await ctx.emit("payment.completed")
    @on("payment.completed")
    async def ship_order(ctx):
        await ctx.subject.set("status", "shipped")
        await ctx.emit("order.shipped")
    for i in range({warm}): await emit("order.submitted", c.subject(f"w-{{i}}"), {{"total": 10}})
    for i in range(n): await emit("order.submitted", c.subject(f"order-{{i}}"), {{"total": 10}})
asyncio.run(main(int(sys.argv[1])))
"""


def instructions(python: str, script: Path, *args: object) -> int:
    with tempfile.TemporaryDirectory() as out:
        result = subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={out}/cg",
                python,
                str(script),
                *map(str, args),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
    found = re.search(r"Collected : (\d+)", result.stderr)
    if found is None:
        raise SystemExit(f"callgrind printed no instruction count:\n{result.stderr[-2000:]}")
    return int(found.group(1))


def per_order(python: str, source: str) -> float:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as handle:
        handle.write(source.format(warm=WARM_UP))
    script = Path(handle.name)
    try:
        return (instructions(python, script, LARGE) - instructions(python, script, SMALL)) / (LARGE - SMALL)
    finally:
        script.unlink()


def main() -> int:
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (Debian package valgrind)", file=sys.stderr)
        return 2
    os.environ["PYTHONPATH"] = os.getcwd()
    ours = per_order(sys.executable, OURS)
    figures: dict[str, float] = {"krules_instructions_per_order": round(ours)}
    if Path(BASELINE).exists():
        theirs = per_order(BASELINE, THEIRS)
        figures["krules_framework_instructions_per_order"] = round(theirs)
        figures["advantage"] = round(theirs / ours, 2)
    report("order_cascade_instructions", **figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
