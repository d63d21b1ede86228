"""Redis mode under faults, as real ``krules run`` processes on a real redis-server.

The instances serve :mod:`counter_rules` (beside this file): every ``count.inc`` adds one to its
subject's ``count`` and, through a ``count.total`` event that may cross partitions, one to a
``total-<k>`` subject's.  Counters are exact only if no event was lost and none was applied twice,
so each test ends by comparing every counter with the number of events sent to it: after an
instance is killed with SIGKILL and restarted, with two instances sharing the partitions, across a
crash and restart of the Redis server itself (quick, and longer than the instances' retry budget),
across a graceful SIGTERM, and after a client sends the same events (same ids) again.  The
instances take their partitions as a deployment does by default (``KRULES_PARTITION_ID=auto``);
the kill and the Redis crash are tried with static ids (``all``, ``0,1`` and ``2,3``) too.

Progress is read straight from Redis (counters, the partitions' consumer group, the processed-id
sets) and waited for with deadlines; the deadlines are guards against a hang, never the assertion.
The harness (instances, deployment, waiting) is :mod:`processes`'s, beside this file.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from krules.partitioning import partition_of
from krules.testing.redis_server import LocalRedisServer
from tests.krules.processes import (
    FINISH_TIMEOUT,
    REPO,
    START_TIMEOUT,
    Deployment,
    Instance,
    assert_clean_exit,
    instance_env,
    partitions_status,
    wait_finished,
    wait_until,
)

pytestmark = [pytest.mark.slow, pytest.mark.redis_server]

RULES = Path(__file__).with_name("counter_rules.py")
FLAKY_RULES = Path(__file__).with_name("flaky_rules.py")

EVENTS = 3000
"""``count.inc`` events per test: enough to catch an instance mid-stream on a fast machine."""
SUBJECTS = 40
GROUPS = 6
"""How many ``total-<k>`` subjects the events are counted into."""

StartInstance = Callable[[dict[str, str], Path], Instance]
MakeDeployment = Callable[..., "CounterDeployment"]


# -- the counters, read from Redis ---------------------------------------------------------------
class CounterDeployment(Deployment):
    """A deployment serving :mod:`counter_rules`: the counters it must end with, and those it has."""

    def __init__(self, url: str, prefix: str, partitions: int) -> None:
        super().__init__(url, prefix, partitions)
        self.specs: list[dict[str, Any]] = []
        """The ``count.inc`` events sent, as given to ``emit_batch``, with their ids."""
        self.sent: dict[str, list[str]] = {}
        """Event ids of the ``count.inc`` events sent, by subject."""
        self.expected: Counter[str] = Counter()
        """The count every subject must end with."""

    # sending
    def send_counts(self, events: int = EVENTS) -> None:
        """Queue ``events`` ``count.inc`` events over SUBJECTS subjects and GROUPS totals."""
        specs: list[dict[str, Any]] = [
            {"type": "count.inc", "subject": f"c-{i % SUBJECTS}", "data": {"k": i % GROUPS}}
            for i in range(events)
        ]
        for spec, event_id in zip(specs, self.emit(specs), strict=True):
            self.sent.setdefault(spec["subject"], []).append(event_id)
            self.specs.append({**spec, "id": event_id})
            self.expected[spec["subject"]] += 1
            self.expected[f"total-{spec['data']['k']}"] += 1

    def send_again(self) -> None:
        """Queue every event sent so far once more, with the same ids (as a client retrying would)."""
        self.emit(self.specs)

    # reading
    def subjects(self) -> list[str]:
        return sorted(self.expected)

    def counts(self) -> dict[str, int]:
        """Every subject's stored ``count`` (0 when it has none yet)."""
        pipe = self.redis.pipeline(transaction=False)
        names = self.subjects()
        for name in names:
            pipe.hget(self.keys.subject(name), "p:count")
        return {
            name: 0 if raw is None else json.loads(raw)
            for name, raw in zip(names, pipe.execute(), strict=True)
        }

    def counted(self) -> int:
        """How many ``count.inc`` events have been counted on their subjects so far."""
        try:
            return sum(n for name, n in self.counts().items() if name.startswith("c-"))
        except redis.ConnectionError:
            return 0

    def committed(self) -> dict[str, int]:
        """How many of each subject's ``count.inc`` events are marked processed by its partition."""
        out = {}
        for subject, ids in self.sent.items():
            scores = self.redis.zmscore(self.keys.processed(self.keys.partition(subject)), ids)
            out[subject] = sum(score is not None for score in scores)
        return out

    def progress(self) -> str:
        return f"counted {self.counted()} of {sum(len(ids) for ids in self.sent.values())} events"

    # the verdicts
    def assert_counts_exact(self) -> None:
        """Every subject's count is the number of events sent to it: none lost, none doubled."""
        counts = self.counts()
        wrong = {name: (counts[name], want) for name, want in self.expected.items() if counts[name] != want}
        dead = self.dead_letters()
        assert not wrong, (
            f"(stored, expected) counts differ for {len(wrong)} subject(s), {dead} dead letter(s): {wrong}"
        )
        assert dead == 0

    def assert_counts_match_commits(self) -> None:
        """A stopped deployment stored a subject's increments exactly for the events it marked processed."""
        counts, committed = self.counts(), self.committed()
        wrong = {s: (counts[s], committed[s]) for s in self.sent if counts[s] != committed[s]}
        assert not wrong, f"(stored count, events committed) differ for {len(wrong)} subject(s): {wrong}"
        for k in range(GROUPS):
            assert counts[f"total-{k}"] <= self.expected[f"total-{k}"]


