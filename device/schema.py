"""Strict parsing of untrusted JSON documents (manifests, ``delta.json``) and typed field access.

:func:`parse_document` turns raw bytes into Python objects or raises a
:class:`~edgeadapt.device.errors.BundleError`: the bytes must be UTF-8 (no lone
surrogates), at most ``max_bytes`` long, valid JSON without NaN/Infinity constants or
duplicate keys, nested at most ``max_depth`` deep. The ``field``-style helpers read one
value of a JSON object with its type and range checked; every error names the field
(``head.temperature``) and what was expected.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Iterable

from edgeadapt.device.errors import BundleError

MAX_DEPTH = 24
_MISSING = object()
#: default= value meaning "the field is required"
REQUIRED = _MISSING


def parse_document(raw: bytes | str, source: str, max_bytes: int, max_depth: int = MAX_DEPTH,
                   flat_keys: tuple[str, ...] = (), unique_keys: bool = True) -> Any:
    """Decode and parse one JSON document with every structural check.

    Args:
        raw: the document (bytes are decoded as strict UTF-8).
        source: name used in error messages (a path).
        max_bytes: largest accepted size.
        max_depth: deepest accepted nesting of objects/arrays.
        flat_keys: top-level keys the caller itself checks to hold only flat entries (a list or
            object of objects of scalars); the depth walk skips them (large class tables).

    Returns:
        The parsed value.

    Raises:
        BundleError: naming the problem.
    """
    if len(raw) > max_bytes:
        raise BundleError(f"{source} has {len(raw)} bytes, more than the {max_bytes} allowed; refusing it")
    if isinstance(raw, (bytes, bytearray, memoryview)):
        try:
            text = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as error:
            raise BundleError(
                f"{source} is not UTF-8 text (invalid byte at offset {error.start}); the file is corrupted: "
                "re-copy or re-export it"
            ) from None
    else:
        text = raw
    try:
        data = json.loads(text, object_pairs_hook=_unique_keys if unique_keys else None, parse_constant=_no_constant,
                          parse_float=_finite)
    except BundleError as error:
        raise BundleError(f"{source}: {error}") from None
    except (ValueError, RecursionError) as error:
        raise BundleError(f"{source} is not valid JSON ({error}); the file is corrupted: re-copy or re-export it") from None
    if _SURROGATE_ESCAPE.search(text) is not None:
        _check_values(data, source, max_depth)
    elif isinstance(data, dict):
        _check_values({key: value for key, value in data.items() if key not in flat_keys}, source, max_depth, False)
    else:
        _check_values(data, source, max_depth, False)
    return data


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise BundleError(f"the key {key!r} appears twice in one object")
            seen.add(key)
    return result


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BundleError(f"the number {text[:40]} is out of range (numbers must be finite)")
    return value


def _no_constant(name: str) -> Any:
    raise BundleError(f"the non-standard constant {name} is not allowed (numbers must be finite)")


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _check_values(data: Any, source: str, max_depth: int, strings: bool = True) -> None:
    """Refuse nesting deeper than ``max_depth`` and, when ``strings``, strings (keys or values) that
    are not encodable UTF-8 (lone surrogates: only ``\\ud800``-style escapes can produce them)."""
    if not strings:
        stack = [(data, 1)] if isinstance(data, (dict, list)) else []
        while stack:
            value, depth = stack.pop()
            if depth > max_depth:
                raise BundleError(f"{source} nests objects or arrays more than {max_depth} levels deep; refusing it")
            items = value.values() if isinstance(value, dict) else value
            stack.extend((item, depth + 1) for item in items if isinstance(item, (dict, list)))
        return
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)) and depth > max_depth:
            raise BundleError(f"{source} nests objects or arrays more than {max_depth} levels deep; refusing it")
        if isinstance(value, dict):
            for key, item in value.items():
                _encodable(key, source)
                if isinstance(item, (dict, list)):
                    stack.append((item, depth + 1))
                elif isinstance(item, str):
                    _encodable(item, source)
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, (dict, list)):
                    stack.append((item, depth + 1))
                elif isinstance(item, str):
                    _encodable(item, source)
        elif isinstance(value, str):
            _encodable(value, source)


def _encodable(text: str, source: str) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise BundleError(f"{source} holds a string with an unpaired surrogate escape ({text[:40]!r}); refusing it") from None


def describe(value: Any) -> str:
    """A short description of a JSON value for error messages."""
    if value is _MISSING:
        return "nothing (the field is missing)"
    if value is None:
        return "null"
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


class Fields:
    """Typed reader of one JSON object; errors name ``where.key`` and the expectation.

    >>> head = Fields(data["head"], "head", "manifest.json")
    >>> head.number("temperature", minimum=0, exclusive_minimum=True, default=1.0)
    """

    def __init__(self, value: Any, where: str, source: str):
        if not isinstance(value, dict):
            raise BundleError(f"{source}: field {where or '(document)'} must be a JSON object, got {describe(value)}")
        self.data = value
        self.where = where
        self.source = source

    def name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def fail(self, key: str, expected: Any, value: Any = _MISSING) -> BundleError:
        """The error for ``key``; ``expected`` is a description or a function returning one (built lazily)."""
        text = expected() if callable(expected) else expected
        return BundleError(f"{self.source}: field {self.name(key)} must be {text}, got {describe(value)}")

    def _get(self, key: str, default: Any, nullable: bool, expected: Any) -> tuple[bool, Any]:
        value = self.data.get(key, _MISSING)
        if value is _MISSING:
            if default is _MISSING:
                raise self.fail(key, expected)
            return False, default
        if value is None:
            if nullable:
                return False, None
            raise self.fail(key, expected, value)
        return True, value

    def integer(self, key: str, minimum: int | None = None, maximum: int | None = None, default: Any = _MISSING,
                nullable: bool = False) -> int | None:
        def expected():
            return "an integer" + _range(minimum, maximum) + (" or null" if nullable else "")
        present, value = self._get(key, default, nullable, expected)
        if not present:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, expected, value)
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            raise self.fail(key, expected, value)
        return value

    def number(self, key: str, minimum: float | None = None, maximum: float | None = None, default: Any = _MISSING,
               nullable: bool = False, exclusive_minimum: bool = False) -> float | None:
        def expected():
            return "a finite number" + _range(minimum, maximum, exclusive_minimum) + (" or null" if nullable else "")
        present, value = self._get(key, default, nullable, expected)
        if not present:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(key, expected, value)
        number = float(value) if abs(value) < 1e308 else math.inf
        if not math.isfinite(number):
            raise self.fail(key, expected, value)
        if minimum is not None and (number < minimum or (exclusive_minimum and number == minimum)):
            raise self.fail(key, expected, value)
        if maximum is not None and number > maximum:
            raise self.fail(key, expected, value)
        return number

    def boolean(self, key: str, default: Any = _MISSING) -> bool:
        present, value = self._get(key, default, False, "true or false")
        if present and not isinstance(value, bool):
            raise self.fail(key, "true or false (a JSON boolean, not a string)", value)
        return value

    def string(self, key: str, max_length: int = 1024, choices: Iterable[str] | None = None, default: Any = _MISSING,
               nullable: bool = False, min_length: int = 0) -> str | None:
        options = tuple(choices) if choices is not None else None
        def expected():
            return (f"one of {list(options)}" if options else f"a string of {min_length}..{max_length} characters") + (
                    " or null" if nullable else "")
        present, value = self._get(key, default, nullable, expected)
        if not present:
            return value
        if not isinstance(value, str) or not min_length <= len(value) <= max_length:
            raise self.fail(key, expected, value)
        if options is not None and value not in options:
            raise self.fail(key, expected, value)
        return value

    def mapping(self, key: str, default: Any = _MISSING, nullable: bool = False) -> "Fields | None":
        def expected():
            return "a JSON object" + (" or null" if nullable else "")
        present, value = self._get(key, default, nullable, expected)
        if not present:
            return None if value is None else Fields(value, self.name(key), self.source)
        if not isinstance(value, dict):
            raise self.fail(key, expected, value)
        return Fields(value, self.name(key), self.source)

    def sequence(self, key: str, max_length: int, default: Any = _MISSING, nullable: bool = False) -> list | None:
        def expected():
            return f"a list of at most {max_length} entries" + (" or null" if nullable else "")
        present, value = self._get(key, default, nullable, expected)
        if not present:
            return value
        if not isinstance(value, list) or len(value) > max_length:
            raise self.fail(key, expected, value if not isinstance(value, list) else f"{len(value)} entries")
        return value


def _range(minimum: float | None, maximum: float | None, exclusive_minimum: bool = False) -> str:
    if minimum is not None and maximum is not None:
        return f" in {'(' if exclusive_minimum else '['}{minimum}, {maximum}]"
    if minimum is not None:
        return f" {'>' if exclusive_minimum else '>='} {minimum}"
    if maximum is not None:
        return f" <= {maximum}"
    return ""
