"""Circuit breaker: stop calling a handler that keeps failing, and dead-letter its events meanwhile.

Each circuit, one per key (by default the handler's dotted name), is in one of three states:

- ``"closed"``: calls go through.  ``failure_threshold`` consecutive failures open it; a success
  resets the count.  A failure is any exception but :class:`~middleware.base.SkipEvent` and
  :class:`~middleware.base.DeadLetterEvent` (a handler time-out counts).
- ``"open"``: calls are not made.  The middleware raises :class:`CircuitOpenError`, a
  ``DeadLetterEvent`` with reason ``"circuit_open"``, so the event is dead-lettered (to be replayed
  later), never dropped, unlike the breaker in the KRules docs.
- ``"half_open"``: once ``open_seconds`` have passed, the next calls probe the handler, at most
  ``half_open_probes`` at a time (calls beyond that are refused as if open).  A probe that succeeds
  closes the circuit; one that fails opens it again for another ``open_seconds``.

Time is read from ``clock.now()`` (default: the engine's clock, ``ctx.clock``, so a test's
``FakeClock`` drives it).  A per-subject circuit is one ``key`` away::

    CircuitBreakerMiddleware(key=lambda ctx: f"{ctx.handler_name}:{ctx.subject.name}")

The key should depend on the event and the handler only (as these do): while no circuit is
remembered it is taken after the call, when the call's outcome needs counting (a key function
that raises then leaves that call uncounted, logged).

Memory stays bounded whatever the number of keys: a circuit that is closed with no failures is not
stored at all, and at most ``max_circuits`` others are kept; past that the least recently failed one
is forgotten (an open one is then reported as closed).

Every state change is logged at WARNING and passed to the ``on_state_change`` listeners as
``(key, old_state, new_state)``, e.g. for a metrics middleware to export a circuit-state gauge.

In the chain, registering the breaker before the retry middleware (outside it) makes it count one
failure per event whose retries are spent; after it (inside), every failed attempt counts, and an open
circuit ends the retries at once (``CircuitOpenError`` is never retried).
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal, Protocol

from krules.config import EnvSettings, choice, integer, number, setting
from krules.errors import ConfigurationError, KRulesError, aborts_turn
from middleware.base import FAILED, DeadLetterEvent, Observer, check_listeners, outcome_of

if TYPE_CHECKING:
    from krules.context import EventContext
    from middleware.registry import ChainBuild

__all__ = [
    "CLOSED",
    "HALF_OPEN",
    "OPEN",
    "CircuitBreakerMiddleware",
    "CircuitBreakerSettings",
    "CircuitOpenError",
    "CircuitState",
    "NowClock",
    "StateListener",
    "from_settings",
]

logger = logging.getLogger(__name__)

CircuitState = Literal["closed", "open", "half_open"]
"""A circuit's state, as logged and passed to state listeners."""
CLOSED: Final = "closed"
"""Calls go through; failures are counted."""
OPEN: Final = "open"
"""Calls are refused with :class:`CircuitOpenError` until ``open_seconds`` have passed."""
HALF_OPEN: Final = "half_open"
"""A few probe calls go through; the first outcome closes or reopens the circuit."""

StateListener = Callable[[str, CircuitState, CircuitState], object]
"""Called as ``listener(key, old_state, new_state)`` on every state change."""


class NowClock(Protocol):
    """Anything with ``now()`` in seconds (``krules.clock.SystemClock``, ``krules.testing.FakeClock``)."""

    def now(self) -> float:
        """The current time in seconds."""
        ...


class CircuitOpenError(DeadLetterEvent, KRulesError):
    """Raised instead of calling a handler whose circuit is open: the event is dead-lettered.

    ``key`` is the circuit's key, ``state`` ``"open"`` or ``"half_open"`` (all probes busy), and
    ``retry_in`` the seconds until the circuit lets a probe through (0 when half-open).
    """

    def __init__(self, key: str, state: CircuitState, retry_in: float) -> None:
        if state == HALF_OPEN:
            why = "is half-open and already probing the handler"
        else:
            why = f"is open after repeated failures (a probe call is let through in {retry_in:.3g}s)"
        super().__init__(
            f"Circuit {key!r} {why}, so the handler was not called; the event is dead-lettered: "
            "replay it once the handler recovers.",
            "circuit_open",
        )
        self.key = key
        self.state = state
        self.retry_in = retry_in

    def __reduce__(self) -> tuple[type[CircuitOpenError], tuple[str, CircuitState, float]]:
        # rebuilt from its own arguments (copy, and anything else that reduces exceptions)
        return type(self), (self.key, self.state, self.retry_in)


class _Circuit:
    __slots__ = ("failures", "opened_at", "probes", "state", "trips")

    def __init__(self) -> None:
        self.state: CircuitState = CLOSED
        self.failures = 0  # consecutive failures while closed
        self.opened_at = 0.0
        self.probes = 0  # probe calls in flight while half-open
        self.trips = 0  # times opened: tells a probe whether its half-open period is still current


