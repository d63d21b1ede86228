"""The Redis key schema: names, hash tags and the validation of what users configure."""

from __future__ import annotations

import pytest

from krules.errors import ConfigurationError
from krules.partitioning import partition_of
from storage.redis.keys import KeySchema, escape_glob, property_field


def test_a_subject_key_carries_the_hash_tag_of_its_partition() -> None:
    keys = KeySchema("app:", partitions=8)
    partition = partition_of("order-17", 8)

    assert keys.subject("order-17") == f"app:{{p{partition}}}:s:order-17"
    assert keys.tag(partition) == f"{{p{partition}}}"


def test_every_per_partition_key_shares_the_partition_tag() -> None:
    keys = KeySchema("krules:", partitions=4)

    assert keys.stream(3) == "krules:{p3}:stream"
    assert keys.processed(3) == "krules:{p3}:processed"
    assert keys.dead_letters(3) == "krules:{p3}:dlq"
    assert keys.partition_count() == "krules:partitions"


def test_ordinary_and_extended_properties_are_different_fields() -> None:
    assert property_field("status") == "p:status"
    assert property_field("status", ext=True) == "x:status"


@pytest.mark.parametrize("name", ["order-1", "", "a}:s:b", "{p9}:s:x", "ü 🚀", "a:b:c"])
def test_a_subject_name_is_read_back_from_its_key(name: str) -> None:
    keys = KeySchema("krules:", partitions=5)

    assert keys.subject_name(keys.subject(name)) == name


@pytest.mark.parametrize(
    "key",
    [
        "other:{p1}:s:x",
        "krules:{p1}:stream",
        "krules:{px}:s:x",
        "krules:{p}:s:x",
        "krules:{p\u0661}:s:x",  # a digit, but not an ASCII one
        "krules:{p1",
    ],
)
def test_keys_that_are_not_subject_keys_are_not_read_as_subjects(key: str) -> None:
    assert KeySchema("krules:").subject_name(key) is None


def test_glob_characters_in_prefixes_are_escaped_for_scan() -> None:
    assert escape_glob("a*b?c[d]e\\f") == "a\\*b\\?c\\[d\\]e\\\\f"
    assert KeySchema("k*:").subject_pattern("ord[1]") == "k\\*:{p*}:s:ord\\[1\\]*"


@pytest.mark.parametrize("prefix", ["krules{x}:", "a{", "b}"])
def test_a_key_prefix_with_a_brace_is_refused_with_a_clear_sentence(prefix: str) -> None:
    with pytest.raises(ConfigurationError, match=r"contains a brace.*without '\{' or '\}'") as caught:
        KeySchema(prefix)

    assert repr(prefix) in str(caught.value)


@pytest.mark.parametrize("partitions", [0, -1, True, 2.0])
def test_a_partition_count_that_is_not_a_positive_integer_is_refused(partitions: object) -> None:
    with pytest.raises(ConfigurationError, match="positive integer"):
        KeySchema("krules:", partitions)  # type: ignore[arg-type]
