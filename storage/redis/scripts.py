"""The Lua scripts shipped beside this module, read once and addressed by their SHA1 digest."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from importlib.resources import files

__all__ = ["LuaScript", "lua_script"]


@dataclass(frozen=True, slots=True)
class LuaScript:
    """A script's file name, source and SHA1 (what ``EVALSHA`` and ``SCRIPT LOAD`` expect)."""

    name: str
    source: str
    sha: str


@cache
def lua_script(name: str) -> LuaScript:
    """Return the script ``storage/redis/lua/<name>.lua``; the file is read on first use only."""
    source = (files("storage.redis") / "lua" / f"{name}.lua").read_text(encoding="utf-8")
    return LuaScript(name, source, hashlib.sha1(source.encode("utf-8")).hexdigest())
