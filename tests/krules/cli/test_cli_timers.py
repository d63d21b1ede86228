"""``krules timers list|cancel`` and the timers of ``krules subject show``, on a real redis-server."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from krules.events import Event
from krules.testing.redis_server import LocalRedisServer
from krules.timers import TIMER_EXTENSION, Timer
from storage.base import SubjectChanges
from storage.redis import create_redis_storage
from tests.krules.cli.test_cli import KRulesProcess, assert_one_error_line, krules, krules_env


def schedule(url: str, prefix: str, *timers: tuple[str, str, float]) -> None:
    async def store() -> None:
        storage = create_redis_storage(url, key_prefix=prefix, partitions=2)
        try:
            await storage.store(
                [
                    SubjectChanges(
                        subject,
                        timers={
                            key: Timer(
                                Event(
                                    "ding", subject, {}, f"t-{key}", "t", due, 0, None, {TIMER_EXTENSION: key}
                                )
                            )
                        },
                    )
                    for subject, key, due in timers
                ]
            )
        finally:
            await storage.close()

    asyncio.run(store())


@pytest.mark.redis_server
def test_timers_list_shows_pending_timers_soonest_first_and_cancel_removes_one(
    redis_server: LocalRedisServer, redis_key_prefix: str
) -> None:
    env = krules_env(KRULES_REDIS_URL=redis_server.url, KRULES_KEY_PREFIX=redis_key_prefix)
    schedule(redis_server.url, redis_key_prefix, ("order-1", "payment", 4e9), ("order-2", "payment", 3e9))

    listed = krules("timers", "list", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    assert [(t["subject"], t["key"], t["due"]) for t in json.loads(listed.stdout)] == [
        ("order-2", "payment", "2065-01-24T05:20:00Z"),
        ("order-1", "payment", "2096-10-02T07:06:40Z"),
    ]
    soon = krules("timers", "list", "--json", "--due-before", "2070-01-01T00:00:00Z", env=env)
    assert [t["subject"] for t in json.loads(soon.stdout)] == ["order-2"]
    shown = krules("subject", "show", "order-1", env=env)
    assert [t["key"] for t in json.loads(shown.stdout)["timers"]] == ["payment"]

    cancelled = krules("timers", "cancel", "order-1", "payment", env=env)
    assert cancelled.returncode == 0, cancelled.stderr
    mine = krules("timers", "list", "--json", "--subject", "order-1", env=env)
    assert json.loads(mine.stdout) == []
    again = krules("timers", "cancel", "order-1", "payment", env=env)
    assert "has no pending timer 'payment'" in assert_one_error_line(again, 1)


@pytest.mark.redis_server
def test_a_bad_due_before_is_one_usage_error(redis_server: LocalRedisServer, redis_key_prefix: str) -> None:
    env = krules_env(KRULES_REDIS_URL=redis_server.url, KRULES_KEY_PREFIX=redis_key_prefix)
    assert "is not a time" in assert_one_error_line(
        krules("timers", "list", "--due-before", "soon", env=env), 2
    )


EMBEDDED_RULES = """
import logging
from krules import on

@on("remind.me")
async def remind_me(ctx):
    await ctx.subject.schedule("reminder", after=0.2)

@on("reminder")
async def reminder(ctx):
    logging.getLogger("reminders").warning("reminder fired for %s", ctx.subject.name)
"""


def test_an_embedded_instance_fires_its_timers_and_stops_cleanly(tmp_path: Path) -> None:
    rules = tmp_path / "reminder_rules.py"
    rules.write_text(EMBEDDED_RULES)
    child = KRulesProcess(str(rules), "--port", "0", env=krules_env())
    try:
        url = child.serving_url()
        emitted = krules("emit", "remind.me", "user-1", "--url", url)
        assert emitted.returncode == 0, emitted.stderr
        child.wait_for("reminder fired for user-1")
        assert child.terminate() == 0, child.log
    finally:
        child.close()
