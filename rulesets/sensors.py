"""Cache strategies, and reacting to a property change.

Subject writes are cached by default: they are stored together when the turn ends (or at an
explicit ``store()``).  Pick the strategy per write:

- **High-frequency, shared counters and last values: ``use_cache=False``.**  ``sensor.reading``
  writes ``last_reading`` straight to storage, atomically, so other instances and tools see it at
  once, and counts readings with a callable (``lambda n: (n or 0) + 1``) that the storage applies
  atomically, so no increment is lost to a concurrent writer.  The count is muted: nobody reacts
  to it, so it costs no event.
- **Several fields of one update: cached, then ``store()`` once.**  ``user.profile_update`` sets
  ``name``, ``email`` and ``address`` (those present in the payload) in the cache and writes them
  in a single storage batch.  (Without ``store()`` the turn would store them at its end anyway;
  calling it makes the write happen before the handler goes on.)
- **Reacting to a change.**  ``raise_overheat_alert`` listens to ``subject-property-changed`` and
  filters on the property name and the values: when ``last_reading`` of a sensor rises above
  ``OVERHEAT_THRESHOLD`` it emits ``alert.overheat``.  It fires on the crossing only, not on every
  hot reading, so a sensor stuck at 95 raises one alert, not one per reading; it fires again after
  the reading went back down to the threshold or below.

Handles: ``sensor.reading`` ``{"value": <number>}``, ``user.profile_update``
``{"name", "email", "address"}`` (any subset), ``subject-property-changed`` (of ``last_reading``).
Emits: ``alert.overheat`` ``{"value", "previous", "threshold"}`` on the sensor's subject (and the
property changes).

Try it::

    krules run rulesets.sensors
    krules emit sensor.reading sensor-1 --data '{"value": 21.5}'
    krules emit sensor.reading sensor-1 --data '{"value": 85}'      # alert.overheat
    krules subject show sensor-1                                    # last_reading 85, reading_count 2
    krules emit user.profile_update user-123 --data '{"name": "Ada", "email": "ada@example.com"}'
"""

from __future__ import annotations

from typing import Any

from krules import EventContext, on, when
from krules.event_types import SUBJECT_PROPERTY_CHANGED

OVERHEAT_THRESHOLD = 80.0
"""Readings above this (degrees Celsius: these sensors read temperatures) raise ``alert.overheat``."""

PROFILE_FIELDS = ("name", "email", "address")
"""The user properties ``user.profile_update`` may set."""


def _increment(count: int | None) -> int:
    return (count or 0) + 1


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@on("sensor.reading")
async def record_reading(ctx: EventContext) -> None:
    """Write the reading and the count straight to storage (atomic, visible at once)."""
    value = ctx.payload.get("value")
    if not _is_number(value):
        # Raising (rather than filtering the event out) makes a broken sensor visible as a failure.
        raise ValueError(f"sensor.reading needs a numeric 'value' in its payload, not {value!r}.")
    sensor = ctx.subject
    await sensor.set("reading_count", _increment, muted=True, use_cache=False)
    await sensor.set("last_reading", value, use_cache=False)


@on("user.profile_update")
async def update_profile(ctx: EventContext) -> None:
    """Set the profile fields in the cache, then store them in one write."""
    user = ctx.subject
    for field in PROFILE_FIELDS:
        if field in ctx.payload:
            await user.set(field, ctx.payload[field])
    await user.store()


def _crossed_threshold(ctx: EventContext) -> bool:
    """The new value is above the threshold and the old one was not (or there was none)."""
    new, old = ctx.new_value, ctx.old_value
    if not _is_number(new) or new <= OVERHEAT_THRESHOLD:
        return False
    return not _is_number(old) or old <= OVERHEAT_THRESHOLD


@on(SUBJECT_PROPERTY_CHANGED)
@when(lambda ctx: ctx.property_name == "last_reading")
@when(_crossed_threshold)
async def raise_overheat_alert(ctx: EventContext) -> None:
    """A sensor's reading just went above the threshold."""
    await ctx.emit(
        "alert.overheat",
        {"value": ctx.new_value, "previous": ctx.old_value, "threshold": OVERHEAT_THRESHOLD},
    )
