"""Settings come from KRULES_* variables, and bad values are one clear sentence."""

from __future__ import annotations

import logging

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


def test_partition_ownership_accepts_auto_one_id_a_list_all_and_the_short_variable() -> None:
    assert Settings.from_env({"KRULES_PARTITIONS": "4", "KRULES_PARTITION_ID": "2"}).static_partitions == (2,)
    assert Settings.from_env({"KRULES_PARTITIONS": "4", "PARTITION_ID": "3, 1"}).static_partitions == (1, 3)
    assert Settings.from_env({"KRULES_PARTITIONS": "3", "KRULES_PARTITION_ID": "all"}).static_partitions == (
        0,
        1,
        2,
    )
    assert Settings.from_env({"KRULES_PARTITIONS": "3"}).static_partitions is None  # auto, the default
    assert Settings.from_env({"KRULES_PARTITION_ID": "AUTO"}).partition_id == "auto"


def test_the_partition_count_is_unset_unless_given_and_counts_as_one() -> None:
    assert Settings.from_env({}).partitions is None
    assert Settings.from_env({}).partition_count == 1
    assert Settings.from_env({"KRULES_PARTITIONS": "8"}).partition_count == 8


def test_a_lease_shorter_than_two_renewals_is_refused_in_one_sentence() -> None:
    with pytest.raises(
        ConfigurationError, match=r"KRULES_LEASE_MS=1500 must be at least twice KRULES_LEASE_RENEW_MS=1000"
    ):
        Settings.from_env({"KRULES_LEASE_MS": "1500"})


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


# -- KRules 3's environment ------------------------------------------------------------------------
def test_krules3_storage_host_selects_redis_with_the_url_krules3_builds_from_the_parts() -> None:
    settings = Settings.from_env(
        {
            "KRULES_STORAGE_REDIS_HOST": "redis.internal",
            "KRULES_STORAGE_REDIS_PORT": "6380",
            "KRULES_STORAGE_REDIS_DB": "2",
            "KRULES_STORAGE_REDIS_PASSWORD": "pass123",
            "KRULES_STORAGE_REDIS_KEY_PREFIX": "app:",
        }
    )
    assert (settings.redis_url, settings.key_prefix) == ("redis://:pass123@redis.internal:6380/2", "app:")


def test_krules3_storage_defaults_port_6379_db_0_and_tls_makes_the_url_rediss() -> None:
    settings = Settings.from_env(
        {"KRULES_STORAGE_REDIS_HOST": "secure.example", "KRULES_STORAGE_REDIS_USE_TLS": "true"}
    )
    assert settings.redis_url == "rediss://secure.example:6379/0"
    assert settings.key_prefix == "krules:"  # KRules' prefix only when its variable is set


def test_a_krules3_password_with_url_characters_is_quoted_into_the_url() -> None:
    settings = Settings.from_env(
        {"KRULES_STORAGE_REDIS_HOST": "h", "KRULES_STORAGE_REDIS_PASSWORD": "p@ss/w:rd"}
    )
    assert settings.redis_url == "redis://:p%40ss%2Fw%3Ard@h:6379/0"


def test_the_legacy_subjects_redis_url_selects_redis_and_wins_over_the_krules3_parts() -> None:
    assert (
        Settings.from_env({"SUBJECTS_REDIS_URL": "redis://legacy:6379/0"}).redis_url
        == "redis://legacy:6379/0"
    )
    settings = Settings.from_env(
        {"SUBJECTS_REDIS_URL": "redis://legacy:6379/0", "KRULES_STORAGE_REDIS_HOST": "new"}
    )
    assert settings.redis_url == "redis://legacy:6379/0"


@pytest.mark.parametrize("provider", ["redis", "REDIS"])
def test_the_krules3_redis_provider_is_redis_mode(provider: str) -> None:
    env = {"KRULES_STORAGE_PROVIDER": provider, "KRULES_STORAGE_REDIS_HOST": "localhost"}
    assert Settings.from_env(env).redis_url == "redis://localhost:6379/0"
    assert Settings.from_env(
        {"KRULES_STORAGE_PROVIDER": provider, "KRULES_REDIS_URL": "redis://r/1"}
    ).redis_url == ("redis://r/1")


@pytest.mark.parametrize("provider", ["empty", "memory", ""])
def test_the_krules3_empty_provider_is_the_embedded_mode_even_with_a_host_named(provider: str) -> None:
    assert Settings.from_env({"KRULES_STORAGE_PROVIDER": provider}).redis_url is None
    if provider:  # an explicit choice overrides the host, as in KRules
        env = {"KRULES_STORAGE_PROVIDER": provider, "KRULES_STORAGE_REDIS_HOST": "localhost"}
        assert Settings.from_env(env).redis_url is None


