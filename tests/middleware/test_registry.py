"""The default chain of krules run: which built-ins, in which order, configured from the settings."""

from __future__ import annotations

import importlib

import pytest
from opentelemetry.sdk.trace import TracerProvider

from krules.config import Settings
from krules.errors import ConfigurationError
from middleware.circuit_breaker import CircuitBreakerMiddleware
from middleware.registry import BUILT_INS, MIDDLEWARE_SETTINGS, build_default_chain, parse_middleware_names
from middleware.retry import RetryMiddleware, RetryPolicy


def test_embedded_mode_gets_every_built_in_but_tracing_without_exporter_and_partitioning() -> None:
    chain = build_default_chain(Settings(), env={})
    assert chain.names == ["logging", "metrics", "dead_letter", "circuit_breaker", "retry", "timeout"]
    assert chain.metrics is not None and chain.metrics in chain.middlewares
    assert chain.tracer_provider is None


def test_tracing_and_the_partition_guard_join_in_their_documented_places() -> None:
    provider = TracerProvider()
    settings = Settings(redis_url="redis://127.0.0.1:1/0", partitions=4, partition_id="1,2")
    chain = build_default_chain(settings, env={}, tracer_provider=provider)
    assert chain.names == list(BUILT_INS)
    assert chain.tracer_provider is provider
    provider.shutdown()


def test_an_instance_owning_every_partition_needs_no_guard() -> None:
    settings = Settings(redis_url="redis://127.0.0.1:1/0", partitions=4)
    assert "partitioning" not in build_default_chain(settings, env={}).names


def test_the_chosen_built_ins_keep_the_default_order_whatever_the_list_says() -> None:
    assert parse_middleware_names("timeout, logging") == ("logging", "timeout")
    assert parse_middleware_names("none") == ()
    chain = build_default_chain(Settings(), env={"KRULES_MIDDLEWARE": "none"})
    assert chain.middlewares == [] and chain.metrics is None


def test_circuit_settings_reach_the_breaker() -> None:
    chain = build_default_chain(
        Settings(), env={"KRULES_MIDDLEWARE": "circuit_breaker", "KRULES_CIRCUIT_FAILURES": "2"}
    )
    (breaker,) = chain.middlewares
    assert isinstance(breaker, CircuitBreakerMiddleware)


def test_an_unknown_exporter_fails_at_start_up_with_one_sentence() -> None:
    with pytest.raises(ConfigurationError, match="jaeger"):
        build_default_chain(Settings(), env={"OTEL_TRACES_EXPORTER": "jaeger"})


def test_each_built_in_is_a_module_that_builds_itself_from_settings() -> None:
    for name in BUILT_INS:
        assert callable(importlib.import_module(f"middleware.{name}").from_settings)


def test_the_built_ins_read_their_own_settings_which_the_engine_settings_accept_when_handed_over() -> None:
    env = {"KRULES_RETRY_CAP": "5", "KRULES_MIDDLEWARE": "retry"}
    assert Settings.from_env(env, extra=MIDDLEWARE_SETTINGS) == Settings()
    (retry,) = build_default_chain(Settings(), env=env).middlewares
    assert isinstance(retry, RetryMiddleware)
    assert retry.delay(RetryPolicy((ValueError,), 9, 100.0, None, None), 1) == 5.0
