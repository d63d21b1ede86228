"""Engine settings, read from ``KRULES_*`` environment variables and validated in one place.

:class:`Settings` are the engine's.  A layer above that reads variables of its own from the same
environment (the built-in middleware's ``KRULES_CIRCUIT_*``...) declares them the same way, as an
:class:`EnvSettings` dataclass whose fields are declared with :func:`setting` and a parser, and
hands it to :meth:`Settings.from_env` (``extra=``) so that its variables count as krules settings:
a misspelt ``KRULES_*`` variable (within two edits of a known one) is refused, naming it; any other
``KRULES_*`` variable belongs to someone else (a test suite's ``KRULES_TEST_REDIS_URL``) and is
logged once as ignored.

KRules 3's storage variables (:class:`KRules3Storage`: ``KRULES_STORAGE_PROVIDER``,
``KRULES_STORAGE_REDIS_*`` and the legacy ``SUBJECTS_REDIS_URL``) are read too, with KRules'
meaning, so a KRules deployment's environment starts krules in the mode it started KRules in.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Final, Self, TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

from krules.decoding import MAX_EVENT_BYTES
from krules.errors import ConfigurationError
from krules.partitioning import parse_partition_ids

__all__ = [
    "EnvSettings",
    "KRules3Storage",
    "Parser",
    "Settings",
    "boolean",
    "choice",
    "integer",
    "log_level",
    "number",
    "optional_seconds",
    "optional_text",
    "setting",
    "text",
]

T = TypeVar("T")

logger = logging.getLogger(__name__)

Parser = Callable[[str, str], Any]
"""``parse(var, raw) -> value`` for one environment variable; a bad value raises ConfigurationError
naming ``var``, in one sentence."""

_PARSER: Final = "krules.parser"  # the field metadata key of a setting's parser


def setting(default: T, parse: Parser) -> T:
    """A field of an :class:`EnvSettings` dataclass: read from ``KRULES_<FIELD NAME>`` with ``parse``,
    ``default`` when the variable is unset."""
    value: T = field(default=default, metadata={_PARSER: parse})
    return value


def integer(minimum: int, maximum: int | None = None) -> Callable[[str, str], int]:
    """A parser of integers from ``minimum`` (to ``maximum``, inclusive)."""

    def parse(var: str, raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ConfigurationError(f"{var}={raw!r} is not an integer.") from None
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
            raise ConfigurationError(f"{var}={raw!r} is out of range; use a value {bound}.")
        return value

    return parse


def number(minimum: float, *, inclusive: bool = False) -> Callable[[str, str], float]:
    """A parser of finite numbers greater than ``minimum`` (or equal to it, ``inclusive``)."""

    def parse(var: str, raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise ConfigurationError(f"{var}={raw!r} is not a number.") from None
        if math.isnan(value) or math.isinf(value) or value < minimum or (value == minimum and not inclusive):
            bound = f"at least {minimum:g}" if inclusive else f"greater than {minimum:g}"
            raise ConfigurationError(f"{var}={raw!r} is out of range; use a number {bound}.")
        return value

    return parse


def optional_seconds(var: str, raw: str) -> float | None:
    """A positive number of seconds, or None for ``none``, ``off`` or nothing."""
    if raw.strip().lower() in {"", "none", "off"}:
        return None
    return number(0.0)(var, raw)


def choice(*choices: str) -> Callable[[str, str], str]:
    """A parser of one of ``choices`` (lower-cased)."""

    def parse(var: str, raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise ConfigurationError(f"{var}={raw!r} is not one of {', '.join(choices)}.")
        return value

    return parse


def boolean(var: str, raw: str) -> bool:
    """``true``/``yes``/``on``/``1`` or ``false``/``no``/``off``/``0``/nothing."""
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ConfigurationError(f"{var}={raw!r} is not a boolean; use true or false.")


def text(var: str, raw: str) -> str:
    """The value as it is."""
    return raw


def optional_text(var: str, raw: str) -> str | None:
    """The value, or None when it is empty."""
    return raw or None


def log_level(var: str, raw: str) -> str:
    """A log level name, upper-cased."""
    level = raw.strip().upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
        raise ConfigurationError(f"{var}={raw!r} is not a log level; use DEBUG, INFO, WARNING or ERROR.")
    return level


def _token(var: str, raw: str) -> str:
    if not raw.strip():
        raise ConfigurationError(
            f"{var} is set but empty, which would leave the ingress open to anyone; give it a secret "
            "value, or unset it to run without a token."
        )
    return raw


def _partition_spec(var: str, raw: str) -> str:
    if not raw.strip():
        raise ConfigurationError(f"{var} is empty; give auto, a partition id, a list like 0,2, or all.")
    if raw.strip().lower() == "auto":
        return "auto"
    parse_partition_ids(raw, 16_384, var)  # the syntax; the range is checked against KRULES_PARTITIONS
    return raw.strip()


def _consumer(var: str, raw: str) -> str | None:
    name = raw.strip()
    if name and not all(c.isalnum() or c in "-_.:@" for c in name):
        raise ConfigurationError(
            f"{var}={raw!r} is not a usable consumer name; use letters, digits and - _ . : @."
        )
    return name or None


def _variables(section: type[Any]) -> dict[str, tuple[str, Parser]]:
    """Field name -> (its ``KRULES_*`` variable, its parser), for the settings of ``section``."""
    return {f.name: ("KRULES_" + f.name.upper(), f.metadata[_PARSER]) for f in fields(section)}


def _read(section: type[Any], env: Mapping[str, str]) -> dict[str, Any]:
    """The settings of ``section`` whose variable is set in ``env``, parsed (ConfigurationError if bad)."""
    values: dict[str, Any] = {}
    for name, (var, parse) in _variables(section).items():
        raw = env.get(var)
        if raw is not None:
            values[name] = parse(var, raw)
    return values


class EnvSettings:
    """Base of a frozen dataclass of settings, each field a :func:`setting` read from ``KRULES_<FIELD>``."""

    __slots__ = ()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Self:
        """The settings from ``env`` (default: the process environment); ConfigurationError if bad.

        Variables of other settings are not looked at: :meth:`Settings.from_env` refuses unknown ones.
        """
        values = _read(cls, os.environ if env is None else env)
        return cls(**values)


@dataclass(frozen=True, slots=True)
class Settings(EnvSettings):
    """Everything an engine instance can be told from outside; defaults are the embedded mode."""

    http_host: str = setting("127.0.0.1", text)
    http_port: int = setting(8080, integer(0, 65535))
    ingress_token: str | None = setting(None, _token)
    ingress_max_bytes: int = setting(MAX_EVENT_BYTES, integer(1024))
    ingress_max_queued_bytes: int = setting(64 << 20, integer(1024))
    http_max_connections: int = setting(1000, integer(1))
    http_header_timeout: float = setting(10.0, number(0.0))
    http_idle_timeout: float = setting(5.0, number(0.0))
    http_body_timeout: float = setting(30.0, number(0.0))
    shutdown_timeout: float = setting(30.0, number(0.0, inclusive=True))
    max_cascade_depth: int = setting(32, integer(1, 10_000))
    max_concurrent_turns: int = setting(256, integer(1))
    max_queued_turns: int = setting(10_000, integer(1))
    handler_order: str = setting("concurrent", choice("concurrent", "sequential"))
    source: str = setting("krules", text)
    redis_url: str | None = setting(None, optional_text)
    redis_wait_replicas: int = setting(0, integer(0, 64))
    redis_wait_timeout_ms: int = setting(1000, integer(1, 60_000))
    key_prefix: str = setting("krules:", text)
    partitions: int | None = setting(None, integer(1, 16_384))
    partition_id: str = setting("auto", _partition_spec)
    consumer: str | None = setting(None, _consumer)
    lease_ms: int = setting(10_000, integer(100, 3_600_000))
    lease_renew_ms: int = setting(1_000, integer(10, 1_800_000))
    stream_batch: int = setting(100, integer(1, 10_000))
    stream_block_ms: int = setting(1000, integer(1, 60_000))
    claim_idle_ms: int = setting(30_000, integer(100))
    timer_poll_ms: int = setting(20, integer(1, 60_000))
    max_deliveries: int = setting(5, integer(1))
    dedupe_window: int = setting(3600, integer(1))
    max_stream_backlog: int = setting(100_000, integer(1))
    log_level: str = setting("INFO", log_level)
    log_json: bool = setting(False, boolean)
    gc_threshold: int = setting(20_000, integer(0, 10_000_000))

    def __post_init__(self) -> None:
        if self.ingress_token is not None:  # Settings(ingress_token="") too, not only the variable
            _token("KRULES_INGRESS_TOKEN", self.ingress_token)
        if self.lease_renew_ms * 2 > self.lease_ms:
            raise ConfigurationError(
                f"KRULES_LEASE_MS={self.lease_ms} must be at least twice KRULES_LEASE_RENEW_MS="
                f"{self.lease_renew_ms}, so that a partition's lease outlives a missed renewal."
            )

    @property
    def partition_count(self) -> int:
        """The partition count: ``partitions``, or 1 when not given (a Redis-mode instance is
        assembled with the count its deployment recorded, see :func:`krules.assembly.assemble`)."""
        return self.partitions or 1

    @property
    def static_partitions(self) -> tuple[int, ...] | None:
        """The partitions this instance asks for by id (``partition_id`` parsed against the
        partition count), or None with ``auto``: a share, assigned as instances come and go."""
        if self.partition_id == "auto":
            return None
        return parse_partition_ids(self.partition_id, self.partition_count)

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str] | None = None,
        *,
        extra: Iterable[type[EnvSettings]] = (),
        **overrides: Any,
    ) -> Self:
        """Read ``KRULES_<FIELD>`` variables (e.g. ``KRULES_HTTP_PORT``); raise ConfigurationError if bad.

        ``extra``: the settings of the layers above read from the same environment (the built-in
        middleware's, ``middleware.registry.MIDDLEWARE_SETTINGS``).  Their variables count as krules
        settings, so they are not refused as misspelt, and they are checked here too: a bad value
        stops start-up as early as the engine's own.  ``overrides`` (those not None) replace what
        ``env`` says.
        """
        env = os.environ if env is None else env
        extra = tuple(extra)
        _check_unknown(env, (cls, KRules3Storage, *extra))
        values = _read(cls, env)
        _apply_krules3_storage(env, values)
        if "partition_id" not in values and env.get("PARTITION_ID") is not None:
            values["partition_id"] = _partition_spec("PARTITION_ID", env["PARTITION_ID"])
        for section in extra:
            section.from_env(env)
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = replace(cls(), **values)
        if settings.partitions is not None:  # else against the count recorded, once it is read
            settings.static_partitions  # noqa: B018 - validates the spec against the partition count
        return settings


def _storage_provider(var: str, raw: str) -> str | None:
    value = raw.strip().lower()
    if value in {"", "redis"}:
        return value or None  # unset or empty: decided by whether a Redis server is named, as in KRules
    if value in {"empty", "memory"}:
        return "empty"
    raise ConfigurationError(
        f"{var}={raw!r} is not a storage krules has; use redis, or empty for the embedded in-memory storage."
    )


@dataclass(frozen=True, slots=True)
class KRules3Storage(EnvSettings):
    """KRules 3's storage variables (``KRULES_STORAGE_*``), read with KRules' defaults and meaning.

    They name krules' ``redis_url`` and ``key_prefix`` another way: see :func:`_apply_krules3_storage`.
    """

    storage_provider: str | None = setting(None, _storage_provider)
    storage_redis_host: str | None = setting(None, optional_text)
    storage_redis_port: int = setting(6379, integer(1, 65535))
    storage_redis_db: int = setting(0, integer(0))
    storage_redis_password: str | None = setting(None, optional_text)
    storage_redis_use_tls: bool = setting(False, boolean)
    storage_redis_key_prefix: str | None = setting(None, text)

    @property
    def redis_url(self) -> str | None:
        """The URL KRules builds from the parts (``rediss`` with TLS), or None without a host."""
        if self.storage_redis_host is None:
            return None
        auth = f":{quote(self.storage_redis_password, safe='')}@" if self.storage_redis_password else ""
        scheme = "rediss" if self.storage_redis_use_tls else "redis"
        return f"{scheme}://{auth}{self.storage_redis_host}:{self.storage_redis_port}/{self.storage_redis_db}"


def _apply_krules3_storage(env: Mapping[str, str], values: dict[str, Any]) -> None:
    """Turn KRules 3's storage variables into ``redis_url``/``key_prefix`` in ``values``.

    As in KRules, ``SUBJECTS_REDIS_URL`` wins over the ``KRULES_STORAGE_REDIS_*`` parts, a named
    server means Redis unless ``KRULES_STORAGE_PROVIDER`` says otherwise, and ``empty`` means the
    embedded storage even with a server named.  Against krules' own ``KRULES_REDIS_URL`` and
    ``KRULES_KEY_PREFIX`` nothing wins: the same value twice is fine, two different ones are refused.
    """
    krules3 = KRules3Storage.from_env(env)
    own_url: str | None = values.get("redis_url")
    url, url_var = env.get("SUBJECTS_REDIS_URL") or None, "SUBJECTS_REDIS_URL"
    if url is None:
        url, url_var = krules3.redis_url, "KRULES_STORAGE_REDIS_HOST"
    provider = krules3.storage_provider or ("redis" if url is not None else None)
    if provider == "empty":
        if own_url is not None:
            raise ConfigurationError(
                f"KRULES_STORAGE_PROVIDER={env['KRULES_STORAGE_PROVIDER']!r} asks for the embedded storage "
                f"but KRULES_REDIS_URL={_redacted(own_url)!r} for Redis; unset one of them."
            )
    elif provider == "redis":
        if url is None and own_url is None:
            raise ConfigurationError(
                "KRULES_STORAGE_PROVIDER='redis' names no Redis server; set KRULES_STORAGE_REDIS_HOST "
                "(or KRULES_REDIS_URL)."
            )
        if url is not None and own_url is not None and url != own_url:
            raise ConfigurationError(
                f"{url_var} names {_redacted(url)!r} but KRULES_REDIS_URL names {_redacted(own_url)!r}; "
                "set only one of them."
            )
        values["redis_url"] = url or own_url
    prefix = krules3.storage_redis_key_prefix
    if prefix is not None:
        own_prefix = values.get("key_prefix")
        if own_prefix is not None and own_prefix != prefix:
            raise ConfigurationError(
                f"KRULES_STORAGE_REDIS_KEY_PREFIX={prefix!r} and KRULES_KEY_PREFIX={own_prefix!r} differ; "
                "set only one of them."
            )
        values["key_prefix"] = prefix


def _redacted(url: str) -> str:
    """``url`` without its password, fit for an error message."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


_KNOWN_ELSEWHERE = frozenset({"KRULES_BASELINE_PYTHON"})  # the benchmarks' own
_TYPO_EDITS: Final = 2
"""A ``KRULES_*`` variable this many edits (or fewer) from a setting is taken for a misspelling of it."""
_ignored_logged: set[str] = set()  # unknown variables already logged, to log each once per process


def _check_unknown(env: Mapping[str, str], sections: Iterable[type[EnvSettings]]) -> None:
    """Refuse a misspelt ``KRULES_*`` variable, naming the setting it is close to; log others once.

    A misspelling would silently be ignored, so it stops start-up; a name far from every setting is
    some other program's (a test suite's ``KRULES_TEST_REDIS_URL``) and only logged as ignored.
    """
    known = {var for section in sections for var, _ in _variables(section).values()}
    known |= _KNOWN_ELSEWHERE
    for var in env:
        if not var.startswith("KRULES_") or var in known:
            continue
        distance, closest = min((_edit_distance(var.upper(), name), name) for name in known)
        if distance <= _TYPO_EDITS:
            raise ConfigurationError(f"{var} is not a krules setting; did you mean {closest}?")
        if var not in _ignored_logged:
            _ignored_logged.add(var)
            logger.warning("%s is not a krules setting; ignored (see the README's configuration table)", var)


def _edit_distance(a: str, b: str) -> int:
    """Insertions, deletions, substitutions and swaps of neighbours that turn ``a`` into ``b``."""
    previous2: list[int] = []
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            cost = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb))
            if i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb:
                cost = min(cost, previous2[j - 2] + 1)
            current.append(cost)
        previous2, previous = previous, current
    return previous[-1]
