"""Event types the subject system emits by itself (the same strings as KRules)."""

from __future__ import annotations

from typing import Final

SUBJECT_PROPERTY_CHANGED: Final = "subject-property-changed"
SUBJECT_PROPERTY_DELETED: Final = "subject-property-deleted"
SUBJECT_DELETED: Final = "subject-deleted"
SUBJECT_EXPIRED: Final = "subject-expired"
"""A subject's expiry came (``subject.expire``): payload ``{"props": ..., "ext_props": ...}``, its
last properties; the subject is deleted once the handlers ran."""

# KRules-style CamelCase aliases, so ported rule modules keep working.
SubjectPropertyChanged: Final = SUBJECT_PROPERTY_CHANGED
SubjectPropertyDeleted: Final = SUBJECT_PROPERTY_DELETED
SubjectDeleted: Final = SUBJECT_DELETED

# KRules' legacy names for ``subject-deleted`` (``flush()`` deletes the subject); KRules 3 maps
# them to the same string, so a rule on SUBJECT_FLUSHED runs when a subject is flushed.
SUBJECT_FLUSHED: Final = SUBJECT_DELETED
SubjectFlushed: Final = SUBJECT_DELETED

__all__ = [
    "SUBJECT_DELETED",
    "SUBJECT_EXPIRED",
    "SUBJECT_FLUSHED",
    "SUBJECT_PROPERTY_CHANGED",
    "SUBJECT_PROPERTY_DELETED",
    "SubjectDeleted",
    "SubjectFlushed",
    "SubjectPropertyChanged",
    "SubjectPropertyDeleted",
]
