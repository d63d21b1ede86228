"""Shared bits of the benchmarks: JSON-line output and median-of-N timing."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from collections.abc import Awaitable, Callable
from typing import Any

REPEATS = int(os.environ.get("BENCH_REPEATS", "3"))


def report(name: str, **figures: Any) -> None:
    """Print one JSON line: the benchmark name, its figures and the interpreter."""
    line = {"bench": name, **figures, "python": platform.python_version()}
    print(json.dumps(line), flush=True)


async def median_seconds(run: Callable[[], Awaitable[float]], repeats: int = REPEATS) -> float:
    """Run ``run`` (which returns elapsed seconds) ``repeats`` times; return the median."""
    return statistics.median([await run() for _ in range(repeats)])


async def redis_commands(client: Any) -> int:
    """Commands the server has run so far (``INFO commandstats``, script calls included), minus the
    INFO and CONFIG calls of the measurement itself; ``client`` is any redis-py asyncio client."""
    stats: dict[str, Any] = await client.info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items() if k not in ("cmdstat_info", "cmdstat_config"))


TOP_LEVEL_COMMANDS = ("evalsha", "hgetall", "xadd", "xread", "xreadgroup")
"""The commands krules and its stream client send themselves in a drain (scripts with the commands
they run inside; the client's appends included)."""


async def redis_command_usec(client: Any, names: tuple[str, ...] = TOP_LEVEL_COMMANDS) -> int:
    """Microseconds the server has spent so far running the commands ``names`` (``INFO
    commandstats``: ``usec`` = ``usec_per_call`` times ``calls``); ``client`` is any redis-py asyncio
    client.  Top-level commands only, so no command's time is counted twice."""
    stats: dict[str, Any] = await client.info("commandstats")
    found = (stats.get(f"cmdstat_{name}") for name in names)
    return sum(int(stat["usec"]) for stat in found if stat is not None)


async def redis_cpu_seconds(client: Any) -> float:
    """CPU seconds the server has used so far (``INFO cpu``, user + system): its whole work, the
    network included, which ``INFO commandstats`` leaves out (and whose ``usec`` counts a script's
    commands twice, in the script's and in their own); ``client`` is any redis-py asyncio client."""
    info: dict[str, Any] = await client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def scale() -> float:
    """BENCH_SCALE shrinks workloads for smoke runs (e.g. 0.05); 1.0 is the reported size."""
    value = float(os.environ.get("BENCH_SCALE", "1"))
    if not 0 < value <= 1:
        sys.exit("BENCH_SCALE must be in (0, 1].")
    return value
