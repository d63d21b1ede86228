"""The krules exception tree: one root, shallow branches, each raised at one boundary."""

from __future__ import annotations

from typing import TypeGuard


class KRulesError(Exception):
    """Root of every error krules raises on purpose."""


class ConfigurationError(KRulesError):
    """Raised when a setting, environment variable or provider override is invalid."""


class RuleDefinitionError(KRulesError, TypeError):
    """Raised when ``@on``/``@when``/``@middleware`` are given something they cannot register."""


class RuleModuleError(KRulesError):
    """Raised when a rule module named on the command line cannot be found or fails to import."""


class EventFormatError(KRulesError, ValueError):
    """Raised when an incoming event is not a valid CloudEvent krules can route."""


class CascadeDepthExceeded(KRulesError):
    """Raised when an event cascade goes deeper than the configured loop-guard limit."""

    def __init__(self, limit: int, chain: list[str]) -> None:
        self.limit = limit
        self.chain = chain
        shown = " -> ".join([*chain[:4], "...", *chain[-4:]]) if len(chain) > 10 else " -> ".join(chain)
        super().__init__(
            f"Event cascade stopped at depth {limit} (KRULES_MAX_CASCADE_DEPTH): {shown}; "
            "break the loop with a muted write, a @when filter or an extended property."
        )


class DeadLetterError(KRulesError):
    """Raised when a dead letter cannot be found, or cannot be replayed (its event is not valid)."""


class ReplayInFlightError(DeadLetterError):
    """Raised when a dead letter is replayed while a replay of it is still in flight."""

    def __init__(self, message: str, event_id: str, number: int) -> None:
        super().__init__(message)
        self.replay_id = f"{event_id}.replay-{number}"
        """The id of the replay in flight."""


class TurnEndedError(KRulesError):
    """Raised when background work writes a subject or emits an event after its turn was stored."""


class TimerError(KRulesError, ValueError):
    """Raised when a timer cannot be scheduled as asked (bad ``after``/``at``, key, payload, or no
    turn to carry it); nothing is scheduled."""


class StorageError(KRulesError):
    """Raised when the subject storage fails; the turn's writes are not applied."""


class ValueNotSerializableError(StorageError, TypeError):
    """Raised when a property value cannot be stored as JSON."""


class StorageUnavailableError(StorageError):
    """Raised when the storage cannot be reached after the configured retries."""


class UpdateConflictError(StorageError):
    """Raised when an atomic update keeps losing to concurrent writers beyond the retry bound."""


class LeaseLostError(StorageError):
    """Raised when a write made on behalf of a partition's turn is refused because this instance no
    longer holds the partition's lease (another instance owns it now and runs the entry again):
    nothing of the write was applied."""

    def __init__(self, message: str, partition: int) -> None:
        super().__init__(message)
        self.partition = partition


class OverloadedError(KRulesError):
    """Raised when new events are refused because a bound on what waits is reached (queued turns,
    a partition stream's backlog): nothing of them was accepted, so the sender retries later.

    ``reason`` names the bound (``queued_turns``, ``queued_bytes``, ``stream_backlog``);
    ``retry_after`` is the seconds to wait before trying again.
    """

    def __init__(self, message: str, reason: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after = retry_after


class IngressError(KRulesError):
    """Raised when an event cannot be delivered to a krules instance over HTTP.

    ``status`` is the HTTP status the instance answered with, or None when it could not be reached.
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ServerError(KRulesError):
    """Raised when the HTTP server cannot start, e.g. because its address is already in use."""


def aborts_turn(error: BaseException) -> TypeGuard[StorageError]:
    """Whether ``error``, let through by a handler, is the storage failing rather than the handler:
    the engine then stores nothing of the turn and it is taken again (a value that cannot be
    serialised is the handler's own mistake, not the storage's)."""
    return isinstance(error, StorageError) and not isinstance(error, ValueNotSerializableError)
