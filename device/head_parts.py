"""Head versions as shared base files plus small per-version parts (numpy only).

A device commit that adds a class used to rewrite the whole head and its statistics (about
28 MB at 1000 classes x 1280-d). Instead, a version may name *parts* in its head section::

    "head": {
      "weights": "heads/v1/weights.npy",            the base files (shared, never rewritten)
      "bias": "heads/v1/bias.npy",
      "statistics": {"class_sums": ..., "class_counts": ..., "gram": ...},
      "device_examples": {...} or absent,
      "parts": [                                     applied in order on top of the base
        {"version": 2, "columns": 1, "added": 1, "rows": 5,
         "indices": "heads/v2/part_indices.npy",     (k,) int64: the class index of each part column
         "weights": "heads/v2/part_weights.npy",     (D, k) float32
         "bias": "heads/v2/part_bias.npy",           (k,) float32
         "class_sums": "heads/v2/part_class_sums.npy",     (k, D) float64 (with statistics)
         "class_counts": "heads/v2/part_class_counts.npy", (k,) int64 (with statistics)
         "examples": "heads/v2/part_examples.npy",   (n, D) float32: examples learned in this version
         "labels": "heads/v2/part_labels.npy"}       (n,) int64: their class indices
      ]
    }

Reading a version (:func:`assemble`): start from the base arrays; for each part, a column
index below the current class count replaces that column (weights, bias, class sums and
counts), the others (``added`` of them, in order) are appended; the part's examples are
appended to the device examples and, when the statistics hold a Gram matrix, their outer
products ``examples.T @ examples`` (float64) are added to it. The base has
``C - sum(added)`` classes. Every part file is listed in the manifest's ``files`` table with its
sha256 and size like any other file, so verification, signing, packing and pruning need
nothing new. A version without ``parts`` is a plain single-file layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

#: The per-part array keys, with the axis along which their columns/rows are indexed.
PART_ARRAYS = ("indices", "weights", "bias", "class_sums", "class_counts", "examples", "labels")
#: At most this many parts per version (each is a handful of small files; compaction folds them).
MAX_PARTS = 1024


@dataclass
class PartArrays:
    """One part, loaded: ``indices`` (k,), ``weights`` (D, k), ``bias`` (k,), optional statistics
    rows and the examples learned in the part's version."""

    indices: np.ndarray
    weights: np.ndarray
    bias: np.ndarray
    class_sums: np.ndarray | None = None
    class_counts: np.ndarray | None = None
    examples: np.ndarray | None = None
    labels: np.ndarray | None = None


def added_classes(section: dict[str, Any]) -> int:
    """How many classes the parts of a head section append to its base (0 without parts)."""
    return sum(int(part.get("added", 0)) for part in section.get("parts") or ())


def load_parts(section: dict[str, Any], load: Callable[[str], np.ndarray]) -> list[PartArrays]:
    """The parts of a head section, each array read with ``load(path)`` (checked by the caller's reader)."""
    parts = []
    for entry in section.get("parts") or ():
        arrays = {key: load(entry[key]) for key in PART_ARRAYS if entry.get(key)}
        parts.append(PartArrays(**arrays))
    return parts


def _apply_columns(current: np.ndarray, indices: np.ndarray, values: np.ndarray, axis: int, what: str) -> np.ndarray:
    """``current`` with the slices at ``indices`` (along ``axis``) replaced or appended from ``values``."""
    count = current.shape[axis]
    new = indices >= count
    appended = indices[new]
    if appended.size and not np.array_equal(appended, np.arange(count, count + appended.size)):
        raise ValueError(f"a part of {what} appends class indices {appended.tolist()[:8]}, expected {count}..")
    replaced = np.flatnonzero(~new)
    result = current
    if replaced.size:
        result = current.copy()
        if axis == 0:
            result[indices[replaced]] = values[replaced]
        else:
            result[:, indices[replaced]] = values[:, replaced]
    if appended.size:
        tail = values[np.flatnonzero(new)] if axis == 0 else values[:, np.flatnonzero(new)]
        result = np.concatenate([result, tail.astype(result.dtype, copy=False)], axis=axis)
    return result


