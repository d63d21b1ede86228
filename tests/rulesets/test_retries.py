"""The retry example: backoff on the engine clock, give-up after the budget, and the HTTP client."""

from __future__ import annotations

import json
from types import ModuleType
from typing import Any

import httpx
import pytest

from krules.testing import KRulesTestApp

REQUEST = {"url": "https://api.example.test/weather", "method": "GET"}


class FlakyClient:
    """Fails ``failures`` times with ``error``, then answers ``{"ok": True}``; records every request."""

    def __init__(self, failures: int, error: Exception | None = None) -> None:
        self.failures = failures
        self.error = error or ConnectionError("api.example.test is down")
        self.requests: list[dict[str, Any]] = []

    async def call(self, request: dict[str, Any]) -> dict[str, Any]:
        self.requests.append(request)
        if len(self.requests) <= self.failures:
            raise self.error
        return {"ok": True}


@pytest.fixture
def retries(krules_app: KRulesTestApp) -> Any:
    """The module as loaded on the test app (typed Any: the tests replace its ``api_client``)."""
    module: ModuleType = krules_app.load("rulesets.retries")[0]
    return module


async def test_a_call_succeeds_after_two_failures_with_backoff_of_2_then_4_seconds(
    krules_app: KRulesTestApp, retries: Any
) -> None:
    retries.api_client = client = FlakyClient(failures=2)

    await krules_app.emit("api.call", "weather-api", REQUEST)
    await krules_app.settle()

    assert client.requests == [REQUEST, REQUEST, REQUEST]  # every retry carries the request
    assert krules_app.clock.sleeps == [2, 4]
    assert krules_app.recorder.types("weather-api") == [
        "api.call",
        "api.call",
        "api.call",
        "subject-property-changed",  # last_success; the retry count is muted
        "api.call_succeeded",
    ]
    [succeeded] = krules_app.recorder.of_type("api.call_succeeded")
    assert succeeded.data == {"response": {"ok": True}, "retries": 2}
    assert await krules_app.stored("weather-api") == {
        "retry_count": 0,
        "last_success": "2023-11-14T22:13:26+00:00",  # the fake clock's start + 2 s + 4 s
    }


async def test_a_call_that_keeps_failing_gives_up_after_max_retries(
    krules_app: KRulesTestApp, retries: Any
) -> None:
    retries.api_client = client = FlakyClient(failures=100)

    await krules_app.emit("api.call", "weather-api", REQUEST)
    await krules_app.settle()

    assert len(client.requests) == 1 + retries.MAX_RETRIES == 4
    assert krules_app.clock.sleeps == [2, 4, 8]
    assert krules_app.recorder.types("weather-api") == ["api.call"] * 4 + ["api.call_failed"]
    [failed] = krules_app.recorder.of_type("api.call_failed")
    assert failed.data == {
        "error": "ConnectionError: api.example.test is down",
        "retries": 3,
        "request": REQUEST,
    }
    assert await krules_app.stored("weather-api") == {"retry_count": 0}
    assert krules_app.recorder.failures == []


async def test_a_call_after_giving_up_is_tried_again_from_scratch(
    krules_app: KRulesTestApp, retries: Any
) -> None:
    retries.api_client = FlakyClient(failures=100)
    await krules_app.emit("api.call", "weather-api", REQUEST)
    retries.api_client = healthy = FlakyClient(failures=1)
    krules_app.clock.sleeps.clear()

    await krules_app.emit("api.call", "weather-api", REQUEST)
    await krules_app.settle()

    assert len(healthy.requests) == 2
    assert krules_app.clock.sleeps == [2]  # the retry budget started again at 0
    assert krules_app.recorder.of_type("api.call_succeeded")[0].data["retries"] == 1


