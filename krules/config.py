"""Engine settings, read from ``KRULES_*`` environment variables and validated in one place."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from krules.errors import ConfigurationError

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
    log_level: str = "INFO"
    log_json: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read ``KRULES_<FIELD>`` variables (e.g. ``KRULES_HTTP_PORT``); raise ConfigurationError if bad."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            var = "KRULES_" + f.name.upper()
            raw = env.get(var)
            if raw is not None:
                values[f.name] = _PARSERS[f.name](var, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return replace(cls(), **values)


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
    "log_level": _log_level,
    "log_json": _bool,
}
