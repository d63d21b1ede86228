"""The Python clients' public import path: ``from krules.client import KRulesClient, StreamClient``.

The HTTP clients live in :mod:`krules.http.client`; the stream clients append straight into a
Redis-mode deployment's partition streams.
"""

from krules.http.client import AsyncKRulesClient, AsyncStreamClient, KRulesClient, StreamClient, build_event

__all__ = ["AsyncKRulesClient", "AsyncStreamClient", "KRulesClient", "StreamClient", "build_event"]
