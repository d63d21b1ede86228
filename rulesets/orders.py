"""Order flow: an event cascade designed as a directed acyclic graph.

The subject is the order (its id, e.g. ``order-1``); the order's state lives in its properties, and
every ``set`` below also emits ``subject-property-changed``, so other modules can follow the order
without this one knowing about them::

    order.submitted  {"total": 30, "customer": "ada", "items": ["book"]}
        |  validate_order: total > 0 ?
        |-- no  -> status "rejected", rejection_reason        -> order.rejected {"reason"}
        |-- yes -> total, customer, items, status "validated" -> order.validated {"total"}
    order.validated
        |  request_payment                                    -> payment.process {"amount"}
    payment.process
        |  process_payment: paid_amount, status "paid"        -> payment.completed {"amount"}
    payment.completed
        |  request_shipping                                   -> order.ship
    order.ship
        |  ship_order: status "shipped"                       -> order.shipped

Each step only ever emits events further down the graph, so the cascade cannot loop.  An order that
was already accepted ignores a second ``order.submitted`` (it would be charged twice); a rejected
order may be submitted again with a corrected total.

Handles: ``order.submitted``, ``order.validated``, ``payment.process``, ``payment.completed``,
``order.ship``.  Emits: ``order.rejected``, ``order.validated``, ``payment.process``,
``payment.completed``, ``order.ship``, ``order.shipped`` (and the property changes).

Try it::

    krules run rulesets.orders
    krules emit order.submitted order-1 --data '{"total": 30, "customer": "ada", "items": ["book"]}'
    krules subject show order-1            # status "shipped", paid_amount 30
    krules emit order.submitted order-2 --data '{"total": 0}'
    krules subject show order-2            # status "rejected", rejection_reason "..."
"""

from __future__ import annotations

from krules import EventContext, on, when

RESUBMITTABLE = (None, "rejected")
"""Statuses in which ``order.submitted`` is (re)considered; any other status means already accepted."""


def _total_problem(total: object) -> str | None:
    """Why ``total`` is not a valid order total, or None when it is."""
    if isinstance(total, bool) or not isinstance(total, int | float):
        return f"total must be a number, not {total!r}"
    if not total > 0:  # also rejects NaN
        return f"total must be greater than 0, not {total!r}"
    return None


async def _open_for_submission(ctx: EventContext) -> bool:
    """An order is (re)considered only while it is new or was rejected."""
    return await ctx.subject.get("status", default=None) in RESUBMITTABLE


@on("order.submitted")
@when(_open_for_submission)
async def validate_order(ctx: EventContext) -> None:
    """Accept an order with a positive total, reject any other with the reason."""
    order = ctx.subject
    total = ctx.payload.get("total")
    problem = _total_problem(total)
    if problem is not None:
        await order.set("rejection_reason", problem)
        await order.set("status", "rejected")
        await ctx.emit("order.rejected", {"reason": problem})
        return
    await order.set("total", total)
    for field in ("customer", "items"):
        if field in ctx.payload:
            await order.set(field, ctx.payload[field])
    if await order.has("rejection_reason"):
        await order.delete("rejection_reason")
    await order.set("status", "validated")
    await ctx.emit("order.validated", {"total": total})


@on("order.validated")
async def request_payment(ctx: EventContext) -> None:
    """Ask for the order's total to be charged."""
    await ctx.emit("payment.process", {"amount": await ctx.subject.get("total")})


@on("payment.process")
async def process_payment(ctx: EventContext) -> None:
    """Record the payment (a real module would call the payment provider here)."""
    order = ctx.subject
    amount = ctx.payload["amount"]
    await order.set("paid_amount", amount)
    await order.set("status", "paid")
    await ctx.emit("payment.completed", {"amount": amount})


@on("payment.completed")
async def request_shipping(ctx: EventContext) -> None:
    """A paid order is ready to ship."""
    await ctx.emit("order.ship")


@on("order.ship")
async def ship_order(ctx: EventContext) -> None:
    """Mark the order shipped and tell whoever listens."""
    await ctx.subject.set("status", "shipped")
    await ctx.emit("order.shipped")
