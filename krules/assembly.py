"""The one place an instance is assembled from its settings: storage, transport, chain, routes.

``krules run``, the testing helpers and anyone embedding krules call :func:`assemble`; nothing else
wires drivers to the engine.  The storage backend and the transport are chosen by the scheme of
``KRULES_REDIS_URL`` from two small tables (:data:`STORAGE_DRIVERS`, :data:`TRANSPORT_DRIVERS`), so a
new backend is its own module plus one line here.  Without a URL the instance is embedded: the
container's memory storage and no transport (root events are processed in this process).
"""

from __future__ import annotations

import gc
import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

from dependency_injector import providers

from krules.app import use_container
from krules.config import Settings
from krules.container import KRulesContainer
from krules.errors import ConfigurationError
from krules.loader import load_rule_module

if TYPE_CHECKING:
    from starlette.routing import BaseRoute

    from krules.engine import Engine
    from krules.ports import SubjectStorage
    from krules.transport.base import PartitionFigures
    from krules.transport.worker import PartitionWorker
    from middleware.registry import DefaultChain as BuiltChain

__all__ = [
    "LAYOUT_READERS",
    "STORAGE_DRIVERS",
    "TRANSPORT_DRIVERS",
    "Instance",
    "apply_gc_policy",
    "assemble",
    "open_storage",
    "with_recorded_partitions",
]

StorageFactory = Callable[..., "SubjectStorage"]
"""``factory(settings, **options) -> storage``."""

TransportFactory = Callable[["Engine", Any], "PartitionWorker"]
"""``factory(engine, storage) -> worker``: makes the engine's transport and the worker that reads
the partitions its settings own."""

STORAGE_DRIVERS: Final[dict[str, str]] = {
    "redis": "storage.redis:storage_from_settings",
    "rediss": "storage.redis:storage_from_settings",
    "unix": "storage.redis:storage_from_settings",
    "redis+cluster": "storage.redis:storage_from_settings",
    "rediss+cluster": "storage.redis:storage_from_settings",
    "redis+sentinel": "storage.redis:storage_from_settings",
}
"""Subject storage backends by URL scheme (``module:factory``, imported when chosen)."""

LAYOUT_READERS: Final[dict[str, str]] = {
    "redis": "storage.redis:recorded_partitions",
    "rediss": "storage.redis:recorded_partitions",
    "unix": "storage.redis:recorded_partitions",
    "redis+cluster": "storage.redis:recorded_partitions",
    "rediss+cluster": "storage.redis:recorded_partitions",
    "redis+sentinel": "storage.redis:recorded_partitions",
}
"""How to read the partition count a deployment recorded, by URL scheme (``module:function``,
``function(settings) -> int | None``)."""

TRANSPORT_DRIVERS: Final[dict[str, str]] = {
    "redis": "krules.transport.redis_streams:stream_worker",
    "rediss": "krules.transport.redis_streams:stream_worker",
    "unix": "krules.transport.redis_streams:stream_worker",
    "redis+cluster": "krules.transport.redis_streams:stream_worker",
    "rediss+cluster": "krules.transport.redis_streams:stream_worker",
    "redis+sentinel": "krules.transport.redis_streams:stream_worker",
}
"""Transports by URL scheme (``module:factory``, imported when chosen)."""

_DEFAULT_SCHEME: Final = "redis"  # what a URL of no known scheme is handed to (it says what is wrong)


def _load(target: str, what: str, url: str) -> Any:
    module, _, name = target.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as exc:
        raise ConfigurationError(
            f"KRULES_REDIS_URL is set but the {what} for its {urlsplit(url).scheme!r} URL cannot be "
            f"imported ({exc}); install krules with its redis dependency or unset KRULES_REDIS_URL."
        ) from None


def _driver(table: dict[str, str], url: str, what: str) -> Any:
    scheme = urlsplit(url).scheme.lower()
    return _load(table.get(scheme) or table[_DEFAULT_SCHEME], what, url)


def open_storage(settings: Settings, **options: Any) -> SubjectStorage:
    """The subject storage ``settings.redis_url`` names (``options`` go to its factory, e.g.
    ``retries=2`` for a CLI command that should fail fast); ConfigurationError when none is set."""
    url = settings.redis_url
    if not url:
        raise ConfigurationError("No KRULES_REDIS_URL is set; this needs the deployment's Redis.")
    factory: StorageFactory = _driver(STORAGE_DRIVERS, url, "storage")
    return factory(settings, **options)


@dataclass
class Instance:
    """One assembled krules instance: its container (hence engine), storage, chain and extras."""

    settings: Settings
    container: KRulesContainer
    storage: SubjectStorage | None
    """The configured storage (None: embedded, the container's memory storage)."""
    chain: BuiltChain | None
    """The installed middleware (None when assembled without them)."""
    worker: PartitionWorker | None = None
    """Reads the owned partitions (None in embedded mode)."""
    routes: list[BaseRoute] = field(default_factory=list)
    """Extra HTTP routes to serve beside the ingress (``/metrics``)."""

    @property
    def engine(self) -> Engine:
        """The instance's engine (built by the container on first use)."""
        engine: Engine = self.container.engine()
        return engine

    def load(self, modules: Sequence[str]) -> None:
        """Import rule modules (dotted names or paths) so that they register on this instance."""
        with use_container(self.container):
            for module in modules:
                load_rule_module(module)

    def close(self) -> None:
        """Release what the chain holds outside the engine (flushes buffered spans)."""
        if self.chain is not None and self.chain.tracer_provider is not None:
            self.chain.tracer_provider.shutdown()


