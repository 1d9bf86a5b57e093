"""Name -> object registries for the pluggable pieces (DAA losses, data-selection callbacks).

`Registry.get` takes a registered name or an import path, so users plug in their own code without editing this
package: `pkg.module:attr` (an importable module) or `/path/to/file.py:attr` (a Python file on disk).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from types import ModuleType
from typing import Any, Callable, Dict, List, Optional

from .errors import ConfigError


class Registry:
    """A named collection of objects of one kind (e.g. "loss", "selector")."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: Dict[str, Any] = {}

    def register(self, name: str, *, override: bool = False) -> Callable[[Any], Any]:
        """Decorator that registers the object under `name` and returns it unchanged."""
        if not name or ":" in name:
            # a ':' would make the name indistinguishable from an import path in `get`
            raise ConfigError(f"{self.kind} name {name!r} must be non-empty and contain no ':'")

        def decorator(obj: Any) -> Any:
            if name in self._entries and not override:
                raise ConfigError(
                    f"{self.kind} '{name}' is already registered ({self._entries[name]!r}); "
                    f"pick another name or pass override=True"
                )
            self._entries[name] = obj
            return obj

        return decorator

    def get(self, name_or_path: str, flag: Optional[str] = None) -> Any:
        """The object registered as `name_or_path`, or loaded from `pkg.module:attr` / `/path/file.py:attr`.

        Errors are ConfigError prefixed with `flag` (the CLI flag the value came from).
        """
        if name_or_path in self._entries:
            return self._entries[name_or_path]
        where = f"{flag}: " if flag else ""
        if ":" not in name_or_path:
            raise ConfigError(
                f"{where}unknown {self.kind} '{name_or_path}'. Registered: {', '.join(self.names()) or '(none)'}; "
                f"or give an import path 'pkg.module:attr' or a file '/path/to/file.py:attr'"
            )
        module_part, _, attr = name_or_path.rpartition(":")  # rpartition keeps Windows drive letters intact
        if not module_part or not attr:
            raise ConfigError(f"{where}'{name_or_path}' is neither 'pkg.module:attr' nor '/path/to/file.py:attr'")
        if module_part.endswith(".py") or "/" in module_part or os.sep in module_part:
            module = _load_file(module_part, name_or_path, where)
        else:
            try:
                module = importlib.import_module(module_part)
            except Exception as e:  # ImportError, or anything the module raises while importing
                raise ConfigError(
                    f"{where}cannot import module '{module_part}' (from '{name_or_path}'): {type(e).__name__}: {e}"
                ) from e
        obj: Any = module
        for part in attr.split("."):
            if not hasattr(obj, part):
                raise ConfigError(f"{where}module '{module_part}' has no attribute '{attr}' (from '{name_or_path}')")
            obj = getattr(obj, part)
        return obj

    def names(self) -> List[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


def _load_file(file: str, spec: str, where: str) -> ModuleType:
    path = os.path.abspath(os.path.expanduser(file))
    if not os.path.isfile(path):
        raise ConfigError(f"{where}file '{file}' not found (from '{spec}')")
    # One module per file path: loading the same file again (next iteration, another phase) reuses it, so
    # `@register` calls inside the file do not run twice.
    mod_name = "_sera_user_" + hashlib.sha1(path.encode()).hexdigest()[:12]
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    module_spec = importlib.util.spec_from_file_location(mod_name, path)
    if module_spec is None or module_spec.loader is None:
        raise ConfigError(f"{where}cannot load '{file}' as a Python module (from '{spec}')")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[mod_name] = module  # dataclasses and pickle look the module up by name while it executes
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[mod_name]
        raise ConfigError(f"{where}importing '{file}' (from '{spec}') failed: {type(e).__name__}: {e}") from e
    return module
