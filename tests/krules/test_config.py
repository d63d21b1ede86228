"""Settings come from KRULES_* variables, and bad values are one clear sentence."""

from __future__ import annotations

import pytest

from krules.config import Settings
from krules.errors import ConfigurationError
from middleware.registry import MIDDLEWARE_SETTINGS


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


def test_a_misspelt_krules_variable_is_refused_naming_the_closest_setting() -> None:
    with pytest.raises(
        ConfigurationError,
        match="KRULES_CIRCUT_FAILURES is not a krules setting; did you mean KRULES_CIRCUIT_FAILURES",
    ):
        Settings.from_env({"KRULES_CIRCUT_FAILURES": "3"}, extra=MIDDLEWARE_SETTINGS)


def test_partition_ownership_accepts_one_id_a_list_all_and_the_short_variable() -> None:
    assert Settings.from_env({"KRULES_PARTITIONS": "4", "KRULES_PARTITION_ID": "2"}).owned_partitions == (2,)
    assert Settings.from_env({"KRULES_PARTITIONS": "4", "PARTITION_ID": "3, 1"}).owned_partitions == (1, 3)
    assert Settings.from_env({"KRULES_PARTITIONS": "3"}).owned_partitions == (0, 1, 2)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"KRULES_PARTITIONS": "2", "KRULES_PARTITION_ID": "2"}, "names partition 2, but there are only 2"),
        ({"KRULES_PARTITION_ID": "first"}, "is not a partition id"),
        ({"KRULES_MIDDLEWARE": "logging,loggin"}, "names unknown middleware 'loggin'"),
        ({"KRULES_CIRCUIT_FAILURES": "-1"}, "KRULES_CIRCUIT_FAILURES='-1' is out of range"),
        ({"KRULES_CIRCUIT_OPEN_SECONDS": "0"}, "use a number greater than 0"),
        ({"KRULES_RETRY_BACKOFF": "nan"}, "KRULES_RETRY_BACKOFF='nan' is out of range"),
        ({"KRULES_CIRCUIT_KEY": "tenant"}, "is not one of handler, subject"),
        ({"KRULES_HANDLER_TIMEOUT": "soon"}, "KRULES_HANDLER_TIMEOUT='soon' is not a number"),
        ({"KRULES_CONSUMER": "a b"}, "is not a usable consumer name"),
    ],
)
def test_bad_partition_and_middleware_settings_are_one_sentence(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        Settings.from_env(env, extra=MIDDLEWARE_SETTINGS)


def test_a_container_reads_a_built_in_middleware_setting_from_the_environment_and_refuses_a_misspelt_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from krules.container import KRulesContainer

    monkeypatch.setenv("KRULES_CIRCUIT_FAILURES", "3")
    assert KRulesContainer().settings() == Settings()
    monkeypatch.setenv("KRULES_CIRCUT_FAILURES", "3")
    with pytest.raises(ConfigurationError, match="KRULES_CIRCUIT_FAILURES"):
        KRulesContainer().settings()
