"""Project defaults from the ``[tool.gradscope]`` table of the nearest pyproject.toml; flags win over them."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict, Optional

from .errors import GradscopeError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python < 3.11 only
    import tomli as tomllib

KEYS = {"steps": int, "rules": str, "fail-on": str, "baseline": str}


def find_pyproject(start: Path) -> Optional[Path]:
    for folder in (start, *start.parents):
        candidate = folder / "pyproject.toml"
        if candidate.is_file():
            return candidate
    return None


def load_config(start: Optional[Path] = None) -> "Config":
    """The ``[tool.gradscope]`` settings, with relative paths made relative to the pyproject's folder."""
    path = find_pyproject((start or Path.cwd()).resolve())
    if path is None:
        return Config({})
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise GradscopeError(f"{path}: cannot read it as TOML: {exc}", "fix the file, or run from another folder") from None
    except OSError as exc:
        raise GradscopeError(f"{path}: cannot read it: {exc.strerror or exc}", "run from another folder") from None
    tool = document.get("tool", {})
    if not isinstance(tool, dict):
        raise GradscopeError(f"{path}: 'tool' must be a table, not a {type(tool).__name__}",
                             "write [tool.gradscope] as a table; see [tool.gradscope] in docs/usage.md")
    table = tool.get("gradscope", {})
    if not isinstance(table, dict):
        raise GradscopeError(f"{path}: [tool.gradscope] must be a table", "see [tool.gradscope] in docs/usage.md")
    unknown = set(table) - set(KEYS)
    if unknown:
        raise GradscopeError(f"{path}: unknown key(s) in [tool.gradscope]: {', '.join(sorted(unknown))}",
                             f"allowed: {', '.join(KEYS)}")
    for key, kind in KEYS.items():
        if key in table and (not isinstance(table[key], kind) or isinstance(table[key], bool)):
            raise GradscopeError(f"{path}: [tool.gradscope] {key} must be a{'n integer' if kind is int else ' string'}",
                                 "see [tool.gradscope] in docs/usage.md")
    config = Config(table, source=str(path))
    for key in ("rules", "baseline"):
        if key in config:
            config[key] = str((path.parent / config[key]))
    return config


class Config(dict):
    """The settings, and the pyproject.toml they came from (for messages that name their source)."""

    def __init__(self, values: Dict[str, Any], source: str = "") -> None:
        super().__init__(values)
        self.source = source