def test_the_same_redis_url_from_krules3_and_krules_variables_is_accepted() -> None:
    env = {"SUBJECTS_REDIS_URL": "redis://r:6379/0", "KRULES_REDIS_URL": "redis://r:6379/0"}
    assert Settings.from_env(env).redis_url == "redis://r:6379/0"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"KRULES_STORAGE_REDIS_PORT": "abc"}, "KRULES_STORAGE_REDIS_PORT='abc' is not an integer."),
        (
            {"KRULES_STORAGE_REDIS_DB": "-1"},
            "KRULES_STORAGE_REDIS_DB='-1' is out of range; use a value at least 0.",
        ),
        (
            {"KRULES_STORAGE_REDIS_USE_TLS": "si"},
            "KRULES_STORAGE_REDIS_USE_TLS='si' is not a boolean; use true or false.",
        ),
        (
            {"KRULES_STORAGE_PROVIDER": "postgres"},
            "KRULES_STORAGE_PROVIDER='postgres' is not a storage krules has; use redis, or empty for the "
            "embedded in-memory storage.",
        ),
        (
            {"KRULES_STORAGE_PROVIDER": "redis"},
            "KRULES_STORAGE_PROVIDER='redis' names no Redis server; set KRULES_STORAGE_REDIS_HOST "
            "(or KRULES_REDIS_URL).",
        ),
        (
            {"SUBJECTS_REDIS_URL": "redis://a:6379/0", "KRULES_REDIS_URL": "redis://:secret@b:6379/0"},
            "SUBJECTS_REDIS_URL names 'redis://a:6379/0' but KRULES_REDIS_URL names 'redis://:***@b:6379/0'; "
            "set only one of them.",
        ),
        (
            {"KRULES_STORAGE_REDIS_HOST": "a", "KRULES_REDIS_URL": "redis://b:6379/0"},
            "KRULES_STORAGE_REDIS_HOST names 'redis://a:6379/0' but KRULES_REDIS_URL names "
            "'redis://b:6379/0'; set only one of them.",
        ),
        (
            {"KRULES_STORAGE_PROVIDER": "empty", "KRULES_REDIS_URL": "redis://b:6379/0"},
            "KRULES_STORAGE_PROVIDER='empty' asks for the embedded storage but "
            "KRULES_REDIS_URL='redis://b:6379/0' for Redis; unset one of them.",
        ),
        (
            {"KRULES_STORAGE_REDIS_KEY_PREFIX": "app:", "KRULES_KEY_PREFIX": "other:"},
            "KRULES_STORAGE_REDIS_KEY_PREFIX='app:' and KRULES_KEY_PREFIX='other:' differ; "
            "set only one of them.",
        ),
    ],
)
def test_bad_or_conflicting_krules3_storage_settings_are_one_sentence(
    env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings.from_env(env)
    assert str(info.value) == message


def test_an_unknown_krules_variable_far_from_every_setting_is_logged_once_and_ignored(
    caplog: pytest.LogCaptureFixture,
) -> None:
    env = {"KRULES_TEST_REDIS_URL_K16B": "redis://elsewhere/0"}
    with caplog.at_level(logging.WARNING, logger="krules.config"):
        first = Settings.from_env(env)
        Settings.from_env(env)
    assert first == Settings()
    warnings = [r.getMessage() for r in caplog.records if "KRULES_TEST_REDIS_URL_K16B" in r.getMessage()]
    assert warnings == [
        "KRULES_TEST_REDIS_URL_K16B is not a krules setting; ignored (see the README's configuration table)"
    ]


@pytest.mark.parametrize(
    ("var", "closest"),
    [
        ("KRULES_REDIS_ULR", "KRULES_REDIS_URL"),  # two letters swapped
        ("KRULES_HTTP_PORTS", "KRULES_HTTP_PORT"),
        ("KRULES_STORAGE_REDIS_HOTS", "KRULES_STORAGE_REDIS_HOST"),
        ("KRULES_Redis_Url", "KRULES_REDIS_URL"),
    ],
)
def test_a_krules_variable_within_two_edits_of_a_setting_is_still_refused_as_a_typo(
    var: str, closest: str
) -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings.from_env({var: "x"})
    assert str(info.value) == f"{var} is not a krules setting; did you mean {closest}?"


def test_the_gc_policy_of_an_instance_is_a_threshold_that_zero_turns_off() -> None:
    import gc

    from krules.assembly import apply_gc_policy

    before = gc.get_threshold()
    try:
        apply_gc_policy(Settings.from_env({"KRULES_GC_THRESHOLD": "0"}))
        assert gc.get_threshold() == before
        apply_gc_policy(Settings.from_env({}))
        assert gc.get_threshold() == (20_000, 50, 100)
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
    with pytest.raises(ConfigurationError, match="KRULES_GC_THRESHOLD='lots' is not an integer"):
        Settings.from_env({"KRULES_GC_THRESHOLD": "lots"})
