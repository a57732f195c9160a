"""The plan of one device update: what each :class:`~edgeadapt.device.updater.HeadUpdater` operation changes.

Each operation (add classes, strengthen a class, remove, rename, store references, calibrate
unknown rejection, compact) turns the current :class:`~edgeadapt.device.head_state.HeadState`
into an :class:`UpdatePlan`: the new head, statistics, class entries, stored embeddings and the
``change`` record. The updater then runs the update gate on it and commits it (its commit
plumbing stays in :mod:`edgeadapt.device.updater`). The head math is the shared numpy code of
:mod:`edgeadapt.device.incremental`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgeadapt.device.reference_embeddings import ReferenceEmbeddings
from edgeadapt.device.errors import IncompatibleModelError, InputError, UpdateError
from edgeadapt.device.head import ClassStats, Head
from edgeadapt.device.head_state import HeadState
from edgeadapt.device.manifest import utc_timestamp
from edgeadapt.device.unknown import UnknownRejection, calibrate_unknown
from edgeadapt.device.version_builder import ChangeAction


@dataclass
class UpdatePlan:
    """The new head version an operation produces (before the gate and the commit)."""

    action: str
    classes: list[dict]
    head: Head
    stats: ClassStats | None
    references: ReferenceEmbeddings | None
    device_examples: ReferenceEmbeddings | None
    unknown: UnknownRejection | None
    index_map: np.ndarray
    change: dict
    gate: bool = True
    timings: dict = field(default_factory=dict)
    #: (embeddings, class indices) appended to the device examples whose outer products entered the Gram matrix
    added_examples: tuple[np.ndarray, np.ndarray] | None = None
    compact: bool = False
    #: the new head's columns that may differ from the old head's, when the plan has checked that every other
    #: kept column is bit-identical (the gate then does not compare them again); None: the gate compares
    changed_columns: np.ndarray | None = None


def relabel_examples(store: ReferenceEmbeddings | None, index_map: np.ndarray) -> ReferenceEmbeddings | None:
    if store is None:
        return None
    new_labels = index_map[store.labels]
    keep = new_labels >= 0
    if not keep.any():
        return None
    result = ReferenceEmbeddings(store.embeddings[keep], new_labels[keep])
    if store.embeddings.dtype != np.float32 and "_float32" in store.__dict__:
        result.__dict__["_float32"] = store.__dict__["_float32"][keep]
    return result


def append_examples(store: ReferenceEmbeddings | None, embeddings: np.ndarray, label: int, dtype) -> ReferenceEmbeddings:
    embeddings = np.asarray(embeddings, dtype=np.float32)
    labels = np.full(embeddings.shape[0], label, dtype=np.int64)
    if store is None or not len(store):
        return ReferenceEmbeddings(embeddings.astype(dtype), labels)
    result = ReferenceEmbeddings(
        np.concatenate([store.embeddings, embeddings.astype(store.embeddings.dtype)]),
        np.concatenate([store.labels, labels]),
    )
    if store.embeddings.dtype != np.float32 and "_float32" in store.__dict__:
        # keep the float32 copy current without converting everything again
        rounded = embeddings.astype(store.embeddings.dtype).astype(np.float32)
        result.__dict__["_float32"] = np.concatenate([store.__dict__["_float32"], rounded])
    return result


#: Methods whose add_examples recomputes the column from the class statistics (see incremental.add_examples).
STRENGTHEN_NEEDS_STATISTICS = ("ridge", "imprint", "center_l2", "imprint_calibrated")


def refuse_strengthen_without_statistics(method: str) -> None:
    raise IncompatibleModelError(
        f"strengthening a class recomputes its column from the class statistics with the automatic method "
        f"({method}), and this bundle has none (imported without --data). Give --method weight_align (options="
        "AddClassOptions(method='weight_align')), which trains the column further on the new photos, or remove "
        "the class and add it again with all its photos; nothing was changed"
    )


def calibration_embeddings(state: HeadState, exclude_class: int | None = None) -> np.ndarray | None:
    """The calibration embeddings of a state, float32 (N, D): its background, its reference embeddings and the
    examples learned on the device (without those of ``exclude_class``, the class being strengthened)."""
    parts = []
    if state.background is not None and len(state.background):
        parts.append(np.asarray(state.background, dtype=np.float32))
    if state.references is not None and len(state.references):
        keep = slice(None) if exclude_class is None else state.references.labels != exclude_class
        parts.append(state.references.as_float32()[keep])
    examples = state.device_examples
    if examples is not None and len(examples):
        keep = slice(None) if exclude_class is None else examples.labels != exclude_class
        parts.append(examples.as_float32()[keep])
    parts = [part for part in parts if len(part)]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def head_math():
    try:
        from edgeadapt.device import incremental
    except ImportError as error:  # pragma: no cover - only while the module is missing
        raise UpdateError(f"the head math module edgeadapt.device.incremental is unavailable: {error}") from error
    return incremental


def _identity(state: HeadState) -> np.ndarray:
    return np.arange(state.head.num_classes, dtype=np.int64)


# ----------------------------------------------------------------------------- one plan per operation
def add_classes_plan(state: HeadState, names: list[str], embeddings: list[np.ndarray], options: Any,
                     calibration: np.ndarray | None, duplicates: int) -> UpdatePlan:
    """New classes ``names`` learned from their (distinct) ``embeddings``, appended after the existing ones.

    Args:
        state: The current head version.
        names: The new class names (checked to be free).
        embeddings: Each new class's embeddings (n_i, D), duplicates removed.
        options: The head math's options (:class:`~edgeadapt.device.add_options.AddClassOptions`).
        calibration: The state's calibration embeddings (:func:`calibration_embeddings`), or None.
        duplicates: How many duplicate examples were dropped (recorded in the change).

    Returns:
        The plan of the new version.

    Raises:
        UpdateError: When the head math returns an unexpected number of classes.
    """
    start = time.perf_counter()
    head, stats = head_math().add_classes(state.head, state.stats, embeddings, options, calibration=calibration)
    seconds = time.perf_counter() - start
    old_count = state.head.num_classes
    if head.num_classes != old_count + len(names):
        raise UpdateError(f"the head math returned {head.num_classes} classes, expected {old_count + len(names)}")
    classes = state.classes
    examples = state.device_examples
    for offset, (name, class_embeddings) in enumerate(zip(names, embeddings)):
        index = old_count + offset
        classes.append({"name": name, "index": index, "origin": "device-added", "added_at": utc_timestamp(),
                        "examples": int(class_embeddings.shape[0]), "added_in_version": None})
        # the device examples double as the gate references of this class in later updates
        examples = append_examples(examples, class_embeddings, index, np.float32)
    unchanged = bool(np.array_equal(head.weights[:, :old_count], state.head.weights)
                     and np.array_equal(head.bias[:old_count], state.head.bias))
    change = {"action": ChangeAction.ADD_CLASS, "classes": list(names),
              "examples": int(sum(part.shape[0] for part in embeddings)),
              "method": getattr(options, "method", None), "old_rows_unchanged": unchanged}
    if duplicates:
        change["duplicates_ignored"] = duplicates
    added = (np.concatenate(embeddings).astype(np.float32),
             np.concatenate([np.full(part.shape[0], old_count + offset, np.int64)
                             for offset, part in enumerate(embeddings)]))
    return UpdatePlan(ChangeAction.ADD_CLASS, classes, head, stats, state.references, examples, state.unknown,
                      np.arange(old_count, dtype=np.int64), change, timings={"math": seconds},
                      added_examples=added,
                      changed_columns=np.arange(old_count, head.num_classes, dtype=np.int64) if unchanged else None)


def add_examples_plan(state: HeadState, name: str, index: int, embeddings: np.ndarray, options: Any,
                      calibration: np.ndarray | None, duplicates: int, automatic: bool) -> UpdatePlan:
    """Class ``name`` (at ``index``) strengthened with more (distinct) ``embeddings``.

    Args:
        state: The current head version.
        name: The class's name.
        index: Its index in the head.
        embeddings: The new examples' embeddings (n, D), duplicates removed.
        options: The head math's options.
        calibration: The state's calibration embeddings without this class's, or None.
        duplicates: How many duplicate examples were dropped (recorded in the change).
        automatic: Whether the method was chosen automatically (not by the user).

    Returns:
        The plan of the new version.

    Raises:
        IncompatibleModelError: When the method cannot strengthen a class of this bundle.
    """
    start = time.perf_counter()
    try:
        head, stats = head_math().add_examples(state.head, state.stats, index, embeddings, options,
                                               calibration=calibration)
    except IncompatibleModelError:
        if automatic and state.stats is None:  # the automatic method needs what is missing
            refuse_strengthen_without_statistics(options.method)
        raise
    seconds = time.perf_counter() - start
    classes = state.classes
    entry = classes[index]
    if entry.get("examples") is not None:
        entry["examples"] = int(entry["examples"]) + int(embeddings.shape[0])
    examples = append_examples(state.device_examples, embeddings, index, np.float32)
    change = {"action": ChangeAction.ADD_EXAMPLES, "classes": [name], "examples": int(embeddings.shape[0]),
              "method": getattr(options, "method", None)}
    if duplicates:
        change["duplicates_ignored"] = duplicates
    return UpdatePlan(ChangeAction.ADD_EXAMPLES, classes, head, stats, state.references, examples, state.unknown,
                      np.arange(state.head.num_classes, dtype=np.int64), change, timings={"math": seconds},
                      added_examples=(embeddings.astype(np.float32), np.full(embeddings.shape[0], index, np.int64)))


def remove_class_plan(state: HeadState, name: str, index: int) -> UpdatePlan:
    """Class ``name`` (at ``index``) removed; later classes move down one index.

    Raises:
        UpdateError: When it is the last class.
    """
    if state.head.num_classes <= 1:
        raise UpdateError(f"cannot remove {name!r}: it is the last class of the bundle; nothing was changed")
    start = time.perf_counter()
    head, stats = head_math().remove_class(state.head, state.stats, index)
    seconds = time.perf_counter() - start
    index_map = np.arange(state.head.num_classes, dtype=np.int64)
    index_map[index] = -1
    index_map[index + 1:] -= 1
    classes = [entry for entry in state.classes if entry["name"] != name]
    for position, entry in enumerate(classes):
        entry["index"] = position
    return UpdatePlan(ChangeAction.REMOVE_CLASS, classes, head, stats, relabel_examples(state.references, index_map),
                      relabel_examples(state.device_examples, index_map), state.unknown, index_map,
                      {"action": ChangeAction.REMOVE_CLASS, "classes": [name]}, timings={"math": seconds})


def rename_class_plan(state: HeadState, old_name: str, new_name: str) -> UpdatePlan:
    """Class ``old_name`` renamed ``new_name`` (head rows and statistics unchanged; no gate)."""
    classes = state.classes
    for entry in classes:
        if entry["name"] == old_name:
            entry["name"] = new_name
    return UpdatePlan(ChangeAction.RENAME_CLASS, classes, state.head, state.stats, state.references,
                      state.device_examples, state.unknown, _identity(state),
                      {"action": ChangeAction.RENAME_CLASS, "classes": [new_name], "old_name": old_name,
                       "new_name": new_name}, gate=False)


def set_references_plan(state: HeadState, chosen: ReferenceEmbeddings, label_set: list[str],
                        replace: bool) -> UpdatePlan:
    """``chosen`` stored as the gate's reference embeddings of their classes (the others' kept unless
    ``replace``; no gate)."""
    existing = state.references
    if existing is not None and not replace:
        keep = ~np.isin(existing.labels, np.unique(chosen.labels))
        merged = ReferenceEmbeddings(
            np.concatenate([existing.embeddings[keep], chosen.embeddings.astype(existing.embeddings.dtype)]),
            np.concatenate([existing.labels[keep], chosen.labels]),
        )
    else:
        merged = chosen
    return UpdatePlan(ChangeAction.SET_REFERENCES, state.classes, state.head, state.stats, merged,
                      state.device_examples, state.unknown, _identity(state),
                      {"action": ChangeAction.SET_REFERENCES, "classes": label_set, "references": len(chosen)},
                      gate=False)


def calibrate_unknown_plan(state: HeadState, known: np.ndarray | None, unknown: np.ndarray | None,
                           accept_rate: float) -> UpdatePlan:
    """A calibrated unknown-rejection rule stored with the head (no gate).

    ``known``: embeddings of known classes (default: the stored reference embeddings);
    ``unknown``: optional embeddings of none of the classes.

    Raises:
        InputError: When the head has no classes, or no known embeddings are given or stored.
    """
    if state.head.num_classes == 0:
        raise InputError("the bundle has no classes yet, so there is nothing to tell unknowns from; teach it "
                         "classes first (add_class / `edgeadapt-device add-class`); nothing was changed")
    embeddings = known
    if embeddings is None:
        if state.references is None or not len(state.references):
            raise InputError(
                "give images of the known classes to calibrate unknown rejection; the bundle stores no "
                "reference embeddings to fall back on"
            )
        embeddings = state.references.embeddings.astype(np.float32)
    rule = calibrate_unknown(state.head, state.stats, embeddings, accept_rate=accept_rate,
                             unknown_embeddings=unknown)
    return UpdatePlan(ChangeAction.CALIBRATE_UNKNOWN, state.classes, state.head, state.stats, state.references,
                      state.device_examples, rule, _identity(state),
                      {"action": ChangeAction.CALIBRATE_UNKNOWN, "classes": [], "threshold": rule.threshold,
                       "accept_rate": rule.accept_rate, "examples": int(embeddings.shape[0]),
                       "unknown_examples": 0 if unknown is None else int(unknown.shape[0])}, gate=False)


def compact_plan(state: HeadState) -> UpdatePlan:
    """The current head committed as one set of base files (its parts folded in; no gate)."""
    return UpdatePlan(ChangeAction.COMPACT, state.classes, state.head, state.stats, state.references,
                      state.device_examples, state.unknown, _identity(state),
                      {"action": ChangeAction.COMPACT, "classes": [],
                       "parts": len(state.manifest.data["head"].get("parts") or ())}, gate=False, compact=True)
