"""How events reach an instance and leave it: the entry format, deliveries, and the drivers.

:mod:`krules.transport.base` holds what every transport shares; each driver has modules of its own
(Redis: :mod:`krules.transport.redis_streams` and what it names; in memory:
:mod:`krules.transport.memory`), and :mod:`krules.transport.worker` runs turns from any
:class:`~krules.transport.base.PartitionSource`.  :mod:`krules.transport.stream_client` holds the
Python clients that append events to the streams from outside an instance.
"""
