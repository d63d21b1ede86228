"""The metrics middleware: Prometheus metrics per handler call, in its own registry, served over HTTP."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette

from krules.context import EventContext
from krules.errors import ConfigurationError
from krules.http.server import serve_in_background
from krules.testing import KRulesTestApp, RedisModeApp, wait_until
from krules.testing.redis_server import LocalRedisServer
from middleware.base import ATTEMPTS, DeadLetterEvent, Next, SkipEvent
from middleware.metrics import DURATION_BUCKETS, MetricsMiddleware, metrics_route


def with_metrics(app: KRulesTestApp, registry: CollectorRegistry | None = None) -> MetricsMiddleware:
    metrics = MetricsMiddleware(registry=registry)
    app.middleware(metrics)
    app.engine.event_observers.append(metrics.observe_event)
    return metrics


def rule_name(app: KRulesTestApp, short: str) -> str:
    (name,) = [r.name for r in app.container.registry().rules if r.name.endswith(f".{short}")]
    return name


def calls(metrics: MetricsMiddleware, handler: str, outcome: str) -> float | None:
    return metrics.registry.get_sample_value(
        "krules_handler_calls_total", {"handler": handler, "outcome": outcome}
    )


async def test_a_successful_call_counts_as_ok_and_its_duration_is_observed(krules_app: KRulesTestApp) -> None:
    metrics = with_metrics(krules_app)

    @krules_app.on("order.submitted")
    async def validate(ctx: EventContext) -> None:
        pass

    await krules_app.emit("order.submitted", "order-1")
    await krules_app.emit("order.submitted", "order-2")

    handler = rule_name(krules_app, "validate")
    sample = metrics.registry.get_sample_value
    assert calls(metrics, handler, "ok") == 2
    assert sample("krules_handler_duration_seconds_count", {"handler": handler}) == 2
    assert sample("krules_handler_duration_seconds_bucket", {"handler": handler, "le": "+Inf"}) == 2
    duration = sample("krules_handler_duration_seconds_sum", {"handler": handler})
    assert duration is not None and 0 < duration < 1
    assert sample("krules_handler_retries_total", {"handler": handler}) == 0


@pytest.mark.parametrize(
    ("error", "outcome", "is_failure"),
    [
        (SkipEvent(), "skipped", False),
        (RuntimeError("boom"), "failed", True),
        (DeadLetterEvent("Known bad event.", reason="rejected"), "dead_lettered", True),
    ],
)
async def test_each_outcome_is_counted_and_the_error_still_reaches_the_engine(
    krules_app: KRulesTestApp, error: Exception, outcome: str, is_failure: bool
) -> None:
    metrics = with_metrics(krules_app)

    @krules_app.on("x")
    async def handler(ctx: EventContext) -> None:
        raise error

    await krules_app.emit("x", "s")

    name = rule_name(krules_app, "handler")
    assert calls(metrics, name, outcome) == 1
    assert calls(metrics, name, "ok") == 0
    assert metrics.registry.get_sample_value("krules_handler_duration_seconds_count", {"handler": name}) == 1
    assert [f.error for f in krules_app.recorder.failures] == ([error] if is_failure else [])


async def test_every_dispatched_event_is_counted_by_type_including_cascaded_ones(
    krules_app: KRulesTestApp,
) -> None:
    metrics = with_metrics(krules_app)

    @krules_app.on("order.submitted")
    async def submit(ctx: EventContext) -> None:
        await ctx.emit("order.validated")
        await ctx.emit("order.validated", subject="order-audit")

    await krules_app.emit("order.submitted", "order-1")
    await krules_app.emit("nobody.listens", "order-1")

    received = metrics.registry.get_sample_value
    assert received("krules_events_received_total", {"type": "order.submitted"}) == 1
    assert received("krules_events_received_total", {"type": "order.validated"}) == 2
    assert received("krules_events_received_total", {"type": "nobody.listens"}) == 1


async def test_retries_are_the_attempts_a_retry_middleware_recorded_minus_one(
    krules_app: KRulesTestApp,
) -> None:
    async def retry_until_it_works(ctx: EventContext, next: Next) -> None:
        attempt = 0
        while True:
            attempt += 1
            ctx.set_metadata(ATTEMPTS, attempt)
            try:
                await next()
                return
            except RuntimeError:
                if attempt == 4:
                    raise

    metrics = with_metrics(krules_app)
    krules_app.middleware(retry_until_it_works)
    tries: list[str] = []

    @krules_app.on("x")
    async def flaky(ctx: EventContext) -> None:
        tries.append(ctx.payload["mode"])
        if ctx.payload["mode"] == "broken" or tries.count("flaky") < 3:
            raise RuntimeError("not yet")

    await krules_app.emit("x", "a", {"mode": "flaky"})  # ok at the 3rd attempt: 2 retries
    await krules_app.emit("x", "b", {"mode": "broken"})  # fails after 4 attempts: 3 retries

    name = rule_name(krules_app, "flaky")
    assert metrics.registry.get_sample_value("krules_handler_retries_total", {"handler": name}) == 5
    assert calls(metrics, name, "ok") == 1
    assert calls(metrics, name, "failed") == 1


def test_dead_letters_circuit_states_and_partition_gauges_are_recorded() -> None:
    metrics = MetricsMiddleware()
    metrics.record_dead_letter("rules.ship", "circuit_open")
    metrics.record_dead_letter("rules.ship", "circuit_open")
    metrics.record_dead_letter("rules.ship", "rejected")
    metrics.record_circuit_state("rules.ship", "open")
    metrics.record_circuit_state("rules.bill", "half-open")
    metrics.record_circuit_state("rules.pack", "open")
    metrics.record_circuit_state("rules.pack", "closed")
    metrics.record_partition_lag(3, 120)
    metrics.record_partition_lag(3, 7)
    metrics.record_partition_pending(0, 2)

    sample = metrics.registry.get_sample_value
    assert sample("krules_dead_letters_total", {"handler": "rules.ship", "reason": "circuit_open"}) == 2
    assert sample("krules_dead_letters_total", {"handler": "rules.ship", "reason": "rejected"}) == 1
    assert sample("krules_circuit_state", {"key": "rules.ship"}) == 2
    assert sample("krules_circuit_state", {"key": "rules.bill"}) == 1
    assert sample("krules_circuit_state", {"key": "rules.pack"}) == 0
    assert sample("krules_partition_lag", {"partition": "3"}) == 7
    assert sample("krules_partition_pending", {"partition": "0"}) == 2


def test_partition_ownership_is_a_gauge_of_owned_partitions_and_counters_of_handovers_and_losses() -> None:
    metrics = MetricsMiddleware()
    sample = metrics.registry.get_sample_value
    assert sample("krules_partitions_owned") == 0
    assert sample("krules_partition_handovers_total", {"direction": "acquired"}) == 0  # there from the start
    assert sample("krules_partition_handovers_total", {"direction": "released"}) == 0
    assert sample("krules_partition_leases_lost_total") == 0

    for _ in range(3):
        metrics.record_handover("acquired")
    metrics.record_handover("released")
    metrics.record_lease_lost()
    metrics.record_partitions_owned(3)
    metrics.record_partitions_owned(1)

    assert sample("krules_partitions_owned") == 1
    assert sample("krules_partition_handovers_total", {"direction": "acquired"}) == 3
    assert sample("krules_partition_handovers_total", {"direction": "released"}) == 1
    assert sample("krules_partition_leases_lost_total") == 1


def test_an_unknown_handover_direction_is_refused_with_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"direction 'lost' is unknown; use 'acquired' or 'released'"):
        MetricsMiddleware().record_handover("lost")


def test_an_unknown_circuit_state_is_refused_with_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"Circuit state 'ajar' of circuit 'k' is unknown; use 'closed'"):
        MetricsMiddleware().record_circuit_state("k", "ajar")


def test_each_middleware_has_its_own_registry_and_leaves_the_global_one_alone() -> None:
    first, second = MetricsMiddleware(), MetricsMiddleware()
    first.record_dead_letter("h", "rejected")

    assert first.registry is not second.registry
    assert (
        second.registry.get_sample_value("krules_dead_letters_total", {"handler": "h", "reason": "rejected"})
        is None
    )
    assert (
        REGISTRY.get_sample_value("krules_dead_letters_total", {"handler": "h", "reason": "rejected"}) is None
    )


def test_an_injected_registry_receives_the_metrics() -> None:
    registry = CollectorRegistry()
    MetricsMiddleware(registry=registry).record_partition_lag(1, 5)
    assert registry.get_sample_value("krules_partition_lag", {"partition": "1"}) == 5


def test_a_registry_already_holding_krules_metrics_is_a_configuration_error() -> None:
    registry = CollectorRegistry()
    MetricsMiddleware(registry=registry)
    with pytest.raises(ConfigurationError, match="already holds krules metrics"):
        MetricsMiddleware(registry=registry)


@pytest.mark.parametrize("registry", ["default", 42, object()])
def test_a_registry_that_is_not_a_collector_registry_is_a_configuration_error(registry: Any) -> None:
    with pytest.raises(ConfigurationError, match=rf"option registry={registry!r} is invalid"):
        MetricsMiddleware(registry=registry)


@pytest.mark.parametrize(("source", "path"), [("registry", "/metrics"), (None, "metrics"), (None, 5)])
def test_metrics_route_refuses_a_bad_source_or_path(source: Any, path: Any) -> None:
    with pytest.raises(ConfigurationError):
        metrics_route(source or MetricsMiddleware(), path)


async def test_metrics_are_scraped_over_http_in_the_prometheus_text_format(krules_app: KRulesTestApp) -> None:
    metrics = with_metrics(krules_app)

    @krules_app.on("order.submitted")
    async def validate(ctx: EventContext) -> None:
        if ctx.payload["total"] < 0:
            raise DeadLetterEvent("A negative total is never valid.")

    metrics.record_circuit_state("orders", "half-open")
    route = metrics_route(metrics, path="/ops/metrics")
    async with (
        serve_in_background(krules_app.engine, routes=[route]) as server,
        httpx.AsyncClient(base_url=server.url, timeout=10) as http,
    ):
        for total in (30, 12, -1):
            posted = await http.post(
                "/events",
                json={
                    "specversion": "1.0",
                    "id": f"order-{total}",
                    "source": "tests",
                    "type": "order.submitted",
                    "subject": f"order-{total}",
                    "data": {"total": total},
                },
                headers={"content-type": "application/cloudevents+json"},
            )
            assert posted.status_code == 200, posted.text
        response = await http.get("/ops/metrics")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    families = {family.name: family for family in text_string_to_metric_families(response.text)}
    handler = rule_name(krules_app, "validate")

    def value(family: str, sample_name: str, **labels: str) -> float:
        (found,) = [s.value for s in families[family].samples if s.name == sample_name and s.labels == labels]
        return found

    assert families["krules_handler_calls"].type == "counter"
    assert value("krules_handler_calls", "krules_handler_calls_total", handler=handler, outcome="ok") == 2
    assert (
        value("krules_handler_calls", "krules_handler_calls_total", handler=handler, outcome="dead_lettered")
        == 1
    )
    assert value("krules_events_received", "krules_events_received_total", type="order.submitted") == 3
    assert value("krules_circuit_state", "krules_circuit_state", key="orders") == 1
    duration = families["krules_handler_duration_seconds"]
    assert duration.type == "histogram"
    bounds = [s.labels["le"] for s in duration.samples if s.name.endswith("_bucket")]
    assert bounds == [*(str(b) for b in DURATION_BUCKETS), "+Inf"]
    assert (
        value("krules_handler_duration_seconds", "krules_handler_duration_seconds_count", handler=handler)
        == 3
    )


async def test_the_route_serves_a_bare_registry_too() -> None:
    registry = CollectorRegistry()
    MetricsMiddleware(registry=registry).record_partition_pending(2, 9)
    transport = httpx.ASGITransport(app=Starlette(routes=[metrics_route(registry)]))
    async with httpx.AsyncClient(transport=transport, base_url="http://metrics") as http:
        response = await http.get("/metrics")

    assert response.status_code == 200
    assert 'krules_partition_pending{partition="2"} 9.0' in response.text


async def test_the_per_call_series_have_their_created_timestamps(krules_app: KRulesTestApp) -> None:
    metrics = with_metrics(krules_app)

    @krules_app.on("x")
    async def handler(ctx: EventContext) -> None:
        pass

    await krules_app.emit("x", "s")

    name = rule_name(krules_app, "handler")
    for series, labels in [
        ("krules_events_received_created", {"type": "x"}),
        ("krules_handler_calls_created", {"handler": name, "outcome": "ok"}),
        ("krules_handler_duration_seconds_created", {"handler": name}),
        ("krules_handler_retries_created", {"handler": name}),
    ]:
        created = metrics.registry.get_sample_value(series, labels)
        assert created is not None and created > 1.7e9, series


# -- bounded labels ----------------------------------------------------------------------------------
async def test_sender_chosen_event_types_fold_into_the_labels_the_rules_allow(
    krules_app: KRulesTestApp,
) -> None:
    metrics = MetricsMiddleware()
    krules_app.middleware(metrics)
    metrics.observe(krules_app.engine)

    @krules_app.on("order.placed")
    async def place(ctx: EventContext) -> None:
        await ctx.subject.set("placed", True)

    @krules_app.on("sensor.*")
    async def read(ctx: EventContext) -> None:
        pass

    junk = [{"type": f"junk-{n}", "subject": f"s-{n % 7}"} for n in range(3000)]
    readings = [{"type": f"sensor.t{n}", "subject": "sensor-1"} for n in range(5)]
    batch = [
        {"specversion": "1.0", "id": f"e-{n}", "source": "outsider", "data": {}, **fields}
        for n, fields in enumerate([*junk, *readings, {"type": "order.placed", "subject": "order-1"}])
    ]
    async with (
        serve_in_background(krules_app.engine, routes=[metrics_route(metrics)]) as server,
        httpx.AsyncClient(timeout=30) as http,
    ):
        posted = await http.post(
            server.url + "/events",
            content=json.dumps(batch),
            headers={"content-type": "application/cloudevents-batch+json"},
        )
        scraped = await http.get(server.url + "/metrics")

    assert posted.status_code == 200
    (family,) = [
        f for f in text_string_to_metric_families(scraped.text) if f.name == "krules_events_received"
    ]
    counts = {s.labels["type"]: s.value for s in family.samples if s.name.endswith("_total")}
    assert counts == {"other": 3000, "sensor.*": 5, "order.placed": 1, "subject-property-changed": 1}
    assert len(scraped.content) < 20_000


async def test_without_the_rules_only_the_first_event_types_get_labels_of_their_own(
    krules_app: KRulesTestApp,
) -> None:
    metrics = MetricsMiddleware(max_event_types=3)
    krules_app.engine.event_observers.append(metrics.observe_event)  # not bound to the rules

    for n in range(6):
        await krules_app.emit(f"type-{n}", "s")
    await krules_app.emit("type-0", "s")

    sample = metrics.registry.get_sample_value
    assert [sample("krules_events_received_total", {"type": f"type-{n}"}) for n in range(4)] == [
        2,
        1,
        1,
        None,
    ]
    assert sample("krules_events_received_total", {"type": "other"}) == 3
    with pytest.raises(ConfigurationError, match="max_event_types=0 is invalid"):
        MetricsMiddleware(max_event_types=0)


@pytest.mark.redis_server
async def test_redis_mode_instances_export_the_partitions_they_own_their_handovers_and_lost_leases(
    redis_server: LocalRedisServer, redis_key_prefix: str, raw: Any
) -> None:
    """Two instances in ``auto`` mode share 4 partitions; one stops and the other takes them all; a
    lease Redis loses is counted as lost, and the partition is taken again."""
    fast = {"partitions": 4, "lease_ms": 1000, "lease_renew_ms": 100}
    first = RedisModeApp(redis_server.url, redis_key_prefix, middleware=True, consumer="first", **fast)
    second = RedisModeApp(redis_server.url, redis_key_prefix, middleware=True, consumer="second", **fast)

    def sample(app: RedisModeApp, name: str, **labels: str) -> float | None:
        chain = app.instance.chain
        assert chain is not None and chain.metrics is not None
        return chain.metrics.registry.get_sample_value(name, labels)

    def owned(app: RedisModeApp) -> float | None:
        return sample(app, "krules_partitions_owned")

    def handovers(app: RedisModeApp, direction: str) -> float | None:
        return sample(app, "krules_partition_handovers_total", direction=direction)

    def leases_of(app: RedisModeApp) -> Any:
        return getattr(app.worker.source, "leases")  # noqa: B009 - the Redis transport's, not the port's

    await first.start()
    try:

        async def first_owns_all() -> bool:
            return owned(first) == 4

        await wait_until(first_owns_all)
        assert handovers(first, "acquired") == 4
        assert handovers(first, "released") == 0

        await second.start()
        try:

            async def shared() -> bool:
                return owned(first) == 2 and owned(second) == 2 and handovers(first, "released") == 2

            await wait_until(shared)
            assert handovers(second, "acquired") == 2
            assert len(leases_of(first).owned()) == len(leases_of(second).owned()) == 2
        finally:
            await second.stop()
        assert owned(second) == 0 and handovers(second, "released") == 2  # released at once on a stop

        await wait_until(first_owns_all)
        assert handovers(first, "acquired") == 6
        assert sample(first, "krules_partition_leases_lost_total") == 0

        await raw.delete(leases_of(first).keys.lease(0))  # as a Redis that lost the key

        async def lost_and_taken_again() -> bool:
            return sample(first, "krules_partition_leases_lost_total") == 1 and owned(first) == 4

        await wait_until(lost_and_taken_again)
        assert handovers(first, "acquired") == 7
        assert handovers(first, "released") == 2  # a lost lease is not a release
    finally:
        await first.stop()
    assert owned(first) == 0 and handovers(first, "released") == 6