def assemble(
    settings: Settings,
    *,
    container: KRulesContainer | None = None,
    middleware: bool = True,
) -> Instance:
    """Build an instance from ``settings``: the storage and transport its URL names (embedded when
    none), the default middleware chain (unless ``middleware`` is false) with its routes and
    observers, all in ``container`` (a new one by default)."""
    container = container if container is not None else KRulesContainer()
    if settings.redis_url:
        settings = with_recorded_partitions(settings)
    container.settings.override(providers.Object(settings))
    storage = open_storage(settings) if settings.redis_url else None
    if storage is not None:
        container.subject_storage.override(providers.Object(storage))
    chain = _install_chain(settings, container) if middleware else None
    instance = Instance(settings, container, storage, chain)
    engine = instance.engine
    metrics = chain.metrics if chain is not None else None
    if metrics is not None:
        from middleware.metrics import metrics_route

        metrics.observe(engine)
        instance.routes.append(metrics_route(metrics))
    if storage is not None and settings.redis_url:
        make_worker: TransportFactory = _driver(TRANSPORT_DRIVERS, settings.redis_url, "transport")
        worker = instance.worker = make_worker(engine, storage)
        if metrics is not None:
            worker.partition_observers.append(_partition_exporter(metrics))
            worker.dead_letter_observers.append(metrics.record_dead_letter)
            worker.timer_lag_observers.append(metrics.record_timer_lag)
            leases = getattr(worker.source, "leases", None)  # a transport whose partitions are leased
            if leases is not None:
                leases.observers.append(_ownership_exporter(metrics, leases))
    return instance


def apply_gc_policy(settings: Settings) -> None:
    """The garbage-collector policy of a long-running instance (``krules run`` applies it once its
    rule modules are loaded): what start-up made is frozen out of every later collection, and a
    young collection runs every ``KRULES_GC_THRESHOLD`` allocations (20,000; Python's default is
    700), the older generations every 50 and 100 of the younger ones.  Turns leave no reference
    cycle, so collections find almost nothing: at 700 they cost about 8% of a Redis-mode instance's
    instructions (``docs/performance.md``).  ``KRULES_GC_THRESHOLD=0`` leaves Python's settings."""
    if not settings.gc_threshold:
        return
    gc.collect()
    gc.freeze()
    gc.set_threshold(settings.gc_threshold, 50, 100)


def with_recorded_partitions(settings: Settings) -> Settings:
    """``settings`` with the partition count its deployment recorded (KRULES_PARTITIONS, or 1, when
    none is recorded yet: the instance records it when it starts).  A KRULES_PARTITIONS that differs
    from the recorded count is refused with one sentence."""
    url = settings.redis_url
    if not url:
        return settings
    read_count: Callable[[Settings], int | None] = _driver(LAYOUT_READERS, url, "storage")
    recorded = read_count(settings)
    if recorded is None:
        return replace(settings, partitions=settings.partition_count)
    if settings.partitions is not None and settings.partitions != recorded:
        raise ConfigurationError(
            f"The krules deployment under key prefix {settings.key_prefix!r} has {recorded} partitions, "
            f"but this instance was started with KRULES_PARTITIONS={settings.partitions}; set "
            f"KRULES_PARTITIONS={recorded} or leave it unset (the count cannot change while subjects are "
            "stored by partition)."
        )
    return replace(settings, partitions=recorded)


def _install_chain(settings: Settings, container: KRulesContainer) -> BuiltChain:
    from middleware.registry import build_default_chain

    chain = build_default_chain(settings)
    # The container's provider says what is installed; a registry built before (rules already
    # registered on this container) gets the chain added instead, outermost first as ever.
    container.middlewares.override(providers.Object(list(chain.middlewares)))
    registry = container.registry()
    installed = registry.middlewares
    for mw in chain.middlewares:
        if mw not in installed:
            registry.add_middleware(mw)
    return chain


def _partition_exporter(metrics: Any) -> Callable[[int, PartitionFigures], None]:
    def export(partition: int, figures: PartitionFigures) -> None:
        if figures.lag is not None:
            metrics.record_partition_lag(partition, figures.lag)
        metrics.record_partition_pending(partition, figures.pending)
        if figures.length is not None:
            metrics.record_stream_length(partition, figures.length)
        if figures.trimmed:
            metrics.record_stream_trimmed(partition, figures.trimmed)
        if figures.timers is not None:
            metrics.record_timers_pending(partition, figures.timers)

    return export


def _ownership_exporter(metrics: Any, leases: Any) -> Callable[[str, int], None]:
    """Counts each handover (``acquired`` / ``released``) and lease lost, and sets the owned
    partitions' gauge, as ``leases`` reports them (``observers``, ``owned()``)."""

    def export(what: str, partition: int) -> None:
        if what == "lost":
            metrics.record_lease_lost()
        else:
            metrics.record_handover(what)
        metrics.record_partitions_owned(len(leases.owned()))

    return export