def wait_partly_counted(deployment: CounterDeployment, instances: list[Instance]) -> None:
    """Wait until some tenth of the events are counted: the instances are in mid-stream then."""
    wait_until(
        lambda: deployment.counted() >= EVENTS // 10,
        FINISH_TIMEOUT,
        "counting the first events",
        lambda: "\n".join([deployment.describe(), *(i.describe() for i in instances)]),
    )


# -- the tests -------------------------------------------------------------------------------------
@pytest.mark.parametrize("partition_id", ["auto", "all"])
def test_an_instance_killed_mid_stream_and_restarted_loses_and_doubles_nothing(
    partition_id: str,
    redis_server: LocalRedisServer,
    redis_key_prefix: str,
    start_instance: StartInstance,
    deployment_factory: MakeDeployment,
) -> None:
    env = instance_env(
        redis_server.url, redis_key_prefix, partitions=4, partition_id=partition_id, consumer="killed"
    )
    deployment = deployment_factory(redis_server.url, redis_key_prefix, 4, CounterDeployment)
    first = start_instance(env, RULES)
    first.wait_reading()
    deployment.send_counts()
    wait_partly_counted(deployment, [first])

    first.kill()

    assert deployment.counted() < EVENTS, "the instance finished before it could be killed mid-stream"
    deployment.assert_counts_match_commits()  # each turn's writes and its processed mark: both or neither
    second = start_instance(env, RULES)  # takes the partitions over when the killed one's leases expire
    wait_finished(deployment, second)
    deployment.assert_counts_exact()
    assert [(p["pending"], p["lag"]) for p in partitions_status(env)["partitions"]] == [(0, 0)] * 4
    assert_clean_exit(second)


