"""The ``krules`` command line; :func:`main` is the console script."""

from krules.cli.main import main

__all__ = ["main"]
