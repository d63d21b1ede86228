"""``krules run``: import rule modules and serve the HTTP ingress, optionally feeding sample events.

With ``KRULES_REDIS_URL`` set, ``krules run`` is an instance of a Redis-mode deployment: it reads
the partitions of ``KRULES_PARTITION_ID`` from their streams, and its HTTP ingress (like
``krules emit``) appends events to the streams.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from krules.app import default_container
from krules.cli.common import configure_logging
from krules.container import settings_from_env
from krules.engine import Engine
from krules.errors import StorageError
from krules.events import Event

if TYPE_CHECKING:
    from krules.http.server import KRulesServer

__all__ = ["command_run", "demo_events", "feed_demo", "log_event"]

logger = logging.getLogger("krules.cli")  # its name before the re-layout, kept for logging configs


class _Json:
    """Formats a payload as compact JSON only if the log line is emitted."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __str__(self) -> str:
        return json.dumps(self.value, default=str, ensure_ascii=False, separators=(",", ":"))


def log_event(event: Event) -> None:
    """An engine event observer: one INFO line per dispatched event, indented by cascade depth."""
    logger.info(
        "%s%s %s %s (id %s)",
        "  " * min(event.depth, 20),
        event.type,
        event.subject,
        _Json(event.data),
        event.id,
    )


def demo_events(url: str) -> list[tuple[str, str, dict[str, Any]]]:
    """Sample events for ``--demo`` (``url`` is the instance's own, for an API call that succeeds)."""
    return [
        ("order.submitted", "order-1001", {"total": 30, "customer": "ada", "items": ["book"]}),
        ("order.submitted", "order-1002", {"total": 120.5, "customer": "grace", "items": ["lamp", "desk"]}),
        ("order.submitted", "order-1003", {"total": -5, "customer": "eve"}),  # invalid: rejected
        ("sensor.reading", "sensor-kitchen", {"value": 21.5}),
        ("sensor.reading", "sensor-kitchen", {"value": 22.0}),
        ("sensor.reading", "sensor-garage", {"value": "hot"}),  # not a number: a handler failure
        ("user.profile_update", "user-ada", {"name": "Ada", "email": "ada@example.com", "address": "London"}),
        ("api.call", "healthz-api", {"url": f"{url}/healthz"}),
        ("api.call", "missing-api", {"url": f"{url}/no-such-page"}),  # 404: fails without retrying
        ("loops.set", "muted-demo", {"color": "red", "size": 3}),
        ("loops.set", "filtered-demo", {"color": "blue"}),
        ("loops.set", "ext-demo", {"color": "green"}),
        ("device.reading", "device-7", {"value": 0.42}),
    ]


async def feed_demo(engine: Engine, server: KRulesServer) -> None:
    """Process the sample events the loaded rules handle, one after another, in-process."""
    samples = [s for s in demo_events(server.url) if engine.registry.match(s[0])]
    if not samples:
        logger.warning("demo: the loaded modules have no rules for the sample events; nothing fed")
        return
    logger.info("demo: feeding %d sample events", len(samples))
    for event_type, subject, data in samples:
        event = engine.new_event(event_type, subject, data)
        if engine.transport is not None:  # Redis mode: queued; the partitions' owners log them
            await asyncio.shield(engine.transport.send([event]))
            continue
        try:
            # shielded: a shutdown stops the feeding, but lets the turn under way finish
            turn = await asyncio.shield(engine.process(event))
        except StorageError as exc:
            logger.error("demo: %s for %r was not stored: %s", event_type, subject, exc)
            continue
        if turn.failures:
            logger.info(
                "demo: %s for %r finished with %d failed handler(s)", event_type, subject, len(turn.failures)
            )
    logger.info("demo: done; still serving on %s (try: krules subject show %s)", server.url, samples[0][1])


def command_run(args: argparse.Namespace) -> int:
    from krules.assembly import apply_gc_policy, assemble
    from krules.http.server import run

    settings = settings_from_env(http_host=args.host, http_port=args.port)
    configure_logging(settings)
    instance = assemble(settings, container=default_container())  # module-level on/when bind to it
    for module in args.modules:
        instance.load([module])
        logger.info("loaded rule module %s", module)
    chain = instance.chain
    logger.info("middleware: %s", " -> ".join(chain.names) if chain is not None and chain.names else "none")
    apply_gc_policy(settings)
    engine = instance.engine
    companions: list[Callable[[KRulesServer], Any]] = []
    worker = instance.worker
    if worker is not None:
        companions.append(lambda server: worker.run())
    else:  # embedded: timers fire in this process
        companions.append(lambda server: engine.run_timers())
    if args.demo:
        engine.event_observers.append(log_event)
        companions.append(lambda server: feed_demo(engine, server))

    async def alongside(server: KRulesServer) -> None:
        await asyncio.gather(*(start(server) for start in companions))

    def on_started(server: KRulesServer) -> Any:
        return alongside(server) if companions else None

    metrics = chain.metrics if chain is not None else None
    try:
        abandoned = run(
            engine,
            on_started=on_started,
            routes=instance.routes,
            metrics_registry=metrics.registry if metrics is not None else None,
        )
    finally:
        instance.close()  # flushes the spans still buffered
    return 1 if abandoned else 0  # not a clean stop: turns were cut short
