"""The update gate: how much an update may change the old classes' predictions.

Before a head version is committed, its predictions on reference embeddings of the old
classes are compared with the current head's; an update that disturbs more than the budget
is refused with :class:`UpdateGateError` (unless forced). Used by the device updater and by
the host's ``merge-deltas``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from edgeadapt.device.errors import InputError, UpdateError
from edgeadapt.device.head import Head
from edgeadapt.device.head_state import HeadState

#: Default update-gate budget: the largest fraction of old-class reference embeddings that an
#: update may disturb (see :class:`GateReport`) before it is refused.
DEFAULT_GATE_BUDGET = 0.10
DEFAULT_REFERENCES_PER_CLASS = 5
#: Above this many reference x class x dimension multiply-adds the exact gate falls back to a
#: deterministic subsample of the references.
_EXACT_GATE_WORK = 4e8


class UpdateGateError(UpdateError):
    """The update gate refused an update: old-class predictions would change beyond the budget."""

    def __init__(self, message: str, report: "GateReport"):
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class GateReport:
    """What the update gate measured on the stored references of the old classes.

    A reference embedding of an old class is *disturbed* when, after the update, a new or
    changed class outscores its own class although it did not before (for a reference of a
    changed class: it was predicted correctly before and is not after). ``fraction`` =
    disturbed / checked; the update passes when ``fraction <= budget``.
    """

    source: str
    checked: int
    disturbed: int
    budget: float
    passed: bool
    forced: bool = False
    exact: bool = True
    details: tuple[dict, ...] = ()

    @property
    def fraction(self) -> float:
        return self.disturbed / self.checked if self.checked else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "checked": self.checked,
            "disturbed": self.disturbed,
            "fraction": round(self.fraction, 6),
            "budget": self.budget,
            "passed": self.passed,
            "forced": self.forced,
            "details": list(self.details),
        }

    def describe(self) -> str:
        if not self.checked:
            return f"gate: nothing to check ({self.source})"
        worst = "; ".join(
            f"{entry['class']!r}: {entry['disturbed']}/{entry['of']} now taken by "
            + ", ".join(f"{name!r}" for name in entry["taken_by"])
            for entry in self.details[:5]
        )
        return (
            f"{self.disturbed} of {self.checked} old-class reference embeddings ({self.fraction:.1%}) would change "
            f"prediction, budget {self.budget:.1%}" + (f" ({worst})" if worst else "")
        )


# ----------------------------------------------------------------------------- update gate
def _column_range(indices: np.ndarray) -> slice | np.ndarray:
    """``indices`` as a slice when they are consecutive (a view instead of a copy)."""
    if indices.size and indices[-1] - indices[0] == indices.size - 1 and np.all(np.diff(indices) == 1):
        return slice(int(indices[0]), int(indices[-1]) + 1)
    return indices


def _equal_columns(old: Head, new: Head, kept_old: np.ndarray, kept_new: np.ndarray) -> np.ndarray:
    """Which kept columns (and biases) are bit-identical in ``old`` and ``new``."""
    old_columns, new_columns = _column_range(kept_old), _column_range(kept_new)
    equal = (old.weights[:, old_columns] == new.weights[:, new_columns]).all(axis=0)
    return equal & (old.bias[old_columns] == new.bias[new_columns])


def _own_logits(features: np.ndarray, head: Head, labels: np.ndarray) -> np.ndarray:
    """Each row's logit for its own class (before temperature), without the full (K, C) product.

    References are usually stored sorted by class with the same number per class; then each
    class's column is read once instead of once per reference (5x less memory traffic).
    """
    count = labels.size
    if count:
        first_row = np.flatnonzero(np.r_[True, labels[1:] != labels[:-1]])
        per_class = count // first_row.size
        if per_class > 1 and per_class * first_row.size == count and np.all(np.diff(first_row) == per_class):
            classes = labels[first_row]
            columns = np.ascontiguousarray(head.weights.T[classes])  # (U, D)
            grouped = features.reshape(first_row.size, per_class, features.shape[1])
            return (np.einsum("ucd,ud->uc", grouped, columns).reshape(count) + head.bias[labels]).astype(np.float32)
    rows = np.ascontiguousarray(head.weights.T)[labels]
    return np.einsum("kd,kd->k", features, rows) + head.bias[labels]


def gate_reference_parts(state: HeadState, per_class: int = DEFAULT_REFERENCES_PER_CLASS
                         ) -> tuple[list[np.ndarray], np.ndarray, str]:
    """The gate's reference embeddings as parts (float32 arrays, not copied), their labels and source.

    Stored references (``head.references``, written at export or by
    :meth:`HeadUpdater.set_reference_embeddings`); for classes without them, up to
    ``per_class`` of the examples the class was learned from on this device; for classes
    with neither, the class mean from the class statistics. :func:`evaluate_gate` takes the
    parts as they are, so the stored references (often K = 5 per class x 1000 classes) are
    not copied into one array on every update.

    Args:
        state: The current head version.
        per_class: How many device examples of a class without stored references are used.

    Returns:
        (parts, labels, source): the parts' rows in order match ``labels`` (class indices);
        ``source`` names where they came from ("none" when there are none).
    """
    parts, labels, sources = [], [], []
    covered = np.zeros(state.head.num_classes, dtype=bool)
    if state.references is not None and len(state.references):
        parts.append(state.references.as_float32())
        labels.append(state.references.labels)
        covered[state.references.labels[state.references.labels < covered.size]] = True
        sources.append("references")
    examples = state.device_examples
    if examples is not None and len(examples):
        order = np.argsort(examples.labels, kind="stable")
        sorted_labels = examples.labels[order]
        starts = np.searchsorted(sorted_labels, sorted_labels)  # first position of each row's class
        rank = np.arange(sorted_labels.size) - starts
        chosen = order[(rank < per_class) & ~covered[sorted_labels]]
        if chosen.size:
            chosen = np.sort(chosen)
            parts.append(examples.as_float32()[chosen])
            labels.append(examples.labels[chosen])
            covered[examples.labels[chosen]] = True
            sources.append("device examples")
    if state.stats is not None:
        missing = np.flatnonzero(~covered & (state.stats.counts > 0))
        if missing.size:
            means = state.stats.sums[missing] / np.maximum(state.stats.counts[missing], 1)[:, None]
            parts.append(means.astype(np.float32))
            labels.append(missing.astype(np.int64))
            sources.append("class means")
    if not parts:
        return [], np.zeros(0, np.int64), "none"
    return parts, labels[0] if len(labels) == 1 else np.concatenate(labels), " + ".join(sources)


def gate_references(state: HeadState, per_class: int = DEFAULT_REFERENCES_PER_CLASS
                    ) -> tuple[np.ndarray, np.ndarray, str]:
    """The gate's reference embeddings as one (K, D) float32 array, their labels and source.

    Args:
        state: The current head version.
        per_class: How many device examples of a class without stored references are used.

    Returns:
        (embeddings, labels, source), as :func:`gate_reference_parts` but joined into one array.
    """
    parts, labels, source = gate_reference_parts(state, per_class)
    if not parts:
        return np.zeros((0, state.head.embedding_size), np.float32), labels, source
    return (parts[0] if len(parts) == 1 else np.concatenate(parts)), labels, source


def evaluate_gate(
    old_head: Head,
    new_head: Head,
    references: np.ndarray | Sequence[np.ndarray],
    labels: np.ndarray,
    index_map: np.ndarray,
    old_names: Sequence[str],
    new_names: Sequence[str],
    budget: float,
    source: str = "references",
    force: bool = False,
    *,
    changed_columns: np.ndarray | None = None,
) -> GateReport:
    """Compare ``old_head`` and ``new_head`` on the reference embeddings of the surviving old classes.

    Cheap when the update keeps most columns bit-identical (it only scores the new and changed
    columns); exact on all references otherwise (subsampled beyond a fixed amount of work).

    Args:
        old_head: The current head.
        new_head: The head the update would commit.
        references: The reference embeddings (K, D), or a list of arrays whose rows, in order,
            are the K references (as :func:`gate_reference_parts` returns them; not copied).
        labels: The references' class indices in ``old_head`` (K,).
        index_map: ``index_map[i]`` is the new index of old class i (-1 when removed).
        old_names: The old head's class names.
        new_names: The new head's class names.
        budget: The largest fraction of references the update may disturb.
        source: Where the references came from (reported).
        force: Whether the update is forced (reported; the gate still measures).
        changed_columns: The new head's columns that may differ from the old head's, when the
            caller already knows every other kept column is bit-identical (an add-class plan
            does); saves comparing the columns again. None: compare them here.

    Returns:
        The gate's report; ``passed`` says whether the update is within the budget.
    """
    labels = np.asarray(labels, dtype=np.int64)
    parts = [references] if isinstance(references, np.ndarray) else list(references)
    parts = [np.asarray(part, dtype=np.float32) for part in parts]
    if sum(part.shape[0] for part in parts) != labels.size:
        raise InputError(f"the gate got {sum(part.shape[0] for part in parts)} references but {labels.size} labels")
    surviving = index_map[labels] >= 0
    checked = int(surviving.sum())
    if checked == 0:
        return GateReport(source=source if source != "none" else "none (no references or class statistics)",
                          checked=0, disturbed=0, budget=budget, passed=True, forced=force)
    changed = _changed_columns(old_head, new_head, index_map, changed_columns)
    if changed is not None:
        pieces = []
        start = 0
        for part in parts:
            part_labels, keep = labels[start:start + part.shape[0]], surviving[start:start + part.shape[0]]
            start += part.shape[0]
            if not keep.all():
                part, part_labels = part[keep], part_labels[keep]
            if part_labels.size:
                pieces.append(_disturbed_by_changed_columns(old_head, new_head, part, part_labels,
                                                            index_map[part_labels], index_map, changed))
        disturbed = np.concatenate([piece[0] for piece in pieces])
        taker = np.concatenate([piece[1] for piece in pieces])
        old_labels = labels[surviving]
        exact = False
    else:
        embeddings = (parts[0] if len(parts) == 1 else np.concatenate(parts))[surviving]
        old_labels = labels[surviving]
        rows, disturbed, taker, exact = _disturbed_exactly(old_head, new_head, embeddings, old_labels,
                                                           index_map[old_labels])
        checked = int(rows.size)
        old_labels = old_labels[rows]
    count = int(disturbed.sum())
    details = _worst_classes(disturbed, taker, old_labels, old_names, new_names) if count else []
    fraction = count / checked if checked else 0.0
    return GateReport(source=source, checked=checked, disturbed=count, budget=float(budget),
                      passed=fraction <= budget, forced=force, exact=exact, details=tuple(details))


def _changed_columns(old_head: Head, new_head: Head, index_map: np.ndarray,
                     known: np.ndarray | None = None) -> np.ndarray | None:
    """The new head's new or changed columns, or None when the fast path does not apply.

    The fast path needs the same feature normalisation and few changed columns. ``known``:
    the changed columns as the caller already determined them (not compared again).
    """
    if not old_head.same_normalisation(new_head):
        return None
    if known is not None:
        known = np.unique(np.asarray(known, dtype=np.int64))
        return None if known.size > max(64, new_head.num_classes // 4) else known
    kept_old = np.flatnonzero(index_map >= 0)
    kept_new = index_map[kept_old]
    equal = _equal_columns(old_head, new_head, kept_old, kept_new)
    unchanged = np.zeros(new_head.num_classes, dtype=bool)
    unchanged[kept_new[equal]] = True
    changed = np.flatnonzero(~unchanged)
    return None if changed.size > max(64, new_head.num_classes // 4) else changed


def _disturbed_by_changed_columns(old_head: Head, new_head: Head, embeddings: np.ndarray, old_labels: np.ndarray,
                                  new_labels: np.ndarray, index_map: np.ndarray, changed: np.ndarray
                                  ) -> tuple[np.ndarray, np.ndarray]:
    """Fast path: (disturbed, taker) per reference, scoring only the ``changed`` columns."""
    checked = old_labels.size
    disturbed = np.zeros(checked, dtype=bool)
    taker = np.full(checked, -1, dtype=np.int64)
    features = new_head.features(embeddings)  # == old features: same normalisation
    own_logit = _own_logits(features, new_head, new_labels)
    if not changed.size:
        return disturbed, taker
    new_logits = features @ new_head.weights[:, changed] + new_head.bias[changed]
    beats = new_logits > own_logit[:, None]
    new_to_old = np.full(new_head.num_classes, -1, dtype=np.int64)
    new_to_old[index_map[index_map >= 0]] = np.flatnonzero(index_map >= 0)
    existed = new_to_old[changed] >= 0
    if existed.any():
        old_columns = new_to_old[changed[existed]]
        old_logits = features @ old_head.weights[:, old_columns] + old_head.bias[old_columns]
        old_own = _own_logits(features, old_head, old_labels)
        beats[:, existed] &= ~(old_logits > old_own[:, None])
    own_changed = np.isin(new_labels, changed)
    stolen = beats.any(axis=1) & ~own_changed
    disturbed |= stolen
    masked = np.where(beats, new_logits, -np.inf)
    taker[stolen] = changed[masked[stolen].argmax(axis=1)]
    if own_changed.any():  # references of a changed class: exact before/after on those only
        rows = np.flatnonzero(own_changed)
        before = old_head.logits(embeddings[rows]).argmax(axis=1)
        after = new_head.logits(embeddings[rows]).argmax(axis=1)
        regressed = (before == old_labels[rows]) & (after != new_labels[rows])
        disturbed[rows[regressed]] = True
        taker[rows[regressed]] = after[regressed]
    return disturbed, taker


def _disturbed_exactly(old_head: Head, new_head: Head, embeddings: np.ndarray, old_labels: np.ndarray,
                       new_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """Exact path: (rows checked, disturbed, taker, exact) comparing both heads' predictions.

    Beyond a fixed amount of work a deterministic subsample of the references is checked.
    """
    checked = old_labels.size
    rows = np.arange(checked)
    exact = True
    work = float(checked) * embeddings.shape[1] * (old_head.num_classes + new_head.num_classes)
    if work > _EXACT_GATE_WORK:
        keep = max(1, int(checked * _EXACT_GATE_WORK / work))
        rows = np.sort(np.random.default_rng(0).choice(checked, keep, replace=False))
        exact = False
    before = old_head.logits(embeddings[rows]).argmax(axis=1)
    after = new_head.logits(embeddings[rows]).argmax(axis=1)
    regressed = (before == old_labels[rows]) & (after != new_labels[rows])
    disturbed = np.zeros(checked, dtype=bool)
    taker = np.full(checked, -1, dtype=np.int64)
    disturbed[rows[regressed]] = True
    taker[rows[regressed]] = after[regressed]
    return rows, disturbed[rows], taker[rows], exact


def _worst_classes(disturbed: np.ndarray, taker: np.ndarray, old_labels: np.ndarray, old_names: Sequence[str],
                   new_names: Sequence[str]) -> list[dict]:
    """The worst classes (at most 10) and who took their references."""
    details = []
    hit_labels, hit_takers = old_labels[disturbed], taker[disturbed]
    totals = np.bincount(old_labels, minlength=len(old_names))
    classes_hit, hit_counts = np.unique(hit_labels, return_counts=True)
    for position in np.argsort(-hit_counts, kind="stable")[:10]:
        old_class = int(classes_hit[position])
        takers, counts = np.unique(hit_takers[hit_labels == old_class], return_counts=True)
        order = np.argsort(-counts, kind="stable")
        details.append({
            "class": old_names[old_class],
            "disturbed": int(hit_counts[position]),
            "of": int(totals[old_class]),
            "taken_by": {new_names[int(takers[i])]: int(counts[i]) for i in order if takers[i] >= 0},
        })
    return details
