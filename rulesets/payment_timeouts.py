"""Durable timers: cancel an order that is not paid within 30 minutes.

``checkout.placed`` records the order and schedules ``checkout.payment_timeout`` for 30 minutes
later (key ``payment``).  ``checkout.paid`` marks it paid and cancels the timer, in the same turn as
the write, so a paid order never times out.  If the timer fires first, ``cancel_unpaid`` marks the
order ``cancelled`` and emits ``checkout.cancelled``; a payment arriving after that is refused
(``checkout.payment_refused``), never applied to a cancelled order.

The timer is stored with the turn that scheduled it (in Redis mode in the partition's slot, by the
same commit), fires once as an ordinary event of the order, and survives restarts in Redis mode.

Handles: ``checkout.placed`` ``{"total"}``, ``checkout.paid`` ``{"amount"}``,
``checkout.payment_timeout``.  Emits: ``checkout.cancelled``, ``checkout.payment_refused``.

Try it (embedded mode, so 30 minutes means 30 minutes; with ``PAYMENT_TIMEOUT_SECONDS`` below
changed to 10 you can watch it)::

    krules run rulesets.payment_timeouts
    krules emit checkout.placed order-1 --data '{"total": 30}'
    krules emit checkout.paid order-1 --data '{"amount": 30}'   # cancels the timeout

In a test, ``await krules_app.advance(1800)`` moves the clock through the timeout in milliseconds.
"""

from __future__ import annotations

from krules import EventContext, on

PAYMENT_TIMEOUT_SECONDS = 1800.0
"""How long an order waits for its payment."""


@on("checkout.placed")
async def await_payment(ctx: EventContext) -> None:
    """Record the order and start its payment clock."""
    await ctx.subject.set("total", ctx.payload.get("total"))
    await ctx.subject.set("status", "awaiting_payment")
    await ctx.subject.schedule(
        "checkout.payment_timeout",
        after=PAYMENT_TIMEOUT_SECONDS,
        key="payment",
        payload={"total": ctx.payload.get("total")},
    )


@on("checkout.paid")
async def take_payment(ctx: EventContext) -> None:
    """Mark the order paid and stop its payment clock; refuse a payment for a cancelled order."""
    if await ctx.subject.get("status", default=None) == "cancelled":
        await ctx.emit("checkout.payment_refused", {"amount": ctx.payload.get("amount")})
        return
    await ctx.subject.set("status", "paid")
    await ctx.subject.cancel_schedule("payment")


@on("checkout.payment_timeout")
async def cancel_unpaid(ctx: EventContext) -> None:
    """The payment did not come in time: cancel the order."""
    if await ctx.subject.get("status", default=None) == "awaiting_payment":
        await ctx.subject.set("status", "cancelled")
        await ctx.emit("checkout.cancelled", {"reason": "payment_timeout"})
