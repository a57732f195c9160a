"""Naming rules shared by the device and the host: what a usable class name is.

One rule for every writer of class names (the device updater, host ``add-classes`` /
``merge-heads`` and ``merge-deltas``), so a name the host accepts is one the device accepts.
stdlib only.
"""

from __future__ import annotations

from typing import Any

from edgeadapt.device.errors import InputError

#: The longest class name accepted, in characters.
MAX_CLASS_NAME_LENGTH = 200


def check_class_name(name: Any, what: str = "class name") -> str:
    """Return ``name`` if it is a usable class name.

    A usable name is a non-empty string without leading or trailing whitespace, without
    control characters and at most :data:`MAX_CLASS_NAME_LENGTH` characters long.

    Args:
        name: The candidate class name.
        what: How the name is called in the error message (e.g. "new class name").

    Returns:
        ``name`` unchanged.

    Raises:
        InputError: When ``name`` is not a usable class name (the message says why).
    """
    if not isinstance(name, str):
        raise InputError(f"{what} must be a string, got {type(name).__name__}")
    if not name.strip():
        raise InputError(f"{what} is empty; give the class a name")
    if name != name.strip():
        raise InputError(f"{what} {name!r} has leading or trailing whitespace; remove it")
    if any(ord(character) < 32 or ord(character) == 127 for character in name):
        raise InputError(f"{what} {name!r} contains control characters; remove them")
    if len(name) > MAX_CLASS_NAME_LENGTH:
        raise InputError(f"{what} is {len(name)} characters long; use at most {MAX_CLASS_NAME_LENGTH}")
    return name
