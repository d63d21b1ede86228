"""Durable timers: alert on a device that has gone silent for 5 minutes, and forget it after a day.

Each ``device.heartbeat`` records when the device was last seen and *resets* its silence timer:
scheduling the same key (``silence``) again replaces the pending timer, so the timer only fires
when no heartbeat came for ``SILENCE_SECONDS``.  Then ``raise_silence_alert`` marks the device
``silent`` and emits ``device.silent``; the next heartbeat marks it back ``online``
(``device.back``).  Every heartbeat also pushes the device's expiry a day further
(``subject.expire``): a device silent for a day is deleted, announced by ``subject-expired`` with its
last properties, which ``archive_forgotten`` turns into ``device.forgotten``.

Handles: ``device.heartbeat``, ``device.silence_check``, ``subject-expired``.  Emits:
``device.silent`` ``{"last_seen"}``, ``device.back``, ``device.forgotten`` ``{"last_seen"}``.

Try it::

    krules run rulesets.watchdog
    krules emit device.heartbeat sensor-7
    krules subject show sensor-7        # in Redis mode, with its pending timers
"""

from __future__ import annotations

from krules import EventContext, on, when
from krules.event_types import SUBJECT_EXPIRED

SILENCE_SECONDS = 300.0
"""How long a device may stay silent before the alert."""
FORGET_AFTER_SECONDS = 86_400.0
"""How long a silent device is kept."""


@on("device.heartbeat")
async def record_heartbeat(ctx: EventContext) -> None:
    """Record the heartbeat and restart the silence timer and the expiry."""
    device = ctx.subject
    if await device.get("state", default=None) == "silent":
        await ctx.emit("device.back")
    await device.set("state", "online")
    await device.set("last_seen", ctx.clock.now(), muted=True)
    await device.schedule("device.silence_check", after=SILENCE_SECONDS, key="silence")
    await device.expire(after=FORGET_AFTER_SECONDS)


@on("device.silence_check")
async def raise_silence_alert(ctx: EventContext) -> None:
    """No heartbeat for SILENCE_SECONDS: say so once."""
    await ctx.subject.set("state", "silent")
    await ctx.emit("device.silent", {"last_seen": await ctx.subject.get("last_seen", default=None)})


@on(SUBJECT_EXPIRED)
@when(lambda ctx: "last_seen" in ctx.payload.get("props", {}))
async def archive_forgotten(ctx: EventContext) -> None:
    """A device silent for a day is deleted: announce it with what it last held."""
    await ctx.emit("device.forgotten", {"last_seen": ctx.payload["props"]["last_seen"]})