def _handler_failed(error: BaseException) -> bool:
    # Skipped, dead-lettered and cancelled calls are neither a success nor a failure of the handler,
    # and neither is the storage failing (then the turn is taken again).
    return outcome_of(error) == FAILED and not aborts_turn(error)


def _handler_name(ctx: EventContext) -> str:
    return ctx.rule.name


def _config_error(option: str, value: object, expected: str) -> ConfigurationError:
    return ConfigurationError(f"CircuitBreakerMiddleware got {option}={value!r}; pass {expected}.")


def _positive_int(option: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise _config_error(option, value, "an integer of at least 1")
    return value


def _listeners(value: object) -> list[StateListener]:
    return check_listeners(
        value,
        owner="CircuitBreakerMiddleware",
        option="on_state_change",
        shape="a plain (not async) function of (key, old_state, new_state), or a list of them",
    )


class CircuitBreakerMiddleware(Observer):
    """Middleware: a closed/open/half-open circuit per key; open circuits dead-letter their events.

    Options (keyword-only): ``failure_threshold`` consecutive failures open a circuit;
    ``open_seconds`` it stays open before probing; ``half_open_probes`` probe calls at a time;
    ``key(ctx) -> str`` picks the circuit (default: the handler name); ``clock`` has ``now()``
    (default: the engine's clock); ``on_state_change`` is one listener or a list of them;
    ``max_circuits`` bounds how many circuits with failures are remembered.
    """

    __slots__ = (
        "_circuits",
        "_clock",
        "_key",
        "_listeners",
        "_max",
        "_open_seconds",
        "_probes",
        "_threshold",
    )

    def __init__(
        self,
        *,
        failure_threshold: int = 5,
        open_seconds: float = 30.0,
        half_open_probes: int = 1,
        key: Callable[[EventContext], str] | None = None,
        clock: NowClock | None = None,
        on_state_change: StateListener | Sequence[StateListener] | None = None,
        max_circuits: int = 10_000,
    ) -> None:
        self._threshold = _positive_int("failure_threshold", failure_threshold)
        if (
            not isinstance(open_seconds, int | float)
            or isinstance(open_seconds, bool)
            or not math.isfinite(open_seconds)
            or open_seconds <= 0
        ):
            raise _config_error("open_seconds", open_seconds, "a positive number of seconds")
        self._open_seconds = float(open_seconds)
        self._probes = _positive_int("half_open_probes", half_open_probes)
        if key is not None and not callable(key):
            raise _config_error("key", key, "a function of ctx returning the circuit's name, or None")
        self._key: Callable[[EventContext], str] = key or _handler_name
        if clock is not None and not callable(getattr(clock, "now", None)):
            raise _config_error(
                "clock", clock, "an object with a now() method, or None for the engine's clock"
            )
        self._clock = clock
        self._listeners = _listeners(on_state_change)
        self._max = _positive_int("max_circuits", max_circuits)
        self._circuits: OrderedDict[str, _Circuit] = OrderedDict()

    # -- inspection --------------------------------------------------------------------------
    def state(self, key: str) -> CircuitState:
        """The state of circuit ``key`` (``"closed"`` for one never seen or forgotten)."""
        circuit = self._circuits.get(key)
        return CLOSED if circuit is None else circuit.state

    def states(self) -> dict[str, CircuitState]:
        """Every remembered circuit's state (circuits closed without failures are not listed)."""
        return {key: circuit.state for key, circuit in self._circuits.items()}

    def add_state_listener(self, listener: StateListener) -> None:
        """Also call ``listener(key, old_state, new_state)`` on every state change."""
        self._listeners.extend(_listeners(listener))

    # -- the middleware ----------------------------------------------------------------------
    def enter(self, ctx: EventContext) -> tuple[str, _Circuit | None, int] | None:
        """Refuse the call (CircuitOpenError) while its circuit is open or its probes are all out."""
        if not self._circuits:  # every circuit closed without failures: nothing to look up
            return None
        key = self._key(ctx)
        circuit = self._circuits.get(key)
        if circuit is None or circuit.state == CLOSED:
            return key, None, 0
        if circuit.state == OPEN:
            remaining = circuit.opened_at + self._open_seconds - self._now(ctx)
            if remaining > 0:
                raise CircuitOpenError(key, OPEN, remaining)
            self._change(key, circuit, HALF_OPEN)
            circuit.probes = 0
        if circuit.probes >= self._probes:
            raise CircuitOpenError(key, HALF_OPEN, 0.0)
        circuit.probes += 1
        return key, circuit, circuit.trips

    def exit(
        self, ctx: EventContext, state: tuple[str, _Circuit | None, int] | None, error: BaseException | None
    ) -> None:
        """Count the call's failure or success on its circuit (neutral outcomes count as neither)."""
        failed = error is not None and _handler_failed(error)
        if state is None:  # no circuit was remembered when the call began: its key is taken now
            # A success counts only if other calls failed meanwhile (maybe under this key).
            if not failed and (error is not None or not self._circuits):
                return
            try:
                key = self._key(ctx)
            except Exception:  # a broken key function must not replace the handler's outcome
                logger.exception(
                    "the circuit key function raised for %s; the call is not counted", ctx.handler_name
                )
                return
            if failed:
                self._failed(ctx, key)
            else:
                circuit = self._circuits.get(key)
                if circuit is not None and circuit.state == CLOSED:
                    del self._circuits[key]
            return
        key, probing, trip = state
        if probing is None:  # the circuit was closed
            if failed:
                self._failed(ctx, key)
            elif error is None and self._circuits:  # a success ends a run of failures
                circuit = self._circuits.get(key)
                if circuit is not None and circuit.state == CLOSED:
                    del self._circuits[key]
            return
        if self._current(key, probing, trip):
            if failed:
                probing.failures += 1
                self._open(ctx, key, probing)
            elif error is None:
                del self._circuits[key]
                self._change(key, probing, CLOSED)
        if probing.trips == trip and probing.state == HALF_OPEN:
            probing.probes -= 1  # a probe that ended neutrally (skipped, cancelled) frees its slot

    # -- state changes -----------------------------------------------------------------------
    def _now(self, ctx: EventContext) -> float:
        return (self._clock or ctx.clock).now()

    def _current(self, key: str, circuit: _Circuit, trip: int) -> bool:
        # the probe's half-open period is still going on (not reopened, closed or forgotten since)
        return circuit.trips == trip and circuit.state == HALF_OPEN and self._circuits.get(key) is circuit

    def _failed(self, ctx: EventContext, key: str) -> None:
        circuit = self._circuits.get(key)
        if circuit is None:
            circuit = self._circuits[key] = _Circuit()
            if len(self._circuits) > self._max:
                self._forget_oldest()
        elif circuit.state != CLOSED:
            return  # a call that started before the circuit opened: already counted as open
        else:
            self._circuits.move_to_end(key)
        circuit.failures += 1
        if circuit.failures >= self._threshold:
            self._open(ctx, key, circuit)

    def _open(self, ctx: EventContext, key: str, circuit: _Circuit) -> None:
        circuit.opened_at = self._now(ctx)
        circuit.trips += 1
        circuit.probes = 0
        self._circuits.move_to_end(key)
        self._change(key, circuit, OPEN)

    def _forget_oldest(self) -> None:
        key, circuit = self._circuits.popitem(last=False)
        if circuit.state != CLOSED:
            logger.warning(
                "forgetting %s circuit %r: more than %d circuits are remembered",
                circuit.state,
                key,
                self._max,
            )
            self._change(key, circuit, CLOSED)

    def _change(self, key: str, circuit: _Circuit, new: CircuitState) -> None:
        old = circuit.state
        circuit.state = new
        if new == OPEN:
            logger.warning(
                "circuit %r %s -> open (%d consecutive failures): calls refused for %gs",
                key,
                old,
                circuit.failures,
                self._open_seconds,
            )
        elif new == HALF_OPEN:
            logger.warning("circuit %r open -> half_open: up to %d probe calls at a time", key, self._probes)
        else:
            logger.warning("circuit %r %s -> closed", key, old)
        for listener in self._listeners:
            try:
                listener(key, old, new)
            except Exception:  # a broken listener must not change the outcome of the handler call
                logger.exception("circuit state listener %r raised", listener)


@dataclass(frozen=True, slots=True)
class CircuitBreakerSettings(EnvSettings):
    """``KRULES_CIRCUIT_*``: the breaker ``krules run`` installs."""

    circuit_failures: int = setting(5, integer(1))
    circuit_open_seconds: float = setting(30.0, number(0.0))
    circuit_key: str = setting("handler", choice("handler", "subject"))


def _per_subject(ctx: EventContext) -> str:
    return f"{ctx.rule.name}:{ctx.subject.name}"


def from_settings(build: ChainBuild) -> CircuitBreakerMiddleware:
    """The breaker ``krules run`` installs (:class:`CircuitBreakerSettings`), one circuit per handler
    or, with ``KRULES_CIRCUIT_KEY=subject``, per handler and subject; its states go to the metrics."""
    own = CircuitBreakerSettings.from_env(build.env)
    metrics = build.metrics
    return CircuitBreakerMiddleware(
        failure_threshold=own.circuit_failures,
        open_seconds=own.circuit_open_seconds,
        key=_per_subject if own.circuit_key == "subject" else None,
        on_state_change=(
            None if metrics is None else (lambda key, old, new: metrics.record_circuit_state(key, new))
        ),
    )
