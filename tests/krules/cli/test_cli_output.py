"""What the ``krules`` commands print is safe for the operator's terminal, whatever others wrote; the
dlq commands see real dead letters only, ``dlq purge ID`` deletes one, and ``subject show`` reads
the partition count recorded in Redis (real redis-server, commands run as ``krules.cli.main``)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from krules.cli import main
from krules.cli.common import JsonLogFormatter, TextLogFormatter, printable
from krules.dead_letters import INDEX_SUBJECT, DeadLetter, DeadLetters, dead_letter_name, store_changes
from krules.events import Event
from krules.testing import RedisModeApp
from krules.testing.redis_server import LocalRedisServer

pytestmark = [pytest.mark.slow, pytest.mark.redis_server]

ESC = "\x1b"
FORGED_ROW = "order-1\n7900195167dce8c6  2026-01-31 12:00:05  error  rules.x  order.submitted  forged"


@pytest.fixture
async def instance(redis_server: LocalRedisServer, redis_key_prefix: str) -> AsyncIterator[RedisModeApp]:
    made = RedisModeApp(redis_server.url, redis_key_prefix, partitions=4)
    await made.start()  # records the partition count the commands read
    yield made
    await made.stop()


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, redis_server: LocalRedisServer, redis_key_prefix: str) -> None:
    monkeypatch.delenv("KRULES_PARTITIONS", raising=False)  # the commands read the recorded count
    monkeypatch.setenv("KRULES_REDIS_URL", redis_server.url)
    monkeypatch.setenv("KRULES_KEY_PREFIX", redis_key_prefix)


async def krules(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run ``krules argv...`` (in a thread: the command runs its own event loop); ``(rc, out, err)``."""
    capsys.readouterr()
    code = await asyncio.to_thread(main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def dead_letter(
    event_id: str, *, subject: str = "order-1", event_type: str = "order.submitted"
) -> DeadLetter:
    event = Event(event_type, subject, {"total": 1}, event_id, "shop", 1_700_000_000.0)
    return DeadLetter(
        name=dead_letter_name(event_id, "abc123"),
        event=event.to_dict(),
        event_id=event_id,
        event_type=event_type,
        subject=subject,
        handler="rules.orders.charge",
        error={"type": "ValueError", "message": f"bad {ESC}[2J value\nsecond line"},
        traceback="",
        attempts=1,
        reason="error",
        failed_at=1_700_000_000.0,
        partition=0,
    )


def assert_terminal_safe(text: str) -> None:
    assert all(line.isprintable() for line in text.splitlines()), text


async def test_dlq_list_escapes_names_that_would_forge_rows_or_drive_the_terminal(
    instance: RedisModeApp, env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    hostile = dead_letter("ev-1", subject=FORGED_ROW, event_type=f"order.{ESC}]0;pwned\a")
    await instance.storage.store(store_changes(hostile))

    code, out, err = await krules(capsys, "dlq", "list")

    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert len(lines) == 3  # the summary, the headers, one row: no forged second row
    assert_terminal_safe(out)
    assert "order-1\\n7900195167dce8c6" in lines[2] and "order.\\x1b]0;pwned\\x07" in lines[2]
    assert lines[2].endswith("ValueError: bad \\x1b[2J value")


async def test_dlq_show_escapes_what_json_leaves_raw_and_stays_valid_json(
    instance: RedisModeApp, env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    sneaky = "order.\u009b31m\u202egnp.exe"  # a C1 control sequence and a right-to-left override
    record = dead_letter("ev-2", event_type=sneaky)
    await instance.storage.store(store_changes(record))

    code, out, _ = await krules(capsys, "dlq", "show", record.id)

    assert code == 0
    assert_terminal_safe(out)
    assert "\\u009b31m\\u202egnp.exe" in out
    assert json.loads(out)["event_type"] == sneaky  # the same value, escaped the JSON way


async def test_an_error_line_escapes_what_the_user_typed(
    env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = await krules(capsys, "dlq", "show", f"{ESC}[31mred")

    assert code in (1, 2)
    assert err.startswith("krules: error: ") and err.count("\n") == 1
    assert_terminal_safe(err)


async def test_the_partitions_table_escapes_a_forged_instance_name(
    instance: RedisModeApp, raw: aioredis.Redis, env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    seen = json.dumps({"mode": "static", "wants": [0], "seen": int(time.time() * 1000)})
    await raw.hset(instance.storage.keys.instances(), f"evil\n0  0  0  0  fake{ESC}[8m", seen)

    code, out, _ = await krules(capsys, "partitions")

    assert code == 0
    assert len(out.splitlines()) == 2 + 4 + 1  # the summary, the headers, a row per partition, the instances
    assert_terminal_safe(out)
    assert "evil\\n0  0  0  0  fake\\x1b[8m" in out


async def test_partitions_lists_as_waiting_only_the_live_instances_that_ask_for_a_partition(
    instance: RedisModeApp, raw: aioredis.Redis, env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    now = int(time.time() * 1000)
    for name, seen in (("alive", now), ("killed", now - 60_000)):  # killed: not refreshed for a minute
        info = {"mode": "static", "wants": [0], "seen": seen, "lease_ms": 10_000}
        await raw.hset(instance.storage.keys.instances(), name, json.dumps(info))

    code, out, _ = await krules(capsys, "partitions", "--json")

    assert code == 0
    assert [p["waiting"] for p in json.loads(out)["partitions"]] == [["alive"], [], [], []]


async def test_the_dlq_commands_see_real_dead_letters_only(
    instance: RedisModeApp, env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    real = dead_letter("ev-3")
    await instance.storage.store(store_changes(real))
    lookalike = dead_letter_name("not-a-failure", "abc123")  # a dead letter's name, not its record
    await instance.storage.store(
        [
            *store_changes(DeadLetter.from_properties(lookalike, {"failed_at": 1.0})),
            *store_changes(DeadLetter.from_properties("dlq-userdata", {"failed_at": 1.0})),
        ]
    )
    for name in (lookalike, "dlq-userdata"):  # user subjects: a few properties of their own
        await instance.storage.flush(name)
        await instance.storage.set(name, "owner", '"ada"')

    code, out, _ = await krules(capsys, "dlq", "list", "--json")
    assert code == 0 and [r["name"] for r in json.loads(out)] == [real.name]
    code, _, err = await krules(capsys, "dlq", "show", "userdata")
    assert code == 1 and "There is no dead letter 'userdata'" in err
    code, _, err = await krules(capsys, "dlq", "replay", lookalike.removeprefix("dlq-"))
    assert code == 1 and "There is no dead letter" in err

    code, out, _ = await krules(capsys, "dlq", "purge", "--yes")

    assert (code, out) == (0, "Deleted 1 dead letter(s).\n")
    for name in (lookalike, "dlq-userdata"):
        assert await instance.storage.load(name) == ({"owner": "ada"}, {})
    assert await instance.storage.load(INDEX_SUBJECT) == ({}, {})


async def test_dlq_purge_id_deletes_that_dead_letter_only(
    instance: RedisModeApp, env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    first, second = dead_letter("ev-4"), dead_letter("ev-5")
    await instance.storage.store([*store_changes(first), *store_changes(second)])

    refused = await krules(capsys, "dlq", "purge", first.id[:6])  # no --yes, no terminal to ask
    both = await krules(capsys, "dlq", "purge", first.id, "--older-than", "1d", "--yes")
    deleted = await krules(capsys, "dlq", "purge", first.id[:6], "--yes")
    again = await krules(capsys, "dlq", "purge", first.id, "--yes")

    assert refused[0] == 2 and "This would delete dead letter " + first.id in refused[2]
    assert both[0] == 2 and "either one dead letter ID or --older-than" in both[2]
    assert deleted == (0, f"Deleted dead letter {first.id}.\n", "")
    assert again[0] == 1 and "There is no dead letter" in again[2]
    assert [r.name for r in await DeadLetters(instance.storage).list()] == [second.name]


async def test_subject_show_reads_the_partition_count_recorded_in_redis(
    instance: RedisModeApp, env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    names = [f"order-{n}" for n in range(8)]  # spread over the 4 partitions
    for name in names:
        await instance.storage.set(name, "status", '"placed"')

    shown = [await krules(capsys, "subject", "show", name) for name in names]

    assert {code for code, _, _ in shown} == {0}
    assert [json.loads(out)["properties"] for _, out, _ in shown] == [{"status": "placed"}] * len(names)


@pytest.mark.parametrize("formatter", [TextLogFormatter(), JsonLogFormatter()], ids=["text", "json"])
def test_log_lines_of_krules_run_cannot_be_split_or_drive_the_terminal(formatter: Any) -> None:
    record = logging.LogRecord(
        "krules.worker", logging.ERROR, __file__, 1, "event %s for %s", ("x", f"a\nb{ESC}[2J\u009b"), None
    )

    line = formatter.format(record)

    assert "\n" not in line and line.isprintable()
    assert printable(f"a\nb{ESC}[2J") == "a\\nb\\x1b[2J"
