"""Settings come from KRULES_* variables, and bad values are one clear sentence."""

from __future__ import annotations

import pytest

from krules.config import Settings
from krules.errors import ConfigurationError


def test_defaults_are_the_embedded_mode_on_loopback() -> None:
    settings = Settings.from_env({})
    assert (settings.http_host, settings.http_port, settings.redis_url) == ("127.0.0.1", 8080, None)
    assert settings.max_cascade_depth == 32


def test_environment_variables_and_overrides_are_applied() -> None:
    settings = Settings.from_env(
        {"KRULES_HTTP_PORT": "9000", "KRULES_LOG_JSON": "true", "KRULES_INGRESS_TOKEN": "t"},
        http_host="0.0.0.0",
    )
    assert (settings.http_port, settings.log_json, settings.ingress_token, settings.http_host) == (
        9000,
        True,
        "t",
        "0.0.0.0",
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"KRULES_HTTP_PORT": "eighty"}, "KRULES_HTTP_PORT='eighty' is not an integer."),
        (
            {"KRULES_HTTP_PORT": "70000"},
            "KRULES_HTTP_PORT='70000' is out of range; use a value between 0 and 65535.",
        ),
        ({"KRULES_MAX_CASCADE_DEPTH": "0"}, "KRULES_MAX_CASCADE_DEPTH='0' is out of range"),
        ({"KRULES_LOG_JSON": "maybe"}, "KRULES_LOG_JSON='maybe' is not a boolean"),
        ({"KRULES_LOG_LEVEL": "LOUD"}, "KRULES_LOG_LEVEL='LOUD' is not a log level"),
    ],
)
def test_bad_values_are_refused_with_a_sentence_naming_the_variable(
    env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings.from_env(env)
    assert str(info.value).startswith(message)
