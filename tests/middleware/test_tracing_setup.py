"""A TracerProvider configured from the OpenTelemetry environment (middleware.tracing_setup)."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from krules.errors import ConfigurationError
from middleware.tracing_setup import configure_tracing


# -- configure_tracing -------------------------------------------------------------------------------
@pytest.mark.parametrize("env", [{}, {"OTEL_TRACES_EXPORTER": "none"}, {"OTEL_TRACES_EXPORTER": " None "}])
def test_no_exporter_means_no_provider(env: dict[str, str]) -> None:
    assert configure_tracing(env) is None


def test_the_sdk_disabled_flag_wins_over_an_exporter() -> None:
    assert configure_tracing({"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"}) is None


def test_an_unknown_exporter_is_named_with_the_choices() -> None:
    with pytest.raises(ConfigurationError) as raised:
        configure_tracing({"OTEL_TRACES_EXPORTER": "jaeger"})
    assert str(raised.value) == (
        "OTEL_TRACES_EXPORTER='jaeger' names the unknown exporter 'jaeger'; choose from otlp, console, none."
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"OTEL_TRACES_EXPORTER": "none,console"}, "combines 'none' with exporters"),
        ({"OTEL_TRACES_EXPORTER": "console", "OTEL_TRACES_SAMPLER": "sometimes"}, "'sometimes' is not a"),
        (
            {
                "OTEL_TRACES_EXPORTER": "console",
                "OTEL_TRACES_SAMPLER": "traceidratio",
                "OTEL_TRACES_SAMPLER_ARG": "2",
            },
            "OTEL_TRACES_SAMPLER_ARG='2' is not a sampling ratio",
        ),
        ({"OTEL_TRACES_EXPORTER": "console", "OTEL_RESOURCE_ATTRIBUTES": "team"}, "without 'key=value' form"),
        ({"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "maybe"}, "is not a boolean"),
    ],
)
def test_invalid_settings_are_one_clear_error(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        configure_tracing(env)


def test_the_console_exporter_prints_spans_with_the_service_name(capsys: pytest.CaptureFixture[str]) -> None:
    provider = configure_tracing(
        {"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "orders", "OTEL_TRACES_SAMPLER": "always_on"}
    )
    assert provider is not None
    try:
        assert provider.resource.attributes["service.name"] == "orders"
        provider.get_tracer("test").start_span("order.submitted validate").end()
        provider.force_flush()
    finally:
        provider.shutdown()
    out = capsys.readouterr().out
    assert '"name": "order.submitted validate"' in out
    assert '"service.name": "orders"' in out


class _Collector:
    """A stand-in OTLP/HTTP collector on a loopback port that keeps what it receives."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        received = self.requests

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> _Collector:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.mark.parametrize(
    ("variables", "path"),
    [
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "{url}/"}, "/v1/traces"),
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "{url}/ignored",
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "{url}/custom",
            },
            "/custom",
        ),
    ],
)
def test_the_otlp_exporter_posts_to_the_endpoint_from_the_environment(
    variables: dict[str, str], path: str
) -> None:
    with _Collector() as collector:
        env = {name: value.format(url=collector.url) for name, value in variables.items()}
        env |= {
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_SERVICE_NAME": "orders",
            "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=test,team=ops%20team",
            "OTEL_EXPORTER_OTLP_HEADERS": "x-api-key=secret%3D1",
        }
        provider = configure_tracing(env)
        assert provider is not None
        try:
            provider.get_tracer("test").start_span("order.submitted validate").end()
            assert provider.force_flush()
        finally:
            provider.shutdown()
    [(received_path, headers, body)] = collector.requests
    assert received_path == path
    assert headers["x-api-key"] == "secret=1"
    request = ExportTraceServiceRequest.FromString(body)
    [resource_spans] = request.resource_spans
    resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
    assert resource["service.name"] == "orders"
    assert resource["deployment.environment"] == "test" and resource["team"] == "ops team"
    assert [s.name for s in resource_spans.scope_spans[0].spans] == ["order.submitted validate"]
