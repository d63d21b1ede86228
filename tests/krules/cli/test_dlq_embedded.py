"""Embedded mode's dead letters (in the instance's memory) are bounded by the cap and reachable:
``krules dlq list|show|purge`` ask the running instance over its ``/dead-letters`` routes (a real
socket, behind the ingress token)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import pytest

from krules.cli import main
from krules.config import Settings
from krules.context import EventContext
from krules.dead_letters import DeadLetters
from krules.http.server import serve_in_background
from krules.testing import KRulesTestApp
from middleware.dead_letter import DeadLetterMiddleware

TOKEN = "s3cret-token"


class Served:
    def __init__(self, app: KRulesTestApp, url: str) -> None:
        self.app = app
        self.url = url

    async def fail(self, *subjects: str) -> None:
        for subject in subjects:
            self.app.clock.advance(60)
            await self.app.emit("order.submitted", subject, {"total": 1})


@pytest.fixture
async def served(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Served]:
    for name in ("KRULES_REDIS_URL", "KRULES_KEY_PREFIX", "KRULES_HTTP_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KRULES_INGRESS_TOKEN", TOKEN)  # what the commands send
    app = KRulesTestApp(settings=Settings(ingress_token=TOKEN))
    app.middleware(DeadLetterMiddleware(emit_event=False, max_dead_letters=100))

    @app.on("order.submitted")
    async def charge(ctx: EventContext) -> None:
        raise ConnectionError("payment gateway down")

    async with serve_in_background(app.engine) as server:
        yield Served(app, server.url)
    await app.close()


async def krules(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run ``krules argv...`` (in a thread: the command runs its own event loop); ``(rc, out, err)``."""
    capsys.readouterr()
    code = await asyncio.to_thread(main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


async def test_the_dlq_commands_list_show_and_purge_an_embedded_instances_dead_letters(
    served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    await served.fail("order-1", "order-2", "order-3")
    first, second, third = await DeadLetters(served.app.storage).list()

    code, out, err = await krules(capsys, "dlq", "list", "--url", served.url)
    assert (code, err) == (0, "")
    assert out.splitlines()[0] == f"3 dead letter(s) on {served.url}, oldest first"
    assert [line.split()[0] for line in out.splitlines()[2:]] == [first.id, second.id, third.id]

    code, out, _ = await krules(capsys, "dlq", "show", second.id[:8], "--url", served.url)
    assert code == 0 and json.loads(out)["subject"] == "order-2"

    code, out, _ = await krules(capsys, "dlq", "purge", second.id, "--yes", "--url", served.url)
    assert (code, out) == (0, f"Deleted dead letter {second.id}.\n")
    code, out, _ = await krules(capsys, "dlq", "list", "--json", "--url", served.url)
    assert [r["id"] for r in json.loads(out)] == [first.id, third.id]

    code, out, _ = await krules(capsys, "dlq", "purge", "--older-than", "1m", "--yes", "--url", served.url)
    assert (code, out) == (0, "Deleted 1 dead letter(s) that failed more than 1m ago.\n")
    code, out, _ = await krules(capsys, "dlq", "purge", "--yes", "--url", served.url)
    assert (code, out) == (0, "Deleted 1 dead letter(s).\n")
    assert await DeadLetters(served.app.storage).list() == []
    assert await served.app.storage.subjects() == []  # nothing left in memory


async def test_the_dead_letter_routes_need_the_token_and_answer_in_one_sentence(served: Served) -> None:
    await served.fail("order-1")
    (record,) = await DeadLetters(served.app.storage).list()
    auth = {"authorization": f"Bearer {TOKEN}"}

    async with httpx.AsyncClient(base_url=served.url, timeout=10) as http:
        refused = await http.get("/dead-letters")
        purge_refused = await http.delete("/dead-letters")
        listed = await http.get("/dead-letters", params={"reason": "error", "since": 0}, headers=auth)
        missing = await http.get("/dead-letters/ffffffffffffffff", headers=auth)
        bad = await http.get("/dead-letters", params={"since": "yesterday"}, headers=auth)
        deleted = await http.delete(f"/dead-letters/{record.id}", headers=auth)

    assert (refused.status_code, purge_refused.status_code) == (401, 401)
    assert [r["name"] for r in listed.json()["dead_letters"]] == [record.name]
    assert missing.status_code == 404 and missing.json()["error"].startswith("There is no dead letter")
    assert bad.status_code == 400 and bad.json() == {
        "error": "The query parameter since='yesterday' is not a number of seconds."
    }
    assert deleted.json() == {"deleted": [record.name]}


async def test_an_embedded_instance_keeps_at_most_its_cap_of_dead_letters(served: Served) -> None:
    await served.fail(*(f"order-{n}" for n in range(250)))

    records = await DeadLetters(served.app.storage).list()
    assert 90 <= len(records) <= 100
    assert records[-1].subject == "order-249"
    stored = await served.app.storage.subjects("dlq-")
    assert len(stored) == len(records) + 1  # the dead letters and their index, nothing more