def test_two_instances_each_handle_only_their_partitions_and_together_all_of_them(
    redis_server: LocalRedisServer,
    redis_key_prefix: str,
    start_instance: StartInstance,
    deployment_factory: MakeDeployment,
) -> None:
    owners = ("0,1", "2,3")
    instances = [
        start_instance(
            instance_env(
                redis_server.url, redis_key_prefix, partitions=4, partition_id=spec, consumer=f"owner-{n}"
            ),
            RULES,
        )
        for n, spec in enumerate(owners)
    ]
    for instance in instances:
        instance.wait_reading()
    deployment = deployment_factory(redis_server.url, redis_key_prefix, 4, CounterDeployment)

    deployment.send_counts()
    wait_finished(deployment, *instances)

    deployment.assert_counts_exact()
    handled_by = {name: deployment.prop(name, "handled_by") for name in deployment.subjects()}
    owner_of = {name: owners[partition_of(name, 4) // 2] for name in deployment.subjects()}
    assert handled_by == {name: [owner] for name, owner in owner_of.items()}
    assert set(owner_of.values()) == set(owners)  # both instances had subjects to handle
    for instance in instances:
        assert_clean_exit(instance)


@pytest.mark.parametrize("owners", [("auto", "auto"), ("0,1", "2,3")], ids=["auto", "static"])
def test_instances_reconnect_after_a_redis_crash_and_restart_and_finish_exactly(
    owners: tuple[str, str],
    redis_server_factory: Callable[..., LocalRedisServer],
    redis_key_prefix: str,
    start_instance: StartInstance,
    deployment_factory: MakeDeployment,
) -> None:
    server = redis_server_factory(persistent=True)
    instances = [
        start_instance(
            instance_env(
                server.url, redis_key_prefix, partitions=4, partition_id=spec, consumer=f"owner-{n}"
            ),
            RULES,
        )
        for n, spec in enumerate(owners)
    ]
    for instance in instances:
        instance.wait_reading()
    deployment = deployment_factory(server.url, redis_key_prefix, 4, CounterDeployment)
    deployment.send_counts()
    wait_partly_counted(deployment, instances)

    server.restart(kill=True)

    wait_finished(deployment, *instances)
    deployment.assert_counts_exact()
    if "auto" not in owners:  # static ids: each subject was handled by its partition's instance only
        for name in deployment.subjects():
            assert deployment.prop(name, "handled_by") == [owners[partition_of(name, 4) // 2]]
    for instance in instances:
        assert_clean_exit(instance)


def test_a_redis_outage_longer_than_the_retry_budget_loses_no_event(
    redis_server_factory: Callable[..., LocalRedisServer],
    redis_key_prefix: str,
    start_instance: StartInstance,
    deployment_factory: MakeDeployment,
) -> None:
    server = redis_server_factory(persistent=True)
    env = instance_env(server.url, redis_key_prefix, partitions=4, partition_id="auto", consumer="outage")
    deployment = deployment_factory(server.url, redis_key_prefix, 4, CounterDeployment)
    instance = start_instance(env, RULES)
    instance.wait_reading()
    deployment.send_counts()
    wait_partly_counted(deployment, [instance])

    # Redis stays down until the instance gives up on a call (its retry budget is spent), and as
    # long again; every event must still be counted once: a turn whose storage calls failed must
    # stay pending, not be committed as processed without its writes.
    crashed = time.monotonic()
    server.stop(kill=True)
    wait_until(
        lambda: re.search(r"could not .* after \d+ attempts", instance.log) is not None,
        FINISH_TIMEOUT,
        "the instance giving up on a Redis call",
        instance.describe,
    )
    time.sleep(time.monotonic() - crashed)  # down as long again: the calls begun at the crash give up too
    server.start()

    wait_finished(deployment, instance)
    deployment.assert_counts_exact()
    assert instance.terminate() == 0, instance.describe()


def test_an_instance_with_a_different_partition_count_refuses_with_one_error_line(
    redis_server: LocalRedisServer,
    redis_key_prefix: str,
    start_instance: StartInstance,
) -> None:
    first = start_instance(
        instance_env(redis_server.url, redis_key_prefix, partitions=4, partition_id="auto", consumer="four"),
        RULES,
    )
    first.wait_reading()
    env = instance_env(redis_server.url, redis_key_prefix, partitions=2, partition_id="auto", consumer="two")

    second = subprocess.run(
        [sys.executable, "-m", "krules", "run", str(RULES)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert second.returncode != 0
    assert "Traceback" not in second.stderr, second.stderr
    errors = [line for line in second.stderr.splitlines() if line.startswith("krules: error: ")]
    assert errors == second.stderr.strip().splitlines()[-1:], second.stderr
    assert re.search(r"has 4 partitions.*KRULES_PARTITIONS=2", errors[0]), errors[0]
    assert first.running
    assert_clean_exit(first)


def test_sigterm_mid_stream_exits_0_having_committed_consistently_and_a_restart_finishes(
    redis_server: LocalRedisServer,
    redis_key_prefix: str,
    start_instance: StartInstance,
    deployment_factory: MakeDeployment,
) -> None:
    env = instance_env(
        redis_server.url, redis_key_prefix, partitions=4, partition_id="auto", consumer="stopped"
    )
    deployment = deployment_factory(redis_server.url, redis_key_prefix, 4, CounterDeployment)
    first = start_instance(env, RULES)
    first.wait_reading()
    deployment.send_counts()
    wait_partly_counted(deployment, [first])

    code = first.terminate()

    assert code == 0, first.describe()
    assert "krules stopped by SIGTERM" in first.log
    assert "Traceback" not in first.log, first.describe()
    assert deployment.counted() < EVENTS, "the instance finished before SIGTERM could stop it mid-stream"
    deployment.assert_counts_match_commits()
    assert deployment.owners() == dict.fromkeys(range(4)), "a stopped instance released its partitions"
    second = start_instance(env, RULES)
    wait_finished(deployment, second)
    deployment.assert_counts_exact()
    assert_clean_exit(second)


def test_events_sent_again_with_the_same_ids_are_dropped_not_counted_twice(
    redis_server: LocalRedisServer,
    redis_key_prefix: str,
    start_instance: StartInstance,
    deployment_factory: MakeDeployment,
) -> None:
    env = instance_env(
        redis_server.url, redis_key_prefix, partitions=4, partition_id="auto", consumer="resent"
    )
    deployment = deployment_factory(redis_server.url, redis_key_prefix, 4, CounterDeployment)
    instance = start_instance(env, RULES)
    instance.wait_reading()
    deployment.send_counts(EVENTS // 3)
    wait_finished(deployment, instance)
    deployment.assert_counts_exact()

    deployment.send_again()

    wait_finished(deployment, instance)
    deployment.assert_counts_exact()
    assert_clean_exit(instance)


def test_a_retry_in_progress_when_the_instance_is_killed_is_not_lost_and_the_work_is_done_once(
    redis_server: LocalRedisServer,
    redis_key_prefix: str,
    start_instance: StartInstance,
    deployment_factory: MakeDeployment,
    tmp_path: Path,
) -> None:
    switch, attempts = tmp_path / "downstream-unavailable", tmp_path / "attempts.log"
    switch.touch()
    env = instance_env(
        redis_server.url,
        redis_key_prefix,
        partitions=2,
        partition_id="auto",
        consumer="crashed",
        FLAKY_SWITCH=str(switch),
        FLAKY_ATTEMPTS=str(attempts),
        KRULES_RETRY_MAX_ATTEMPTS="100",
    )
    deployment = deployment_factory(redis_server.url, redis_key_prefix, 2, CounterDeployment)
    first = start_instance(env, FLAKY_RULES)
    first.wait_reading()
    (event_id,) = deployment.emit([{"type": "work.requested", "subject": "job-1"}])

    def attempts_by(instance: Instance) -> int:
        lines = attempts.read_text().splitlines() if attempts.exists() else []
        assert all(line.endswith(f" {event_id}") for line in lines), lines
        return sum(line.startswith(f"{instance.process.pid} ") for line in lines)

    wait_until(lambda: attempts_by(first) >= 2, START_TIMEOUT, "two failed attempts", first.describe)
    first.kill()  # in the back-off between two attempts, or in an attempt

    assert deployment.prop("job-1", "done") is None
    assert deployment.unfinished(), "the event was acknowledged although it never succeeded"
    switch.unlink()  # the downstream is back
    second = start_instance({**env, "KRULES_CONSUMER": "rescuer"}, FLAKY_RULES)  # claims the dead one's entry
    wait_finished(deployment, second)

    assert deployment.prop("job-1", "done") == 1
    assert attempts_by(second) == 1
    assert deployment.dead_letters() == 0
    assert_clean_exit(second)