async def test_a_permanent_error_fails_at_once_without_retrying(
    krules_app: KRulesTestApp, retries: Any
) -> None:
    retries.api_client = client = FlakyClient(failures=100, error=retries.PermanentApiError("404 Not Found"))

    await krules_app.emit("api.call", "weather-api", REQUEST)
    await krules_app.settle()

    assert len(client.requests) == 1
    assert krules_app.clock.sleeps == []
    assert krules_app.recorder.types("weather-api") == ["api.call", "api.call_failed"]
    assert krules_app.recorder.of_type("api.call_failed")[0].data == {
        "error": "PermanentApiError: 404 Not Found",
        "retries": 0,
        "request": REQUEST,
    }


async def test_retry_counts_of_different_apis_are_independent(
    krules_app: KRulesTestApp, retries: Any
) -> None:
    retries.api_client = FlakyClient(failures=1)

    await krules_app.emit("api.call", "api-a", REQUEST)  # fails once, then succeeds
    await krules_app.emit("api.call", "api-b", REQUEST)  # succeeds at once
    await krules_app.settle()

    outcomes = {e.subject: e.data["retries"] for e in krules_app.recorder.of_type("api.call_succeeded")}
    assert outcomes == {"api-a": 1, "api-b": 0}


# -- the default HTTP client -----------------------------------------------------------------


def http_client(retries: Any, *answers: int, seen: list[httpx.Request] | None = None) -> Any:
    """The module's HttpApiClient on a mock transport that answers with ``answers`` (status codes) in turn."""
    statuses = iter(answers)

    def answer(request: httpx.Request) -> httpx.Response:
        if seen is not None:
            seen.append(request)
        status = next(statuses)
        return httpx.Response(status, json={"status": status, "echo": request.content.decode() or None})

    return retries.HttpApiClient(transport=httpx.MockTransport(answer))


async def test_the_http_client_gets_the_url_and_returns_status_and_json_body(retries: Any) -> None:
    seen: list[httpx.Request] = []
    client = http_client(retries, 200, seen=seen)

    response = await client.call({"url": "https://api.example.test/weather?city=Turin"})

    assert response == {"status": 200, "body": {"status": 200, "echo": None}}
    assert [(r.method, str(r.url)) for r in seen] == [("GET", "https://api.example.test/weather?city=Turin")]


async def test_the_http_client_posts_the_json_body(retries: Any) -> None:
    seen: list[httpx.Request] = []
    client = http_client(retries, 201, seen=seen)

    response = await client.call(
        {"url": "https://api.example.test/orders", "method": "post", "json": {"n": 1}}
    )

    assert seen[0].method == "POST"
    assert json.loads(seen[0].content) == {"n": 1}
    assert response["status"] == 201


@pytest.mark.parametrize("status", [500, 503, 429])
async def test_the_http_client_raises_a_retryable_error_for_server_errors_and_throttling(
    retries: Any, status: int
) -> None:
    with pytest.raises(httpx.HTTPStatusError):
        await http_client(retries, status).call(REQUEST)


@pytest.mark.parametrize(
    "request_",
    [{"url": "https://api.example.test/missing"}, {}, {"url": "https://x.test", "method": "DELETE"}],
)
async def test_the_http_client_raises_a_permanent_error_for_what_a_retry_cannot_fix(
    retries: Any, request_: dict[str, Any]
) -> None:
    with pytest.raises(retries.PermanentApiError):
        await http_client(retries, 404).call(request_)


async def test_over_http_a_call_is_retried_through_503s_until_it_succeeds(
    krules_app: KRulesTestApp, retries: Any
) -> None:
    retries.api_client = http_client(retries, 503, 503, 200)

    await krules_app.emit("api.call", "weather-api", REQUEST)
    await krules_app.settle()

    assert krules_app.clock.sleeps == [2, 4]
    [succeeded] = krules_app.recorder.of_type("api.call_succeeded")
    assert succeeded.data == {
        "response": {"status": 200, "body": {"status": 200, "echo": None}},
        "retries": 2,
    }


def test_the_default_client_is_the_http_client(retries: Any) -> None:
    assert isinstance(retries.api_client, retries.HttpApiClient)
