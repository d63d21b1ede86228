"""The order cascade with ``krules run``'s default middleware chain versus no middleware.

Same rules as ``bench.order_cascade`` (3 handler calls per order), memory storage.  Variants:

* ``bare``: no middleware;
* ``default``: every built-in ``krules run`` installs in embedded mode — tracing (an SDK provider
  whose exporter does nothing, behind a batch processor), logging at INFO to a null handler,
  metrics, dead_letter, circuit_breaker, retry and timeout (rules unmarked);
* ``untraced``: the same without tracing (what ``krules run`` installs when no ``OTEL_TRACES_EXPORTER``
  is set);
* ``disabled``: ``KRULES_MIDDLEWARE=none`` through the same builder (nothing installed).

Prints orders/s of each, the ratio default/bare of the time per order, and the added cost per
handler call; the variants alternate round by round so machine noise hits them alike.

``python -m bench.default_chain --instructions`` counts instead the machine instructions per order
of each variant under valgrind's callgrind (deterministic, where the wall clock of a shared machine
drifts by tens of percent); there the spans go through a ``SimpleSpanProcessor`` to the exporter
that does nothing, so no background thread blurs the count.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sys
import time
from collections.abc import Sequence
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)

from bench import order_cascade
from bench._common import report, scale
from bench.instructions import per_order
from krules import KRulesContainer
from krules.config import Settings
from middleware.registry import build_default_chain

ORDERS = 20_000
ROUNDS = 5
HANDLER_CALLS_PER_ORDER = 3


class _NoExport(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def build(variant: str, provider: TracerProvider) -> Any:
    container = KRulesContainer()
    if variant != "bare":
        env = {"KRULES_MIDDLEWARE": "none"} if variant == "disabled" else {}
        traced = provider if variant == "default" else None
        chain = build_default_chain(Settings(), env=env, tracer_provider=traced)
        for mw in chain.middlewares:
            container.registry().add_middleware(mw)
    order_cascade.build(container)
    return container.engine()


async def seconds_per_order(variant: str, orders: int, provider: TracerProvider) -> float:
    engine = build(variant, provider)
    emit = engine.emit
    for i in range(200):  # warm-up
        await emit("order.submitted", f"warm-{i}", {"total": 10})
    started = time.perf_counter()
    for i in range(orders):
        await emit("order.submitted", f"order-{i}", {"total": 10})
    return (time.perf_counter() - started) / orders


def quiet_handler_lines() -> None:
    """Handler-call lines at INFO to a handler that drops them (the issue's measuring condition)."""
    handlers = logging.getLogger("krules.handlers")
    handlers.addHandler(logging.NullHandler())
    handlers.setLevel(logging.INFO)
    handlers.propagate = False


def no_export_provider(*, batch: bool = True) -> TracerProvider:
    """An SDK provider whose exporter does nothing, behind a batch (or a simple) span processor."""
    provider = TracerProvider()
    provider.add_span_processor(
        BatchSpanProcessor(_NoExport()) if batch else SimpleSpanProcessor(_NoExport())
    )
    return provider


_COUNTED = """
import asyncio, sys
from bench.default_chain import build, no_export_provider, quiet_handler_lines
quiet_handler_lines()
provider = no_export_provider(batch=False)
async def main(n):
    emit = build(VARIANT, provider).emit
    for i in range({warm}): await emit("order.submitted", f"w-{{i}}", {{"total": 10}})
    for i in range(n): await emit("order.submitted", f"order-{{i}}", {{"total": 10}})
asyncio.run(main(int(sys.argv[1])))
"""


def count_instructions() -> None:
    """Instructions per order of each variant (callgrind), and their ratios to the bare cascade."""
    os.environ["PYTHONPATH"] = os.getcwd()
    counts = {
        variant: per_order(sys.executable, _COUNTED.replace("VARIANT", repr(variant)))
        for variant in ("bare", "default", "untraced", "disabled")
    }
    report(
        "default_chain_instructions",
        **{f"{variant}_per_order": round(count) for variant, count in counts.items()},
        default_over_bare=round(counts["default"] / counts["bare"], 2),
        untraced_over_bare=round(counts["untraced"] / counts["bare"], 2),
        disabled_over_bare=round(counts["disabled"] / counts["bare"], 3),
        added_per_handler_call=round((counts["default"] - counts["bare"]) / HANDLER_CALLS_PER_ORDER),
        untraced_added_per_handler_call=round(
            (counts["untraced"] - counts["bare"]) / HANDLER_CALLS_PER_ORDER
        ),
    )


async def main() -> None:
    orders = max(100, int(ORDERS * scale()))
    quiet_handler_lines()
    provider = no_export_provider()
    times: dict[str, list[float]] = {"bare": [], "default": [], "untraced": [], "disabled": []}
    for _ in range(ROUNDS):
        for variant in times:
            times[variant].append(await seconds_per_order(variant, orders, provider))
    provider.shutdown()
    best = {variant: sorted(values)[len(values) // 2] for variant, values in times.items()}
    report(
        "default_chain",
        orders=orders,
        bare_orders_per_s=round(1 / best["bare"]),
        default_orders_per_s=round(1 / best["default"]),
        untraced_orders_per_s=round(1 / best["untraced"]),
        disabled_orders_per_s=round(1 / best["disabled"]),
        default_over_bare=round(best["default"] / best["bare"], 2),
        untraced_over_bare=round(best["untraced"] / best["bare"], 2),
        disabled_over_bare=round(best["disabled"] / best["bare"], 2),
        added_us_per_handler_call=round((best["default"] - best["bare"]) / HANDLER_CALLS_PER_ORDER * 1e6, 2),
        untraced_added_us_per_handler_call=round(
            (best["untraced"] - best["bare"]) / HANDLER_CALLS_PER_ORDER * 1e6, 2
        ),
    )


if __name__ == "__main__":
    if "--instructions" in sys.argv[1:]:
        if shutil.which("valgrind") is None:
            raise SystemExit("valgrind is not installed (Debian package valgrind)")
        count_instructions()
    else:
        asyncio.run(main())
