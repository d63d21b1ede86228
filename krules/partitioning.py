"""Which partition a subject belongs to: stable across processes, machines and languages."""

from __future__ import annotations

from zlib import crc32

__all__ = ["partition_of"]


def partition_of(subject: str, partitions: int) -> int:
    """Return ``crc32(utf8(subject)) % partitions`` (never Python's per-process salted ``hash()``)."""
    return crc32(subject.encode("utf-8")) % partitions
