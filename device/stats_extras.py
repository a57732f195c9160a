"""Extra arrays kept with the class statistics: a hook of the bundle format (numpy only).

A solver may keep derived state with the class statistics (the ridge method keeps its
:class:`~edgeadapt.device.ridge_basis.RidgeBasis`). The bundle format stores it as named arrays
plus a small metadata mapping under ``head.statistics.<key>``, without knowing the solver:
the solver registers a loader for its key (:func:`register_statistics_extra`); a section
read before its solver registered stays a :class:`StoredExtra`, which the solver converts
when it needs it and which is written back unchanged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, runtime_checkable

import numpy as np

#: The section key under which the statistics' extra arrays are kept (one extra per bundle).
EXTRA_KEY = "ridge_basis"

_LOADERS: dict[str, tuple[tuple[str, ...], Callable[[dict, dict], Any]]] = {}
#: Names an extra's arrays may have (they become file names ``heads/vN/<name>.npy``).
_ARRAY_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_STORED_NAMES: dict[str, None] = {}  # names of extras read without a loader (written back unchanged)


@runtime_checkable
class StatisticsExtra(Protocol):
    """What the bundle format needs from an extra: its arrays, metadata and embedding size."""

    @property
    def embedding_size(self) -> int: ...  # pragma: no cover

    def arrays(self) -> dict[str, np.ndarray]: ...  # pragma: no cover

    def metadata(self) -> dict[str, Any]: ...  # pragma: no cover


@dataclass(frozen=True)
class StoredExtra:
    """An extra as read from a bundle, not (yet) interpreted by its solver."""

    key: str
    stored_metadata: dict[str, Any]
    stored_arrays: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def embedding_size(self) -> int:
        """The leading dimension of the first array (the extras' arrays are D x ... matrices)."""
        first = next(iter(self.stored_arrays.values()), None)
        return int(first.shape[0]) if first is not None and first.ndim else 0

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays, by name."""
        return dict(self.stored_arrays)

    def metadata(self) -> dict[str, Any]:
        """The metadata mapping, as stored."""
        return dict(self.stored_metadata)


def register_statistics_extra(key: str, names: tuple[str, ...], load: Callable[[dict, dict], Any]) -> None:
    """Let the bundle format rebuild the extra kept under ``key`` when it reads a bundle.

    Args:
        key: The section key (``head.statistics.<key>``).
        names: The names of its arrays (file names ``<name>.npy``).
        load: ``load(metadata, arrays)`` -> the solver's object; raises ``KeyError``,
            ``TypeError``, ``ValueError`` or ``IndexError`` on malformed input.
    """
    _LOADERS[key] = (tuple(names), load)


def extra_array_names() -> tuple[str, ...]:
    """The array names of every registered extra (and of extras read without a loader)."""
    registered = [name for names, _ in _LOADERS.values() for name in names]
    return tuple(dict.fromkeys(registered + list(_STORED_NAMES)))


def is_extra_array_name(name: str) -> bool:
    """Whether ``name`` may name an extra's array (lower-case letters, digits, underscores)."""
    return bool(_ARRAY_NAME.match(name))


def load_statistics_extra(key: str, metadata: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> Any:
    """The registered solver's object for ``key``, else a :class:`StoredExtra`.

    Raises:
        KeyError, TypeError, ValueError, IndexError, OverflowError: malformed input (from the loader).
    """
    entry = _LOADERS.get(key)
    if entry is None:
        kept = {name: array for name, array in arrays.items() if _ARRAY_NAME.match(name)}
        _STORED_NAMES.update(dict.fromkeys(kept))
        return StoredExtra(key, dict(metadata), kept)
    names, load = entry
    return load(dict(metadata), {name: array for name, array in arrays.items() if name in names})
