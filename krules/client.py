"""The Python clients' public import path: ``from krules.client import KRulesClient, StreamClient``.

The HTTP clients live in :mod:`krules.http.client`; the stream clients, which append straight into a
Redis-mode deployment's partition streams, in :mod:`krules.transport.stream_client`.
"""

from krules.client_events import build_event
from krules.http.client import AsyncKRulesClient, KRulesClient
from krules.transport.stream_client import AsyncStreamClient, StreamClient

__all__ = ["AsyncKRulesClient", "AsyncStreamClient", "KRulesClient", "StreamClient", "build_event"]
