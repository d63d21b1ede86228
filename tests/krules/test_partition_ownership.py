"""Each partition owned by exactly one instance, as real ``krules run`` processes on a real redis-server.

The instances serve :mod:`order_rules` (beside this file): every ``seq.step`` appends its number to
its subject's ``seen`` list, and each subject's steps are sent in increasing order, so a subject
whose list is not ``[0, 1, 2, ...]`` lost a step, applied one twice, or ran two out of order, as two
instances reading one partition at once would.  The tests start, stop, kill and pause instances
while the steps are processed: three ``auto`` instances split eight partitions evenly; a run scales
from one instance to three and back to one; an instance is killed, and its partitions resume
elsewhere once its leases expire; an owner paused past its lease comes back to find its commits
refused by the fencing token; a second instance asking for the same static id waits, then takes
over; and another process opening the storage without a partition count reads and writes the
engine's subjects.

Ownership is read straight from Redis (the lease keys, the instances' registrations) and from
``krules partitions --json``; progress from the partitions' consumer groups and processed-id sets.
Deadlines only guard against a hang (how soon a killed instance's partitions resume is a measured
figure, not an assertion: a loaded machine may be slower).  The harness (instances, deployment,
waiting) is :mod:`processes`'s, beside this file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator, Callable
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from dependency_injector import providers

from krules import KRulesContainer
from krules.partitioning import partition_of
from krules.testing.redis_cluster import LocalRedisCluster
from krules.testing.redis_server import LocalRedisServer
from storage.redis import create_redis_storage
from tests.krules.processes import (
    FINISH_TIMEOUT,
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

RULES = Path(__file__).with_name("order_rules.py")

SUBJECTS = 50
SHORT_LEASE = {"KRULES_LEASE_MS": "3000", "KRULES_LEASE_RENEW_MS": "500"}
"""A lease time for the tests that wait for one to expire (the default is 10 s)."""
StartInstance = Callable[[dict[str, str], Path], Instance]
MakeDeployment = Callable[..., "StepsDeployment"]


# -- the steps, sent and read back -----------------------------------------------------------------
def out_of_order(seen: list[int]) -> int:
    """How many steps of a ``seen`` list come after a later one."""
    return sum(b < a for a, b in pairwise(seen))


class StepsDeployment(Deployment):
    """A deployment serving :mod:`order_rules`: the steps sent to each subject, those it applied."""

    def __init__(self, url: str, prefix: str, partitions: int) -> None:
        super().__init__(url, prefix, partitions)
        self.subjects = [f"s-{k}" for k in range(SUBJECTS)]
        self.sent = dict.fromkeys(self.subjects, 0)
        """How many steps each subject was sent: steps 0 to sent - 1, in that order."""
        self._sender: threading.Thread | None = None
        self._sender_error: BaseException | None = None
        self._stop_sending = threading.Event()

    # sending
    def send_steps(self, rounds: int) -> None:
        """Send ``rounds`` more steps to every subject (round after round, one step per subject)."""
        specs: list[dict[str, Any]] = []
        for _ in range(rounds):
            for name in self.subjects:
                specs.append({"type": "seq.step", "subject": name, "data": {"i": self.sent[name]}})
                self.sent[name] += 1
        self.emit(specs)

    def send_steps_in_background(self, rounds: int, *, chunk: int, ahead: int) -> None:
        """Send ``rounds`` more steps to every subject from a thread, ``chunk`` rounds at a time, each
        chunk once no more than ``ahead`` steps sent are left uncommitted (so the run lasts as long
        as the instances take, whatever their speed)."""

        def send() -> None:
            try:
                left = rounds
                while left and not self._stop_sending.is_set():
                    if self.committed_total() < self.total_sent() - ahead:
                        self._stop_sending.wait(0.02)
                        continue
                    self.send_steps(min(chunk, left))
                    left -= min(chunk, left)
            except BaseException as exc:  # handed to the test by finish_sending
                self._sender_error = exc

        self._sender = threading.Thread(target=send, name="steps-sender", daemon=True)
        self._sender.start()

    def finish_sending(self, *instances: Instance) -> None:
        """Wait until the background sender has sent everything (all instances staying alive)."""
        sender = self._sender
        assert sender is not None

        def done() -> bool:
            dead = [i for i in instances if not i.running]
            if dead:
                pytest.fail("krules run ended while processing\n" + "\n".join(i.describe() for i in dead))
            return not sender.is_alive()

        wait_until(done, FINISH_TIMEOUT, "sending every step", self.describe)
        if self._sender_error is not None:
            raise self._sender_error

    def close(self) -> None:
        self._stop_sending.set()
        if self._sender is not None:
            self._sender.join()
        super().close()

    # reading
    def total_sent(self) -> int:
        return sum(self.sent.values())

    def seen(self) -> dict[str, list[int]]:
        """Each subject's applied steps, in the order applied."""
        pipe = self.redis.pipeline(transaction=False)
        for name in self.subjects:
            pipe.hget(self.keys.subject(name), "p:seen")
        return {
            name: [] if raw is None else json.loads(raw)
            for name, raw in zip(self.subjects, pipe.execute(), strict=True)
        }

    def handled_by(self) -> dict[str, list[str]]:
        """Each subject's instances that applied one of its steps."""
        return {name: self.prop(name, "handled_by") or [] for name in self.subjects}

    def committed_in(self, partitions: set[int]) -> int:
        """How many events ``partitions`` have committed."""
        return sum(int(self.redis.zcard(self.keys.processed(p))) for p in partitions)

    def progress(self) -> str:
        return f"{self.committed_total()} of {self.total_sent()} steps committed"

    # the verdict
    def assert_every_step_applied_once_in_order(self) -> None:
        """Each subject applied exactly the steps sent to it, once each, in the order sent."""
        seen = self.seen()
        wrong = {
            name: _what_is_wrong(seen[name], sent)
            for name, sent in self.sent.items()
            if seen[name] != list(range(sent))
        }
        late = sum(out_of_order(steps) for steps in seen.values())
        assert not wrong, f"{len(wrong)} subject(s) differ, {late} out-of-order step(s) in all: {wrong}"
        assert late == 0
        assert self.dead_letters() == 0


