"""Timers of real ``krules run`` processes killed with SIGKILL while timers come due: on restart
each timer fires exactly once, in due order per subject.  Deadlines only guard against a hang."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from krules.testing.redis_server import LocalRedisServer
from tests.krules.processes import (
    FINISH_TIMEOUT,
    Deployment,
    Instance,
    assert_clean_exit,
    instance_env,
    wait_finished,
    wait_until,
)

RULES = Path(__file__).with_name("timer_rules.py")
SUBJECTS, TIMERS = 40, 25  # 1,000 timers, due over about two seconds
SHORT_LEASE = {"KRULES_LEASE_MS": "1500", "KRULES_LEASE_RENEW_MS": "300"}


@pytest.fixture
def deployment(
    redis_server: LocalRedisServer, redis_key_prefix: str, deployment_factory: Callable[..., Deployment]
) -> Deployment:
    return deployment_factory(redis_server.url, redis_key_prefix, 4)


def plan_timers_then_kill(deployment: Deployment, victim: Instance, *, spacing: float) -> list[str]:
    """Plan ``TIMERS`` timers on each of ``SUBJECTS`` subjects (due from 0.5 s on, ``spacing`` s
    apart), let 200 fire, then kill ``victim`` with SIGKILL while the rest are due; the subjects."""
    subjects = [f"device-{n}" for n in range(SUBJECTS)]
    deployment.emit(
        [
            {"type": "timers.plan", "subject": s, "data": {"start": 0.5, "spacing": spacing, "count": TIMERS}}
            for s in subjects
        ]
    )
    wait_until(
        lambda: deployment.committed_total() >= SUBJECTS + 200,
        FINISH_TIMEOUT,
        "200 timers fired",
        deployment.describe,
    )
    victim.kill()
    assert deployment.committed_total() < SUBJECTS * (1 + TIMERS), "every timer fired before the kill"
    return subjects


def fired_keys(deployment: Deployment, subject: str) -> list[str]:
    """The keys of ``subject``'s timers that fired, in the order handled."""
    return deployment.prop(subject, "fired") or []


def test_an_instance_killed_while_timers_come_due_leaves_each_to_fire_once_in_order_after_restart(
    redis_server: LocalRedisServer,
    redis_key_prefix: str,
    deployment: Deployment,
    start_instance: Callable[[dict[str, str], Path], Instance],
) -> None:
    def start(name: str) -> Instance:
        env = instance_env(
            redis_server.url, redis_key_prefix, partitions=4, partition_id="all", consumer=name, **SHORT_LEASE
        )
        instance = start_instance(env, RULES)
        instance.wait_reading()
        return instance

    victim = start("victim")
    subjects = plan_timers_then_kill(deployment, victim, spacing=0.08)

    survivor = start("survivor")

    wait_until(
        lambda: (
            sum(len(fired_keys(deployment, s)) for s in subjects) >= SUBJECTS * TIMERS
            and not any(deployment.redis.zcard(deployment.keys.timers(p)) for p in range(4))
        ),
        FINISH_TIMEOUT,
        "every timer fired",
        lambda: f"{deployment.describe()}\n{survivor.describe()}",
    )
    wait_finished(deployment, survivor)
    expected = [f"k{i}" for i in range(TIMERS)]
    assert {s: fired_keys(deployment, s) for s in subjects} == dict.fromkeys(subjects, expected)
    assert deployment.dead_letters() == 0
    assert_clean_exit(survivor)


def test_timers_of_a_killed_instances_partitions_fire_once_at_the_instance_that_takes_them_over(
    redis_server: LocalRedisServer,
    redis_key_prefix: str,
    deployment_factory: Callable[..., Deployment],
    start_instance: Callable[[dict[str, str], Path], Instance],
) -> None:
    deployment = deployment_factory(redis_server.url, redis_key_prefix, 8)

    def start(name: str) -> Instance:
        env = instance_env(
            redis_server.url,
            redis_key_prefix,
            partitions=8,
            partition_id="auto",
            consumer=name,
            **SHORT_LEASE,
        )
        instance = start_instance(env, RULES)
        instance.wait_reading()
        return instance

    victim, survivor = start("victim"), start("survivor")
    wait_until(
        lambda: set(deployment.owners().values()) == {"victim", "survivor"},
        FINISH_TIMEOUT,
        "both instances owning partitions",
        deployment.describe,
    )
    subjects = plan_timers_then_kill(deployment, victim, spacing=0.1)

    wait_until(
        lambda: sum(len(fired_keys(deployment, s)) for s in subjects) >= SUBJECTS * TIMERS,
        FINISH_TIMEOUT,
        "every timer fired",
        lambda: f"{deployment.describe()}\n{survivor.describe()}",
    )
    wait_finished(deployment, survivor)
    assert set(deployment.owners().values()) == {"survivor"}
    expected = [f"k{i}" for i in range(TIMERS)]
    assert {s: fired_keys(deployment, s) for s in subjects} == dict.fromkeys(subjects, expected)
    assert_clean_exit(survivor)
