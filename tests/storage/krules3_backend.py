"""A subject storage written the KRules 3 way, as a test double: in memory, per subject, its
interface as KRules documents it (``EmptySubjectStorage``): ``load``, ``store(inserts=, updates=,
deletes=)``, ``set(prop)`` (a callable value applied to the old one), ``get(prop)`` (AttributeError
when missing), ``delete``, ``get_ext_props``, ``flush``, ``is_concurrency_safe``, ``is_persistent``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from krules.properties import PropertyType


class DictSubjectStorage:
    """One subject's storage; ``shelf`` holds every subject's ``(props, ext_props)``."""

    def __init__(self, name: str, shelf: dict[str, tuple[dict[str, Any], dict[str, Any]]], calls: list[str]):
        self.name = name
        self.shelf = shelf
        self.calls = calls

    def _maps(self) -> tuple[dict[str, Any], dict[str, Any]]:
        return self.shelf.setdefault(self.name, ({}, {}))

    def _map(self, prop: Any) -> dict[str, Any]:
        props, ext = self._maps()
        return ext if prop.type == PropertyType.EXTENDED else props

    def is_concurrency_safe(self) -> bool:
        return True

    def is_persistent(self) -> bool:
        return False

    async def load(self) -> tuple[dict[str, Any], dict[str, Any]]:
        self.calls.append(f"load {self.name}")
        props, ext = self.shelf.get(self.name, ({}, {}))
        return dict(props), dict(ext)

    async def store(self, inserts: list[Any] = [], updates: list[Any] = [], deletes: list[Any] = []) -> None:  # noqa: B006 - KRules' signature
        self.calls.append(
            f"store {self.name} inserts={[p.name for p in inserts]} updates={[p.name for p in updates]} "
            f"deletes={[p.name for p in deletes]}"
        )
        for prop in [*inserts, *updates]:
            self._map(prop)[prop.name] = prop.get_value()
        for prop in deletes:
            self._map(prop).pop(prop.name, None)
        if not any(self._maps()):
            self.shelf.pop(self.name, None)

    async def set(self, prop: Any, old_value_default: Any = None) -> tuple[Any, Any]:
        stored = self._map(prop)
        old = stored.get(prop.name, old_value_default)
        value = prop.get_value(old)
        stored[prop.name] = value
        return value, old

    async def get(self, prop: Any) -> Any:
        stored = self.shelf.get(self.name, ({}, {}))[1 if prop.type == PropertyType.EXTENDED else 0]
        if prop.name not in stored:
            raise AttributeError(prop.name)
        return stored[prop.name]

    async def delete(self, prop: Any) -> None:
        self._map(prop).pop(prop.name, None)
        if not any(self._maps()):
            self.shelf.pop(self.name, None)

    async def get_ext_props(self) -> dict[str, Any]:
        return dict(self.shelf.get(self.name, ({}, {}))[1])

    async def flush(self) -> DictSubjectStorage:
        self.shelf.pop(self.name, None)
        return self


def dict_storage_factory(
    shelf: dict[str, tuple[dict[str, Any], dict[str, Any]]] | None = None, calls: list[str] | None = None
) -> Callable[[str], DictSubjectStorage]:
    """A KRules storage factory: a subject name in, that subject's storage out."""
    shelf = {} if shelf is None else shelf
    calls = [] if calls is None else calls

    def storage_factory(name: str) -> DictSubjectStorage:
        return DictSubjectStorage(name, shelf, calls)

    return storage_factory
