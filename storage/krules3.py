"""A subject storage written for KRules 3, plugged into krules.

KRules' storage interface is per subject: a *factory* called with a subject name returns an object
whose coroutines ``load()``, ``store(inserts=, updates=, deletes=)``, ``set(prop)``, ``get(prop)``,
``delete(prop)``, ``flush()`` (and ``get_ext_props()``) act on that subject, each property passed as a
property object (``name``, ``value``, ``type``).  krules' interface (:class:`krules.ports.SubjectStorage`)
takes the subject's name in every call instead.  :class:`KRules3Storage` turns one into the other::

    container.subject_storage.override(providers.Object(my_krules_storage_factory))   # as in KRules

works as it is: the container wraps a factory that is not a krules storage in :class:`KRules3Storage`
(:func:`storage_of`).  ``KRules3Storage(factory)`` does the same by hand.

What a KRules backend gives is what krules gets: a turn's writes are stored subject by subject, each
with one ``store()`` call (so all or nothing per subject only if the backend's ``store`` is); a
callable update checks the value its callable saw against the one stored just before (read by
``load()``) and applies the callable again when another writer changed it, but between that read and
the ``store()`` nothing stops a concurrent writer unless the backend does.  ``set(prop)`` with a
callable value (``use_cache=False``) is as atomic as the backend's own ``set``.  A KRules backend
cannot list subjects, so :meth:`KRules3Storage.subjects` (``krules subject list``, the dead-letter
index) raises a :class:`~krules.errors.StorageError` saying so.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Sequence
from typing import Any

from krules.errors import ConfigurationError, StorageError
from krules.properties import PropertyType
from storage.base import DELETE, Change, SubjectChanges, SubjectStorage, Update, decode, encode

__all__ = ["KRules3Storage", "SubjectExtProperty", "SubjectProperty", "storage_of"]


class SubjectProperty:
    """A property as a KRules backend receives it: ``name``, ``value`` (a value, or a callable of the
    old value) and ``type`` (:class:`~krules.properties.PropertyType`)."""

    type = PropertyType.DEFAULT

    def __init__(self, name: str, value: Any = None) -> None:
        self.name = name
        self.value = value

    def get_value(self, old_value: Any = None) -> Any:
        """The value to store: ``value``, or ``value(old_value)`` when it is callable (``value()``
        for a function of no parameter)."""
        value = self.value
        if not callable(value):
            return value
        if inspect.isfunction(value) and not inspect.signature(value).parameters:
            return value()
        return value(old_value)

    def json_value(self, old_value: Any = None) -> str:
        """:meth:`get_value` as JSON."""
        return json.dumps(self.get_value(old_value))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.value!r})"


class SubjectExtProperty(SubjectProperty):
    """An extended property as a KRules backend receives it."""

    type = PropertyType.EXTENDED


def _prop(name: str, ext: bool, value: Any = None) -> SubjectProperty:
    return SubjectExtProperty(name, value) if ext else SubjectProperty(name, value)


class KRules3Storage:
    """:class:`krules.ports.SubjectStorage` on a KRules 3 storage factory (see the module docstring)."""

    def __init__(self, factory: Callable[[str], Any]) -> None:
        if not callable(factory):
            raise ConfigurationError(
                f"A KRules storage is a factory called with a subject name, not {factory!r}."
            )
        self.factory = factory

    def _of(self, name: str) -> Any:
        return self.factory(name)

    async def load(self, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
        props, ext = await self._of(name).load()
        return dict(props or {}), dict(ext or {})

    async def store(self, batch: Sequence[SubjectChanges]) -> None:
        # Every value is resolved (callables applied again where the stored value moved on) before
        # anything is stored, so a value that cannot be stored leaves the whole batch unapplied.
        planned: list[tuple[Any, list[SubjectProperty], list[SubjectProperty], list[SubjectProperty]]] = []
        for changes in batch:
            if not changes:
                continue
            backend = self._of(changes.name)
            props, ext = await backend.load()
            inserts: list[SubjectProperty] = []
            updates: list[SubjectProperty] = []
            deletes: list[SubjectProperty] = []
            for is_ext, section, stored in (
                (False, changes.props, props or {}),
                (True, changes.ext, ext or {}),
            ):
                for prop, change in section.items():
                    if change is DELETE:
                        if prop in stored:
                            deletes.append(_prop(prop, is_ext))
                        continue
                    value = _resolved(changes.name, prop, change, stored)
                    (updates if prop in stored else inserts).append(_prop(prop, is_ext, value))
            planned.append((backend, inserts, updates, deletes))
        for backend, inserts, updates, deletes in planned:
            await backend.store(inserts=inserts, updates=updates, deletes=deletes)

    async def get(self, name: str, prop: str, *, ext: bool = False) -> Any:
        try:
            return await self._of(name).get(_prop(prop, ext))
        except AttributeError:
            raise KeyError(prop) from None

    async def set(self, name: str, prop: str, value: str, *, ext: bool = False) -> tuple[bool, Any]:
        backend = self._of(name)
        existed, old = await self._current(backend, prop, ext)
        await backend.set(_prop(prop, ext, decode(value)))
        return existed, old

    async def update(
        self, name: str, prop: str, fn: Callable[[Any], Any], *, ext: bool = False
    ) -> tuple[Any, Any, bool]:
        backend = self._of(name)
        existed, _ = await self._current(backend, prop, ext)

        made: list[Any] = []

        def as_json(old: Any) -> Any:  # what krules would store: JSON (tuples become lists), or refused
            made[:] = [fn(old)]
            return decode(encode(made[0], name, prop))

        stored, old = await backend.set(_prop(prop, ext, as_json))
        return made[0] if made else stored, old, existed

    async def delete(self, name: str, prop: str, *, ext: bool = False) -> tuple[bool, Any]:
        backend = self._of(name)
        existed, old = await self._current(backend, prop, ext)
        if existed:
            await backend.delete(_prop(prop, ext))
        return existed, old

    async def flush(self, name: str) -> None:
        await self._of(name).flush()

    async def subjects(self, prefix: str = "") -> list[str]:
        raise StorageError(
            "A storage written for KRules cannot list subjects (its interface is per subject); list "
            "them with the backend's own tools, or move to a krules storage (storage.redis)."
        )

    async def check(self) -> None:
        """Nothing to check: a KRules backend connects when a subject first uses it."""

    async def close(self) -> None:
        """Nothing to close: the backend's connections are its own."""

    @staticmethod
    async def _current(backend: Any, prop: str, ext: bool) -> tuple[bool, Any]:
        try:
            return True, await backend.get(_prop(prop, ext))
        except AttributeError:
            return False, None

    def __repr__(self) -> str:
        return f"KRules3Storage({self.factory!r})"


def _resolved(name: str, prop: str, change: Change, stored: dict[str, Any]) -> Any:
    """The Python value a change stores: a callable update is applied again, to the value stored
    now, when another writer changed it since the callable ran."""
    if change is DELETE:
        return None
    if type(change) is Update:
        saw = change.expected
        if (prop in stored) == (saw is not None) and (saw is None or decode(saw) == stored[prop]):
            return decode(change.value)
        current = encode(stored[prop], name, prop) if prop in stored else None
        return decode(change.reapply(current, name, prop))
    assert isinstance(change, str)
    return decode(change)


def storage_of(provided: Any) -> SubjectStorage:
    """What the container's ``subject_storage`` provides, as a krules storage: itself, or a KRules
    storage factory wrapped in :class:`KRules3Storage`; ConfigurationError for anything else."""
    if isinstance(provided, SubjectStorage):
        return provided
    if callable(provided):
        return KRules3Storage(provided)
    raise ConfigurationError(
        f"container.subject_storage provides {provided!r}, which is neither a krules storage (e.g. "
        "storage.redis.create_redis_storage(...)) nor a KRules storage factory (a callable taking a "
        "subject name)."
    )