def _what_is_wrong(seen: list[int], sent: int) -> str:
    missing = sorted(set(range(sent)) - set(seen))
    doubled = sorted(i for i in set(seen) if seen.count(i) > 1)
    return (
        f"{len(seen)} of {sent} steps applied, {out_of_order(seen)} out of order, "
        f"missing {missing[:10]}, applied twice {doubled[:10]}"
    )


@pytest.fixture
def steps_deployment(
    redis_server: LocalRedisServer, redis_key_prefix: str, deployment_factory: MakeDeployment
) -> Callable[[int], StepsDeployment]:
    def make(partitions: int) -> StepsDeployment:
        return deployment_factory(redis_server.url, redis_key_prefix, partitions, StepsDeployment)

    return make


def auto_starter(url: str, prefix: str, start_instance: StartInstance) -> Callable[..., Instance]:
    """Start an ``auto`` instance named ``name`` of a ``partitions``-partition deployment at ``url``
    (None: the count the deployment recorded, as an instance joining one is started)."""

    def start(name: str, partitions: int | None, **more: str) -> Instance:
        env = instance_env(
            url,
            prefix,
            partitions=partitions,
            partition_id="auto",
            consumer=name,
            KRULES_HANDLER_LOG_LEVEL="DEBUG",  # no line per handler call: thousands of steps
            **more,
        )
        return start_instance(env, RULES)

    return start


@pytest.fixture
def start_auto(
    redis_server: LocalRedisServer, redis_key_prefix: str, start_instance: StartInstance
) -> Callable[..., Instance]:
    """:func:`auto_starter` on the session's redis-server."""
    return auto_starter(redis_server.url, redis_key_prefix, start_instance)


# -- ownership -------------------------------------------------------------------------------------
def shares(deployment: Deployment) -> dict[str | None, set[int]]:
    """The partitions each instance owns by its leases (None: the partitions nobody owns)."""
    out: dict[str | None, set[int]] = {}
    for partition, owner in deployment.owners().items():
        out.setdefault(owner, set()).add(partition)
    return out


