"""The ``krules`` pytest plugin: the ``krules_app`` fixture (registered through the package's
``pytest11`` entry point).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from krules.app import use_container
from krules.testing.apps import KRulesTestApp

__all__ = ["krules_app"]

try:  # async fixtures need pytest-asyncio; without it, importing krules.testing still works
    from pytest_asyncio import fixture as _async_fixture
except ImportError:  # pragma: no cover
    _async_fixture = pytest.fixture  # type: ignore[assignment]


@_async_fixture
async def krules_app() -> AsyncIterator[KRulesTestApp]:
    """An isolated krules app on memory storage with a recorder and a fake clock."""
    app = KRulesTestApp()
    try:
        with use_container(app.container):  # module-level on/emit/subject in the test reach this app
            yield app
    finally:
        await app.close()
