"""The CLI end to end on a real Redis Cluster: ``krules run`` with four partitions spread over the
primaries, ``krules emit`` (through the streams and through the ingress), ``krules subject show``,
``krules partitions`` and ``krules dlq list``."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import pytest

from krules.testing.redis_cluster import LocalRedisCluster
from tests.krules.cli.test_cli import START_TIMEOUT, KRulesProcess, krules, krules_env

pytestmark = [pytest.mark.redis_server, pytest.mark.slow]

RULES = '''
"""A rule module served on a Redis Cluster."""
from krules import on


@on("order.placed")
async def record_order(ctx):
    await ctx.subject.set("total", ctx.payload["total"])
    await ctx.subject.set("status", "placed")


@on("order.broken")
async def break_order(ctx):
    raise ValueError("this order cannot be handled")
'''


def shown_status(name: str, env: dict[str, str]) -> str | None:
    shown = krules("subject", "show", name, env=env)
    if shown.returncode != 0:
        return None
    status: str | None = json.loads(shown.stdout)["properties"].get("status")
    return status


def test_run_emit_subject_show_partitions_and_dlq_work_on_a_cluster(
    tmp_path: Path, redis_cluster: LocalRedisCluster, redis_key_prefix: str
) -> None:
    rules = tmp_path / "cluster_rules.py"
    rules.write_text(RULES)
    env = krules_env(
        KRULES_REDIS_URL=redis_cluster.url,
        KRULES_KEY_PREFIX=redis_key_prefix,
        KRULES_PARTITIONS="4",
        KRULES_RETRY_ATTEMPTS="1",
    )
    child = KRulesProcess(str(rules), "--port", "0", env=env)
    try:
        url = child.serving_url()
        with urllib.request.urlopen(f"{url}/healthz", timeout=START_TIMEOUT) as health:
            assert health.status == 200
        names = [f"order-{i}" for i in range(8)]
        for i, name in enumerate(names):
            via = ("--url", url) if i % 2 else ()  # half through the ingress, half straight to the streams
            emitted = krules("emit", "order.placed", name, "--data", json.dumps({"total": i}), *via, env=env)
            assert emitted.returncode == 0, emitted.stderr
        assert krules("emit", "order.broken", "order-99", env=env).returncode == 0

        deadline = time.monotonic() + START_TIMEOUT  # a hang guard, not a timing assertion
        while any(shown_status(name, env) != "placed" for name in names):
            assert time.monotonic() < deadline, child.log
            time.sleep(0.2)
        listed = krules("dlq", "list", "--json", env=env)
        while listed.returncode != 0 or not json.loads(listed.stdout):
            assert time.monotonic() < deadline, listed.stderr
            time.sleep(0.2)
            listed = krules("dlq", "list", "--json", env=env)
        (dead_letter,) = json.loads(listed.stdout)
        assert (dead_letter["subject"], dead_letter["handler"]) == ("order-99", "cluster_rules.break_order")

        partitions = krules("partitions", "--json", env=env)
        assert partitions.returncode == 0, partitions.stderr
        table = json.loads(partitions.stdout)
        assert [row["partition"] for row in table["partitions"]] == [0, 1, 2, 3]
        assert all(row["owner"] is not None for row in table["partitions"])
        assert sum(row["length"] for row in table["partitions"]) >= 9
        assert child.terminate() == 0
    finally:
        child.close()
