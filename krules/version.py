"""The installed krules version (``krules.__version__``), importable without the public API."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

__all__ = ["__version__"]

try:
    __version__ = version("krules")
except PackageNotFoundError:  # a source tree without an install
    __version__ = "0+unknown"
