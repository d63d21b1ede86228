"""``python -m krules``: the ``krules`` command line."""

from __future__ import annotations

import sys

from krules.cli import main

sys.exit(main())
