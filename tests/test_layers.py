"""Every module of the krules package sits in one of the import-linter layers, so none escapes the
contracts `make lint` checks by being left off the list."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _layered() -> set[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    [layers] = [c for c in config["tool"]["importlinter"]["contracts"] if c["type"] == "layers"]
    names: set[str] = set()
    for layer in layers["layers"]:
        names.update(part.strip() for part in layer.replace("|", ":").split(":"))
    return names


def test_every_module_and_package_of_krules_is_in_a_layer() -> None:
    found = {f"krules.{path.stem}" for path in (ROOT / "krules").glob("*.py") if path.stem != "__init__"}
    found |= {f"krules.{path.parent.name}" for path in (ROOT / "krules").glob("*/__init__.py")}
    assert sorted(found - _layered()) == []
