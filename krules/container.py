"""``KRulesContainer``: the dependency-injector container that assembles one krules app.

Every collaborator is a provider, so tests and deployments swap them without touching rule code::

    container = KRulesContainer()
    container.subject_storage.override(providers.Object(create_redis_storage(url=..., key_prefix=...)))
    on, when, middleware, emit = container.handlers()
    order = container.subject("order-1")

Override providers before the first event is emitted (the engine is a singleton built on first use).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from dependency_injector import containers, providers

from krules.chain import Middleware
from krules.clock import SystemClock
from krules.config import Settings
from krules.engine import Engine
from krules.errors import ConfigurationError
from krules.ports import SubjectStorage
from krules.rules import Filter, RuleRegistry
from krules.subject import Subject

__all__ = ["KRulesContainer", "create_handlers", "settings_from_env"]

Handlers = tuple[
    Callable[..., Callable[[Any], Any]],
    Callable[..., Callable[[Any], Any]],
    Callable[[Any], Any],
    Callable[..., Any],
]


def settings_from_env(env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """:meth:`Settings.from_env` knowing the built-in middleware's ``KRULES_*`` variables too (they
    are declared with their middleware), so one spelled right is read and checked, not refused."""
    from middleware.registry import MIDDLEWARE_SETTINGS  # the middleware import the core, not at import

    return Settings.from_env(env, extra=MIDDLEWARE_SETTINGS, **overrides)


def _no_middleware() -> list[Middleware]:
    return []  # a library app adds its own; krules run adds the built-ins


def _registry(middlewares: list[Middleware]) -> RuleRegistry:
    registry = RuleRegistry()
    for mw in middlewares:
        registry.add_middleware(mw)
    return registry


def create_handlers(registry: RuleRegistry, engine: Callable[[], Engine]) -> Handlers:
    """Return ``(on, when, middleware, emit)`` bound to one app (``emit`` finds the engine lazily)."""

    def on(*patterns: str) -> Callable[[Any], Any]:
        return registry.on(*patterns)

    def when(*filters: Filter) -> Callable[[Any], Any]:
        return registry.when(*filters)

    def middleware(mw: Any) -> Any:
        return registry.middleware(mw)

    async def emit(
        event_type: str, subject: Subject | str, payload: dict[str, Any] | None = None, **ext: Any
    ) -> None:
        await engine().emit(event_type, subject, payload, **ext)

    on.__doc__ = RuleRegistry.on.__doc__
    when.__doc__ = RuleRegistry.when.__doc__
    middleware.__doc__ = RuleRegistry.middleware.__doc__
    emit.__doc__ = Engine.emit.__doc__
    return on, when, middleware, emit


def _memory_storage() -> SubjectStorage:
    # Imported when the provider is first used, not with this module: the public API (the krules
    # package) imports this module, and a storage backend imports the core, so a top-level import
    # here would leave a backend imported first half-initialised.
    from storage.memory import create_memory_storage

    return create_memory_storage()


def _storage(provided: Any) -> SubjectStorage:
    # What ``subject_storage`` provides, as a krules storage: a KRules 3 storage factory is wrapped
    # (imported here, not at the top, for the reason _memory_storage says).
    from storage.krules3 import storage_of

    return storage_of(provided)


def _subject(name: str, engine: Engine, event_info: Mapping[str, Any] | None = None) -> Subject:
    # ``event_info`` is KRules' record of the event a subject was made for; krules knows that
    # event from the handler's context, so the argument carries nothing it needs (accepted so
    # KRules code calling ``container.subject(name, event_info=...)`` runs unchanged).
    return engine.subject(name)


class EventBusProvider(providers.Provider):  # type: ignore[type-arg]
    """``container.event_bus``: KRules' name for what dispatches events, here the engine itself.

    ``container.event_bus()`` returns the engine; overriding it is refused with a sentence saying
    what to override instead (krules has no event bus apart from the engine).
    """

    def __init__(self, engine: providers.Provider[Engine]) -> None:
        self._engine = engine
        super().__init__()

    def __deepcopy__(self, memo: dict[Any, Any] | None = None) -> EventBusProvider:
        memo = {} if memo is None else memo
        copied = memo.get(id(self))
        if copied is None:
            copied = memo[id(self)] = EventBusProvider(providers.deepcopy(self._engine, memo))
        return copied

    @property
    def related(self) -> Iterator[providers.Provider[Any]]:
        yield self._engine
        yield from super().related

    def _provide(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Engine:
        return self._engine()

    def override(self, provider: Any) -> Any:
        raise ConfigurationError(
            "krules has no event bus apart from its engine, so container.event_bus cannot be "
            "overridden; override container.middlewares (or add middleware with "
            "container.handlers()) to act on events, or container.engine to replace the engine."
        )


class KRulesContainer(containers.DeclarativeContainer):
    """Providers of one krules app; override any of them (storage, settings, clock, middleware)."""

    config = providers.Configuration()
    """Free-form application configuration (as in KRules); the engine reads ``settings``."""

    settings = providers.Singleton(settings_from_env)
    clock = providers.Singleton(SystemClock)
    subject_storage: providers.Provider[SubjectStorage] = providers.Singleton(_memory_storage)
    middlewares: providers.Provider[list[Middleware]] = providers.Callable(_no_middleware)
    """The middleware installed around every handler: none by default; :func:`krules.assembly.assemble`
    installs the default chain (what ``krules run`` serves with)."""
    registry = providers.Singleton(_registry, middlewares=middlewares)
    engine = providers.Singleton(
        Engine,
        registry=registry,
        storage=providers.Callable(_storage, subject_storage),
        settings=settings,
        clock=clock,
    )
    event_bus = EventBusProvider(engine)
    """KRules' name for the engine: ``container.event_bus()`` is ``container.engine()``."""
    handlers = providers.Callable(create_handlers, registry=registry, engine=engine.provider)
    subject = providers.Factory(_subject, engine=engine)
