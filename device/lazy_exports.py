"""Lazy public names for a package: ``from package import Name`` imports the defining module on first use.

``edgeadapt``, ``edgeadapt.converters`` and ``edgeadapt.device`` each keep a table of public name ->
defining module and get their module-level ``__getattr__``/``__dir__`` from :func:`lazy_attributes`,
so importing a package stays cheap (no TensorFlow, no runtimes) until a name is used.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_attributes(package: str, exports: dict[str, str],
                    namespace: dict[str, Any]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module-level ``__getattr__`` and ``__dir__`` of a package with lazily loaded public names.

    Args:
        package: The package's dotted name, for the error message.
        exports: Public name -> dotted name of the module that defines it.
        namespace: The package's ``globals()``; a resolved name is stored there, so later
            lookups do not call ``__getattr__`` again.

    Returns:
        ``(__getattr__, __dir__)`` to assign at the package's module level.
    """

    def __getattr__(name: str) -> Any:
        module_name = exports.get(name)
        if module_name is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module_name), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