def balanced(deployment: Deployment, instances: list[Instance]) -> bool:
    """Every partition owned, by the ``instances`` only, in shares differing by one at most, and each
    instance registered as holding exactly its share (so none is still handing one back)."""
    owned = shares(deployment)
    names = {i.name for i in instances}
    if set(owned) != names:
        return False
    sizes = [len(owned[name]) for name in names]
    registered = deployment.registered()
    return max(sizes) - min(sizes) <= 1 and all(set(registered.get(n, ())) == owned[n] for n in names)


def wait_balanced(deployment: Deployment, instances: list[Instance]) -> dict[str | None, set[int]]:
    """Wait until the ``instances`` share the partitions evenly (see :func:`balanced`); the shares."""
    for instance in instances:
        instance.wait_reading()
    wait_until(
        lambda: balanced(deployment, instances),
        START_TIMEOUT,
        "an even split of the partitions",
        lambda: "\n".join(
            [f"shares {shares(deployment)}", f"registered {deployment.registered()}"]
            + [i.describe() for i in instances]
        ),
    )
    return shares(deployment)


# -- the tests -------------------------------------------------------------------------------------
def test_three_auto_instances_split_eight_partitions_evenly_and_each_subject_is_handled_by_its_owner(
    start_auto: Callable[..., Instance], steps_deployment: Callable[[int], StepsDeployment]
) -> None:
    deployment = steps_deployment(8)
    instances = [start_auto(f"auto-{n}", 8) for n in range(3)]

    owned = wait_balanced(deployment, instances)

    assert sorted(len(partitions) for partitions in owned.values()) == [2, 3, 3]
    status = partitions_status(instances[0].env)["partitions"]
    assert {p["partition"]: p["owner"]["instance"] for p in status} == deployment.owners()
    assert all(p["owner"]["epoch"] > 0 and p["waiting"] == [] for p in status)
    deployment.send_steps(40)
    wait_finished(deployment, *instances)
    deployment.assert_every_step_applied_once_in_order()
    owner_of = deployment.owners()
    by_owner = {name: [owner_of[partition_of(name, 8)]] for name in deployment.subjects}
    assert deployment.handled_by() == by_owner  # never by another instance than its partition's owner
    assert shares(deployment) == owned  # sticky: nothing moved
    for instance in instances:
        assert_clean_exit(instance)


def test_scaling_from_one_instance_to_three_and_back_to_one_mid_run_keeps_every_subjects_order(
    start_auto: Callable[..., Instance], steps_deployment: Callable[[int], StepsDeployment]
) -> None:
    rounds = 400  # 20,000 steps over 50 subjects
    deployment = steps_deployment(8)
    first = start_auto("first", 8)
    first.wait_reading()
    deployment.send_steps_in_background(rounds, chunk=10, ahead=2000)
    wait_until(
        lambda: deployment.committed_total() >= 4000, FINISH_TIMEOUT, "4,000 steps", deployment.describe
    )

    joined = [start_auto("second", None), start_auto("third", None)]  # 1 -> 3, told only the Redis URL
    wait_balanced(deployment, [first, *joined])
    wait_until(
        lambda: deployment.committed_total() >= 12_000, FINISH_TIMEOUT, "12,000 steps", deployment.describe
    )
    assert deployment.committed_total() < SUBJECTS * rounds, "the run ended before scaling down"
    for instance in (first, joined[0]):  # 3 -> 1
        assert_clean_exit(instance)
        assert "released partition(s)" in instance.log

    deployment.finish_sending(joined[1])
    wait_finished(deployment, joined[1])
    deployment.assert_every_step_applied_once_in_order()
    assert deployment.total_sent() == SUBJECTS * rounds
    assert set().union(*deployment.handled_by().values()) == {"first", "second", "third"}
    assert shares(deployment) == {"third": set(range(8))}
    for instance in (first, *joined):
        assert "lost partition" not in instance.log, instance.describe()  # every handover was a hand-back
    assert_clean_exit(joined[1])


