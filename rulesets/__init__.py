"""Example rule modules: run them, copy them, change them.

Each module is a plain rule module (``@on``/``@when`` handlers that register when it is imported);
serve one or several with ``krules run rulesets.orders rulesets.sensors`` and feed them with
``krules emit TYPE SUBJECT --data JSON``.  Every module's docstring names the events it handles and
emits and shows the commands to try it.

- :mod:`rulesets.orders`: an order flow designed as a DAG of events, from ``order.submitted``
  through validation and payment to ``order.shipped``, with the order's status on the subject.
- :mod:`rulesets.sensors`: cache strategies: immediate atomic writes for high-frequency readings,
  cached writes stored once for batch updates, and a filtered reaction to a property change
  (``alert.overheat``).
- :mod:`rulesets.retries`: calling an external API with exponential backoff on the engine clock,
  a retry count kept in muted writes, ``api.call_succeeded`` / ``api.call_failed``, and a
  pluggable client.
- :mod:`rulesets.loops`: the three ways to react to property changes without looping forever
  (muted write, filter on the property name, extended property).
- :mod:`rulesets.payment_timeouts`: a durable timer: an order not paid within 30 minutes is
  cancelled; the payment cancels the timer in the same turn.
- :mod:`rulesets.watchdog`: a timer reset by every heartbeat alerts on a device silent for
  5 minutes, and subject expiry forgets a device silent for a day.
"""
