"""The storage protocol, for backends: :class:`SubjectStorage` and the change batch it stores.

Both are the engine's (:mod:`krules.ports`, :mod:`krules.changes`); a backend imports them from here.
"""

from __future__ import annotations

from krules.changes import DELETE, Change, SubjectChanges, Update, decode, encode
from krules.ports import SubjectStorage

__all__ = ["DELETE", "Change", "SubjectChanges", "SubjectStorage", "Update", "decode", "encode"]
