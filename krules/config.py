"""Engine settings, read from ``KRULES_*`` environment variables and validated in one place."""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from krules.errors import ConfigurationError
from krules.partitioning import parse_partition_ids

__all__ = ["Settings"]


def _int(minimum: int, maximum: int | None = None) -> Callable[[str, str], int]:
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


def _bool(var: str, raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ConfigurationError(f"{var}={raw!r} is not a boolean; use true or false.")


def _text(var: str, raw: str) -> str:
    return raw


def _optional_text(var: str, raw: str) -> str | None:
    return raw or None


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


def _float(minimum: float, *, inclusive: bool = False) -> Callable[[str, str], float]:
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


def _optional_seconds(var: str, raw: str) -> float | None:
    if raw.strip().lower() in {"", "none", "off"}:
        return None
    return _float(0.0)(var, raw)


def _choice(*choices: str) -> Callable[[str, str], str]:
    def parse(var: str, raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise ConfigurationError(f"{var}={raw!r} is not one of {', '.join(choices)}.")
        return value

    return parse


def _middleware_list(var: str, raw: str) -> str:
    from middleware.names import parse_middleware_names  # the list of built-ins lives with them

    parse_middleware_names(raw, var)
    return raw.strip()


def _log_level(var: str, raw: str) -> str:
    level = raw.strip().upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
        raise ConfigurationError(f"{var}={raw!r} is not a log level; use DEBUG, INFO, WARNING or ERROR.")
    return level


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything an engine instance can be told from outside; defaults are the embedded mode."""

    http_host: str = "127.0.0.1"
    http_port: int = 8080
    ingress_token: str | None = None
    ingress_max_bytes: int = 1 << 20
    max_cascade_depth: int = 32
    max_concurrent_turns: int = 256
    source: str = "krules"
    redis_url: str | None = None
    key_prefix: str = "krules:"
    partitions: int = 1
    partition_id: str = "all"
    consumer: str | None = None
    stream_batch: int = 100
    stream_block_ms: int = 1000
    claim_idle_ms: int = 30_000
    max_deliveries: int = 5
    dedupe_window: int = 3600
    middleware: str = "default"
    handler_log_level: str = "INFO"
    circuit_failures: int = 5
    circuit_open_seconds: float = 30.0
    circuit_key: str = "handler"
    retry_max_attempts: int = 10
    retry_backoff: float = 0.1
    retry_cap: float = 10.0
    handler_timeout: float | None = None
    log_level: str = "INFO"
    log_json: bool = False

    @property
    def owned_partitions(self) -> tuple[int, ...]:
        """The partitions this instance reads (``partition_id`` parsed against ``partitions``)."""
        return parse_partition_ids(self.partition_id, self.partitions)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read ``KRULES_<FIELD>`` variables (e.g. ``KRULES_HTTP_PORT``); raise ConfigurationError if bad."""
        env = os.environ if env is None else env
        _refuse_unknown(env)
        values: dict[str, Any] = {}
        for f in fields(cls):
            var = "KRULES_" + f.name.upper()
            raw = env.get(var)
            if raw is not None:
                values[f.name] = _PARSERS[f.name](var, raw)
        if "partition_id" not in values and env.get("PARTITION_ID") is not None:
            values["partition_id"] = _partition_spec("PARTITION_ID", env["PARTITION_ID"])
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = replace(cls(), **values)
        settings.owned_partitions  # noqa: B018 - validates the spec against the partition count
        return settings


_PARSERS: dict[str, Callable[[str, str], Any]] = {
    "http_host": _text,
    "http_port": _int(0, 65535),
    "ingress_token": _optional_text,
    "ingress_max_bytes": _int(1024),
    "max_cascade_depth": _int(1, 10_000),
    "max_concurrent_turns": _int(1),
    "source": _text,
    "redis_url": _optional_text,
    "key_prefix": _text,
    "partitions": _int(1, 16_384),
    "partition_id": _partition_spec,
    "consumer": _consumer,
    "stream_batch": _int(1, 10_000),
    "stream_block_ms": _int(1, 60_000),
    "claim_idle_ms": _int(100),
    "max_deliveries": _int(1),
    "dedupe_window": _int(1),
    "middleware": _middleware_list,
    "handler_log_level": _log_level,
    "circuit_failures": _int(1),
    "circuit_open_seconds": _float(0.0),
    "circuit_key": _choice("handler", "subject"),
    "retry_max_attempts": _int(1, 1000),
    "retry_backoff": _float(0.0),
    "retry_cap": _float(0.0),
    "handler_timeout": _optional_seconds,
    "log_level": _log_level,
    "log_json": _bool,
}


_KNOWN_ELSEWHERE = frozenset({"KRULES_BASELINE_PYTHON"})  # the benchmarks' own


def _refuse_unknown(env: Mapping[str, str]) -> None:
    """A misspelt ``KRULES_*`` variable would silently be ignored: refuse it, naming the closest one."""
    known = {"KRULES_" + f.name.upper() for f in fields(Settings)} | _KNOWN_ELSEWHERE
    for var in env:
        if var.startswith("KRULES_") and var not in known:
            close = difflib.get_close_matches(var, sorted(known), n=1)
            hint = f"; did you mean {close[0]}?" if close else "; see the README's configuration table."
            raise ConfigurationError(f"{var} is not a krules setting{hint}")
