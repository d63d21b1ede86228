"""Which partition a subject belongs to, and which partitions an instance owns.

``partition = crc32(utf8(subject)) % partitions``: the CRC-32 of IEEE 802.3 (zlib's, Java's
``java.util.zip.CRC32``, Go's ``hash/crc32.ChecksumIEEE``, Node's ``zlib.crc32``) of the subject
name's UTF-8 bytes, as an unsigned 32-bit number, modulo the partition count.  It is the same in
every process, machine and language (Python's ``hash()`` is salted per process and must never be
used for this).  Examples (CRC-32, then with 4 partitions)::

    order-1     3769860079 -> 3
    order-2     2042244693 -> 1
    user-ada    2807074548 -> 0
    café        2561491637 -> 1      (UTF-8 bytes 63 61 66 c3 a9)
"""

from __future__ import annotations

from zlib import crc32

from krules.errors import ConfigurationError

__all__ = ["parse_partition_ids", "partition_of"]


def partition_of(subject: str, partitions: int) -> int:
    """Return ``crc32(utf8(subject)) % partitions`` (never Python's per-process salted ``hash()``)."""
    return crc32(subject.encode("utf-8")) % partitions


def parse_partition_ids(spec: str, partitions: int, var: str = "KRULES_PARTITION_ID") -> tuple[int, ...]:
    """Parse an ownership spec: one id (``2``), a list (``0,2``) or ``all``; ids are < ``partitions``."""
    text = spec.strip().lower()
    if text in {"all", "*"}:
        return tuple(range(partitions))
    owned: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not (part.isascii() and part.isdigit()):
            raise ConfigurationError(
                f"{var}={spec!r} is not a partition id, a comma-separated list of ids or 'all'."
            )
        number = int(part)
        if number >= partitions:
            raise ConfigurationError(
                f"{var}={spec!r} names partition {number}, but there are only {partitions} "
                f"(ids 0 to {partitions - 1}); fix {var} or KRULES_PARTITIONS."
            )
        if number not in owned:
            owned.append(number)
    return tuple(sorted(owned))
