"""The order flow written as a KRules 3 module, ported to krules by changing its imports only.

The two import lines were, in KRules 3 (``krules-framework``)::

    from krules_core.container import KRulesContainer
    from krules_core.event_types import SUBJECT_PROPERTY_CHANGED

Everything below them is the KRules module as it was written: its own container and
``on, when, middleware, emit = container.handlers()``, awaited subject calls, an ``async def``
filter that reads the subject, and ``await subject.store()`` where KRules needs it to persist
(krules stores a turn's writes when it ends anyway, so the calls are harmless).  The app that owns
``container`` drives it as in KRules::

    await emit("order.submitted", container.subject("order-1"), {"total": 30})
    await container.subject("order-1").dict()   # total 30, paid_amount 30, status "shipped"

Its rules live on its own container, as in KRules, so ``krules run rulesets`` imports this module but
does not serve it; ``rulesets.orders`` is the same flow written for krules (module-level
``on``/``when``, served by ``krules run``).  ``tests/rulesets/test_ported_orders.py`` checks this one
ends as KRules ends it, with the handlers of an event run concurrently or in KRules' order.
"""

from krules import KRulesContainer
from krules.event_types import SUBJECT_PROPERTY_CHANGED

container = KRulesContainer()
on, when, middleware, emit = container.handlers()


async def open_for_submission(ctx):
    return await ctx.subject.get("status", default=None) in (None, "rejected")


@on("order.submitted")
@when(open_for_submission)
async def validate_order(ctx):
    order = ctx.subject
    total = ctx.payload.get("total", 0)
    if total <= 0:
        await order.set("status", "rejected")
        await order.store()
        await ctx.emit("order.rejected", {"reason": "total must be greater than 0"})
        return
    await order.set("total", total)
    await order.set("status", "validated")
    await order.store()
    await ctx.emit("order.validated", {"total": total})


@on("order.validated")
async def request_payment(ctx):
    await ctx.emit("payment.process", {"amount": ctx.payload["total"]})


@on("payment.process")
async def process_payment(ctx):
    order = ctx.subject
    await order.set("paid_amount", ctx.payload["amount"])
    await order.set("status", "paid")
    await order.store()
    await ctx.emit("payment.completed", {"amount": ctx.payload["amount"]})


@on("payment.completed")
async def ship_order(ctx):
    await ctx.subject.set("status", "shipped")
    await ctx.subject.store()
    await ctx.emit("order.shipped")


@on(SUBJECT_PROPERTY_CHANGED)
@when(lambda ctx: ctx.property_name == "status")
async def record_status_history(ctx):
    history = await ctx.subject.get_ext("status_history", default=[])
    await ctx.subject.set_ext("status_history", [*history, ctx.new_value])