def test_the_partitions_of_an_instance_killed_mid_run_resume_elsewhere_once_its_lease_expires(
    start_auto: Callable[..., Instance], steps_deployment: Callable[[int], StepsDeployment]
) -> None:
    kill_one_of_three_mid_run(start_auto, steps_deployment(8))


def test_on_a_redis_cluster_the_partitions_of_an_instance_killed_mid_run_resume_elsewhere(
    redis_cluster: LocalRedisCluster,
    redis_key_prefix: str,
    start_instance: StartInstance,
    deployment_factory: MakeDeployment,
) -> None:
    deployment = deployment_factory(redis_cluster.url, redis_key_prefix, 8, StepsDeployment)
    kill_one_of_three_mid_run(auto_starter(redis_cluster.url, redis_key_prefix, start_instance), deployment)


def kill_one_of_three_mid_run(start_auto: Callable[..., Instance], deployment: StepsDeployment) -> None:
    """Three ``auto`` instances share 8 partitions; one is killed with SIGKILL mid-run: its partitions
    resume on the others once its lease expires, and every step is applied once, in order."""
    instances = [start_auto(f"crash-{n}", 8, **SHORT_LEASE) for n in range(3)]
    owned = wait_balanced(deployment, instances)
    deployment.send_steps(200)
    wait_until(
        lambda: deployment.committed_total() >= 2000, FINISH_TIMEOUT, "2,000 steps", deployment.describe
    )
    victim, survivors = instances[0], instances[1:]
    orphaned = owned[victim.name]

    victim.kill()

    assert deployment.committed_total() < deployment.total_sent(), "the run ended before the kill"
    # How soon (the lease time and a renewal, measured 2.7-3.2 s here) is a figure, not an assertion:
    # the deadline only guards against a hang.
    wait_until(
        lambda: all(owner in {s.name for s in survivors} for owner in deployment.owners().values()),
        FINISH_TIMEOUT,
        f"the survivors taking the killed instance's partitions {sorted(orphaned)}",
        lambda: "\n".join([deployment.describe(), *(s.describe() for s in survivors)]),
    )
    wait_finished(deployment, *survivors)
    deployment.assert_every_step_applied_once_in_order()
    taken = "\n".join(s.log for s in survivors)
    for partition in orphaned:
        assert f"took partition {partition} " in taken
    for survivor in survivors:
        assert_clean_exit(survivor)


def test_an_owner_paused_past_its_lease_has_its_commits_refused_and_nothing_is_applied_twice(
    start_auto: Callable[..., Instance], steps_deployment: Callable[[int], StepsDeployment]
) -> None:
    deployment = steps_deployment(4)
    slow = {**SHORT_LEASE, "ORDER_STEP_SLEEP_MS": "20"}  # every subject has a turn under way
    paused, other = start_auto("paused", 4, **slow), start_auto("other", 4, **slow)
    owned = wait_balanced(deployment, [paused, other])
    deployment.send_steps(60)
    wait_until(lambda: deployment.committed_total() >= 300, FINISH_TIMEOUT, "300 steps", deployment.describe)
    orphaned = owned[paused.name]
    epochs = deployment.epochs()

    paused.pause()
    wait_until(
        lambda: all(deployment.owners()[p] == other.name for p in orphaned),
        FINISH_TIMEOUT,
        "the other instance taking over the paused one's partitions",
        lambda: "\n".join([deployment.describe(), other.describe()]),
    )
    taken_over = deployment.committed_in(orphaned)
    wait_until(
        lambda: deployment.committed_in(orphaned) > taken_over,
        FINISH_TIMEOUT,
        "the new owner committing steps of the partitions taken over",
        lambda: "\n".join([deployment.describe(), other.describe()]),
    )
    assert deployment.committed_total() < deployment.total_sent(), "the run ended while the owner was paused"
    new_epochs = deployment.epochs()
    assert all(new_epochs[p] > epochs[p] for p in orphaned)
    paused.resume()

    wait_until(
        lambda: "lost partition" in paused.log and "was not committed here" in paused.log,
        START_TIMEOUT,
        "the resumed instance finding its lease lost and its commits refused",
        paused.describe,
    )
    wait_finished(deployment, paused, other)
    deployment.assert_every_step_applied_once_in_order()
    refused = [line for line in paused.log.splitlines() if "was not committed here" in line]
    assert all("lease is no longer this instance's" in line for line in refused), refused
    assert_clean_exit(paused)
    assert_clean_exit(other)


