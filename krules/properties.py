"""KRules' names for the keys of a property event's payload and for the two kinds of property.

Rule modules ported from KRules import them from ``krules.subject`` (KRules: ``krules_core.subject``)
and read property events with them, ``ctx.payload[PayloadConst.VALUE]``.
"""

from __future__ import annotations

from typing import Final

__all__ = ["PayloadConst", "PropertyType"]


class PayloadConst:
    """The keys of the payload of ``subject-property-changed`` and ``subject-property-deleted``."""

    PROPERTY_NAME: Final = "property_name"
    VALUE: Final = "value"
    OLD_VALUE: Final = "old_value"


class PropertyType:
    """The two kinds of property, with KRules' one-letter codes: ordinary (``set``, which emits
    events) and extended (``set_ext``, silent).  krules' Redis keys use their own field prefixes
    (``p:`` and ``x:``, see :mod:`storage.redis.keys`), not these codes."""

    DEFAULT: Final = "p"
    EXTENDED: Final = "e"
