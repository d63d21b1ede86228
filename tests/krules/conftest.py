"""Fixtures of the tests that run ``krules run`` processes (:mod:`processes` beside this file)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.krules.processes import Deployment, Instance


@pytest.fixture
def start_instance(tmp_path: Path) -> Iterator[Callable[[dict[str, str], Path], Instance]]:
    """Start ``krules run <rules>`` instances; any still running at the end of the test is killed."""
    started: list[Instance] = []

    def start(env: dict[str, str], rules: Path) -> Instance:
        instance = Instance(env, tmp_path / f"krules-{len(started)}-{env['KRULES_CONSUMER']}.log", rules)
        started.append(instance)
        return instance

    yield start
    for instance in started:
        instance.close()


@pytest.fixture
def deployment_factory() -> Iterator[Callable[..., Deployment]]:
    """``deployment_factory(url, prefix, partitions, kind=Deployment)``: a :class:`Deployment` (or
    subclass) closed at the end of the test."""
    made: list[Deployment] = []

    def make(url: str, prefix: str, partitions: int, kind: type[Deployment] = Deployment) -> Deployment:
        deployment = kind(url, prefix, partitions)
        made.append(deployment)
        return deployment

    yield make
    for deployment in made:
        deployment.close()