def test_a_second_instance_asking_for_the_same_static_id_waits_and_takes_over_when_the_owner_dies(
    redis_server: LocalRedisServer,
    redis_key_prefix: str,
    start_instance: StartInstance,
    steps_deployment: Callable[[int], StepsDeployment],
) -> None:
    deployment = steps_deployment(1)

    def static(name: str) -> Instance:
        env = instance_env(
            redis_server.url, redis_key_prefix, partitions=1, partition_id="0", consumer=name, **SHORT_LEASE
        )
        return start_instance(env, RULES)

    owner = static("owner")
    owner.wait_reading()
    wait_until(
        lambda: deployment.owners() == {0: "owner"}, START_TIMEOUT, "owning partition 0", owner.describe
    )
    waiting = static("waiting")
    waiting.wait_reading()
    wait_until(
        lambda: "waiting for partition 0, owned by instance 'owner'" in waiting.log,
        START_TIMEOUT,
        "the second instance saying it waits",
        waiting.describe,
    )
    (status,) = partitions_status(waiting.env)["partitions"]
    assert (status["owner"]["instance"], status["waiting"]) == ("owner", ["waiting"])
    deployment.send_steps(20)
    wait_finished(deployment, owner, waiting)
    assert {tuple(names) for names in deployment.handled_by().values()} == {("owner",)}

    owner.kill()

    wait_until(
        lambda: deployment.owners() == {0: "waiting"}, FINISH_TIMEOUT, "the takeover", waiting.describe
    )
    deployment.send_steps(20)
    wait_finished(deployment, waiting)
    deployment.assert_every_step_applied_once_in_order()
    assert {tuple(names) for names in deployment.handled_by().values()} == {("owner", "waiting")}
    (status,) = partitions_status(waiting.env)["partitions"]
    assert (status["owner"]["instance"], status["waiting"]) == ("waiting", [])
    assert_clean_exit(waiting)


@pytest.mark.parametrize("partitions", [2, 4])
def test_another_process_opening_the_storage_without_a_partition_count_shares_the_engines_subjects(
    partitions: int,
    redis_server: LocalRedisServer,
    redis_key_prefix: str,
    start_auto: Callable[..., Instance],
    steps_deployment: Callable[[int], StepsDeployment],
) -> None:
    deployment = steps_deployment(partitions)
    instance = start_auto("engine", partitions)
    instance.wait_reading()
    names = [f"probe-{k}" for k in range(12)]
    assert {partition_of(name, partitions) for name in names} == set(range(partitions))

    @contextlib.asynccontextmanager
    async def another_service() -> AsyncIterator[KRulesContainer]:
        """A service of its own, opening the storage the README's way: no partition count."""
        storage = create_redis_storage(url=redis_server.url, key_prefix=redis_key_prefix)
        container = KRulesContainer()
        container.subject_storage.override(providers.Object(storage))
        try:
            yield container
        finally:
            await storage.close()

    async def write_outside() -> None:
        async with another_service() as service:
            for name in names:
                await service.subject(name).set("outside", f"written outside for {name}", use_cache=False)

    async def read_echoes() -> dict[str, Any]:
        async with another_service() as service:
            return {name: await service.subject(name).get("echo", default=None) for name in names}

    asyncio.run(write_outside())
    deployment.emit([{"type": "probe.echo", "subject": name} for name in names])
    wait_finished(deployment, instance)

    echoes = asyncio.run(read_echoes())  # the rule read what the service wrote, the service reads the rule's
    assert echoes == {name: f"written outside for {name}" for name in names}
    assert all(deployment.prop(name, "outside") for name in names)  # in the engine's keys, not a copy
    assert deployment.dead_letters() == 0
    assert_clean_exit(instance)
