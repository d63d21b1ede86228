"""Importing rule modules by dotted name or file path, with one clear error when that fails."""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import sys
from pathlib import Path
from types import ModuleType

from krules.errors import RuleModuleError

__all__ = ["load_rule_module"]


def _looks_like_path(target: str) -> bool:
    return target.endswith(".py") or "/" in target or "\\" in target


def load_rule_module(target: str, *, fresh: bool = False) -> ModuleType:
    """Import the rule module ``target`` (``rulesets.orders`` or ``path/to/rules.py``).

    A package (``rulesets``) stands for itself and every module in it whose name does not start
    with ``_``, imported in name order (sub-packages likewise).

    With ``fresh=True`` the module body runs again even if it was imported before, and the result
    is not cached in ``sys.modules``: this is how test apps register a module's rules on themselves.
    Raises :class:`RuleModuleError` with a one-sentence reason.
    """
    if not isinstance(target, str) or not target.strip():
        raise RuleModuleError(f"A rule module must be a dotted name or a .py path, not {target!r}.")
    module = _load_one(target, fresh)
    package_path = getattr(module, "__path__", None)
    if package_path is not None and not _looks_like_path(target):
        for info in sorted(pkgutil.iter_modules(package_path), key=lambda found: found.name):
            if not info.name.startswith("_"):
                load_rule_module(f"{target}.{info.name}", fresh=fresh)
    return module


def _load_one(target: str, fresh: bool) -> ModuleType:
    if _looks_like_path(target):
        path = Path(target)
        if not path.is_file():
            raise RuleModuleError(f"Rule module file {target!r} does not exist.")
        name = f"krules_rules_{path.stem}" if fresh else path.stem
        spec = importlib.util.spec_from_file_location(name, path)
    else:
        if not fresh:
            return _import(target)
        try:
            spec = importlib.util.find_spec(target)
        except (ImportError, ValueError) as exc:
            raise RuleModuleError(f"Cannot find rule module {target!r}: {exc}.") from None
    if spec is None or spec.loader is None:
        raise RuleModuleError(
            f"Cannot find rule module {target!r}; check the name and that it is importable."
        )
    module = importlib.util.module_from_spec(spec)
    if not fresh:
        sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        if not fresh:
            sys.modules.pop(spec.name, None)
        raise RuleModuleError(f"Rule module {target!r} failed while importing: {_sentence(exc)}") from exc
    return module


def _import(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (name == exc.name or name.startswith(exc.name + ".")):
            raise RuleModuleError(
                f"Cannot find rule module {name!r} (no module named {exc.name!r}); check the spelling and "
                "that its package is on the Python path."
            ) from None
        raise RuleModuleError(f"Rule module {name!r} failed while importing: {_sentence(exc)}") from exc
    except Exception as exc:
        raise RuleModuleError(f"Rule module {name!r} failed while importing: {_sentence(exc)}") from exc


def _sentence(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if text.endswith((".", "!", "?")) else text + "."
