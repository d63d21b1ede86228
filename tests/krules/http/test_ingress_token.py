"""The ingress token guards every route but ``/healthz``, ``/metrics`` included (over a real socket),
and an empty token is a configuration error, never a silently open ingress."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from krules.config import Settings
from krules.errors import ConfigurationError
from krules.http.server import serve_in_background
from krules.testing import KRulesTestApp
from middleware.metrics import MetricsMiddleware, metrics_route

TOKEN = "s3cret-token"


async def served_metrics(app: KRulesTestApp) -> AsyncIterator[str]:
    metrics = MetricsMiddleware()
    app.middleware(metrics)
    app.engine.event_observers.append(metrics.observe_event)
    async with serve_in_background(app.engine, routes=[metrics_route(metrics)]) as server:
        yield server.url


@pytest.fixture
async def guarded() -> AsyncIterator[str]:
    app = KRulesTestApp(settings=Settings(ingress_token=TOKEN))
    async for url in served_metrics(app):
        yield url
    await app.close()


@pytest.fixture
async def open_instance() -> AsyncIterator[str]:
    app = KRulesTestApp()
    async for url in served_metrics(app):
        yield url
    await app.close()


async def test_metrics_need_the_token_when_one_is_set(guarded: str) -> None:
    async with httpx.AsyncClient(timeout=10) as http:
        missing = await http.get(guarded + "/metrics")
        wrong = await http.get(guarded + "/metrics", headers={"authorization": "Bearer nope"})
        right = await http.get(guarded + "/metrics", headers={"authorization": f"Bearer {TOKEN}"})
        health = await http.get(guarded + "/healthz")

    assert (missing.status_code, wrong.status_code) == (401, 401)
    assert missing.headers["www-authenticate"].startswith("Bearer")
    assert "KRULES_INGRESS_TOKEN" in missing.json()["error"]
    assert "krules_" not in missing.text
    assert right.status_code == 200 and "krules_events_received" in right.text
    assert health.status_code == 200


async def test_metrics_are_open_when_no_token_is_set(open_instance: str) -> None:
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.get(open_instance + "/metrics")

    assert response.status_code == 200 and "krules_handler_calls" in response.text


@pytest.mark.parametrize("value", ["", "   "], ids=["empty", "blank"])
def test_an_empty_token_is_a_configuration_error(value: str) -> None:
    with pytest.raises(ConfigurationError, match=r"^KRULES_INGRESS_TOKEN is set but empty"):
        Settings.from_env({"KRULES_INGRESS_TOKEN": value})
    with pytest.raises(ConfigurationError, match="would leave the ingress open to anyone"):
        Settings(ingress_token=value)


@pytest.mark.slow
def test_krules_run_refuses_an_empty_token_in_one_line(tmp_path: Path) -> None:
    rules = tmp_path / "rules.py"
    rules.write_text("from krules import on\n")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path), "KRULES_INGRESS_TOKEN": ""}

    result = subprocess.run(
        [sys.executable, "-m", "krules", "run", str(rules), "--port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 2
    assert result.stderr.startswith("krules: error: KRULES_INGRESS_TOKEN is set but empty")
    assert len(result.stderr.splitlines()) == 1