def assemble(base: dict[str, np.ndarray | None], parts: list[PartArrays]) -> dict[str, np.ndarray | None]:
    """The arrays of a version from its base arrays and parts (see the module docstring).

    Args:
        base: ``weights``, ``bias``, ``class_sums``, ``class_counts``, ``gram``, ``examples`` and
            ``labels`` of the base (None or missing: not wanted, or absent).
        parts: the loaded parts, in order.

    Returns:
        The same keys, assembled.

    Raises:
        ValueError: a part does not fit the arrays before it (the caller names the bundle).
    """
    result = dict(base)
    rows = []
    for number, part in enumerate(parts, start=1):
        indices = np.asarray(part.indices, dtype=np.int64).reshape(-1)
        if indices.size and indices.min() < 0:
            raise ValueError(f"part {number} has negative class indices")
        if part.weights.shape[1] != indices.size or part.bias.shape != (indices.size,):
            raise ValueError(f"part {number}: weights {part.weights.shape} and bias {part.bias.shape} do not match "
                             f"its {indices.size} class indices")
        if result.get("weights") is not None:
            result["weights"] = _apply_columns(result["weights"], indices, part.weights, 1, "the weights")
            result["bias"] = _apply_columns(result["bias"], indices, part.bias, 0, "the bias")
        if result.get("class_sums") is not None:
            if part.class_sums is None or part.class_counts is None:
                raise ValueError(f"part {number} lacks the class statistics rows")
            if part.class_sums.shape[0] != indices.size or part.class_counts.shape != (indices.size,):
                raise ValueError(f"part {number}: class statistics rows do not match its {indices.size} indices")
            result["class_sums"] = _apply_columns(result["class_sums"], indices, part.class_sums, 0, "the class sums")
            result["class_counts"] = _apply_columns(result["class_counts"], indices, part.class_counts, 0,
                                                    "the class counts")
        if part.examples is not None and part.examples.shape[0]:
            labels = part.labels if part.labels is not None else np.zeros(0, np.int64)
            if labels.shape != (part.examples.shape[0],):
                raise ValueError(f"part {number}: {part.examples.shape[0]} examples but {labels.shape[0]} labels")
            rows.append(part.examples)
            if result.get("examples") is None:
                result["examples"], result["labels"] = part.examples, labels
            else:
                result["examples"] = np.concatenate([result["examples"],
                                                     part.examples.astype(result["examples"].dtype, copy=False)])
                result["labels"] = np.concatenate([result["labels"], labels.astype(np.int64, copy=False)])
    if rows and result.get("gram") is not None:
        stacked = np.asarray(rows[0] if len(rows) == 1 else np.concatenate(rows), dtype=np.float64)
        gram = stacked.T @ stacked
        gram += result["gram"]
        result["gram"] = gram
    return result


def part_bytes(section: dict[str, Any], table: dict[str, dict]) -> int:
    """Bytes of the part files of a head section."""
    return sum(int(table[entry[key]]["size"]) for entry in section.get("parts") or () for key in PART_ARRAYS
               if entry.get(key) and entry[key] in table)


def base_bytes(section: dict[str, Any], table: dict[str, dict]) -> int:
    """Bytes of the base files the parts extend (weights, bias, statistics, device examples)."""
    paths = [section.get("weights"), section.get("bias")]
    statistics = section.get("statistics") or {}
    paths += [statistics.get("class_sums"), statistics.get("class_counts"), statistics.get("gram")]
    examples = section.get("device_examples") or {}
    paths += [examples.get("embeddings"), examples.get("labels")]
    return sum(int(table[path]["size"]) for path in paths if path and path in table)
