"""Engine settings, read from ``KRULES_*`` environment variables and validated in one place.

:class:`Settings` are the engine's.  A layer above that reads variables of its own from the same
environment (the built-in middleware's ``KRULES_CIRCUIT_*``...) declares them the same way, as an
:class:`EnvSettings` dataclass whose fields are declared with :func:`setting` and a parser, and
hands it to :meth:`Settings.from_env` (``extra=``) so that its variables count as krules settings:
a misspelt ``KRULES_*`` variable is refused, naming the closest known one.
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Final, Self, TypeVar

from krules.decoding import MAX_EVENT_BYTES
from krules.errors import ConfigurationError
from krules.partitioning import parse_partition_ids

__all__ = [
    "EnvSettings",
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
        raise ConfigurationError(f"{var} is empty; give a partition id, a list like 0,2, or all.")
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
    key_prefix: str = setting("krules:", text)
    partitions: int = setting(1, integer(1, 16_384))
    partition_id: str = setting("all", _partition_spec)
    consumer: str | None = setting(None, _consumer)
    stream_batch: int = setting(100, integer(1, 10_000))
    stream_block_ms: int = setting(1000, integer(1, 60_000))
    claim_idle_ms: int = setting(30_000, integer(100))
    max_deliveries: int = setting(5, integer(1))
    dedupe_window: int = setting(3600, integer(1))
    max_stream_backlog: int = setting(100_000, integer(1))
    log_level: str = setting("INFO", log_level)
    log_json: bool = setting(False, boolean)

    def __post_init__(self) -> None:
        if self.ingress_token is not None:  # Settings(ingress_token="") too, not only the variable
            _token("KRULES_INGRESS_TOKEN", self.ingress_token)

    @property
    def owned_partitions(self) -> tuple[int, ...]:
        """The partitions this instance reads (``partition_id`` parsed against ``partitions``)."""
        return parse_partition_ids(self.partition_id, self.partitions)

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
        _refuse_unknown(env, (cls, *extra))
        values = _read(cls, env)
        if "partition_id" not in values and env.get("PARTITION_ID") is not None:
            values["partition_id"] = _partition_spec("PARTITION_ID", env["PARTITION_ID"])
        for section in extra:
            section.from_env(env)
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = replace(cls(), **values)
        settings.owned_partitions  # noqa: B018 - validates the spec against the partition count
        return settings


_KNOWN_ELSEWHERE = frozenset({"KRULES_BASELINE_PYTHON"})  # the benchmarks' own


def _refuse_unknown(env: Mapping[str, str], sections: Iterable[type[EnvSettings]]) -> None:
    """A misspelt ``KRULES_*`` variable would silently be ignored: refuse it, naming the closest one."""
    known = {var for section in sections for var, _ in _variables(section).values()}
    known |= _KNOWN_ELSEWHERE
    for var in env:
        if var.startswith("KRULES_") and var not in known:
            close = difflib.get_close_matches(var, sorted(known), n=1)
            hint = f"; did you mean {close[0]}?" if close else "; see the README's configuration table."
            raise ConfigurationError(f"{var} is not a krules setting{hint}")
