"""The statistics-free rule of the ``claim`` few-shot method: a new class's column and bias (numpy only).

``claim`` is the device's few-shot method; for heads without class statistics (imported
classifiers, head files on a microcontroller) it is exactly this rule, which
:mod:`edgeadapt.device.fewshot` uses as that path. It is also the Python reference of
``ea_prototype_column`` / ``ea_add_class`` in the C head library (``device/c/``,
docs/C_LIBRARY.md, "Adding a class"): the C conformance test checks the C column and bias
against :func:`prototype_column`.

* features ``f = Head.features(e)`` (float32, exactly as the head classifies);
* prototype ``p`` = mean of ``f`` over the n shots (float64); direction ``u = p / ||p||``;
* column ``w = s u`` (stored float32) with ``s`` the mean L2 norm of the existing columns
  (16.0 when the head has no classes);
* bias: with ``m >= 1`` background embeddings and a claim budget ``q`` in (0, 1), for each
  background ``x``: ``r(x) = max_c (f(x) . w_c + b_c) - f(x) . w`` (logits before the
  temperature; float64); with the margins sorted ascending ``r_0 <= r_1 <= ...`` and
  ``j = m - ceil((1 - q) m)``, ``b`` is the midpoint ``(r_{j-1} + r_j) / 2`` (``j = 0``:
  ``r_0 - gap(r_0)``), rounded down to float32: the new class (``f . w + b``) beats the best
  existing class on at most ``q m`` of the background, and the threshold sits in the middle of
  the gap, away from the float32 rounding of the logits.
  ``gap(x) = 1e-3 (1 + |x|)``.
  Without background, or when the head has no classes: ``b`` = mean of the existing biases
  (0 without classes).
* floor: when the head has classes, with ``t = max_c (p32 . w_c + b_c) - p32 . w`` (``p32`` =
  the prototype rounded to float32), ``b`` is raised, if it is not above ``t``, to the smallest
  float32 at or above ``t + gap(t)``: the new class always wins at the mean of its own
  examples, so a class learned from one photo recognises that photo.
"""

from __future__ import annotations

import math

import numpy as np
from edgeadapt.device.errors import IncompatibleModelError, InputError
from edgeadapt.device.head import Head
from edgeadapt.device.head_file import MAX_ABS_WEIGHT

#: Column scale used when the head has no classes yet.
EMPTY_HEAD_SCALE = 16.0


def _embeddings(head: Head, embeddings: np.ndarray, what: str) -> np.ndarray:
    array = head.check_embeddings(embeddings)
    if array.shape[0] == 0:
        raise InputError(f"no {what} given; pass at least one embedding")
    if not np.all(np.isfinite(array)):
        raise InputError(f"the {what} contain NaN or infinite values; check the backbone output")
    return array


def column_norms(weights: np.ndarray) -> np.ndarray:
    """The L2 norm of each column of ``weights`` (D, C), squares summed in float64 (C,).

    In blocks of columns, so that a large head is never copied to float64 whole.
    """
    norms = np.empty(weights.shape[1], dtype=np.float64)
    for start in range(0, weights.shape[1], 256):
        block = weights[:, start:start + 256].astype(np.float64)
        norms[start:start + 256] = np.sqrt(np.einsum("dc,dc->c", block, block))
    return norms


def mean_column_norm(head: Head) -> float:
    """Mean L2 norm of the head's columns in float64 (:data:`EMPTY_HEAD_SCALE` without classes)."""
    if head.num_classes == 0:
        return EMPTY_HEAD_SCALE
    return float(np.mean(column_norms(head.weights)))


def prototype_direction(head: Head, shots: np.ndarray, scale: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The new class's column: the unit mean feature of ``shots`` times ``scale``.

    Args:
        head: The head the class is added to.
        shots: (n, D) raw embeddings of the new class, n >= 1.
        scale: The column norm (default: :func:`mean_column_norm` of ``head``).

    Returns:
        ``(column, prototype)``: the (D,) float32 column and the float64 mean feature.

    Raises:
        InputError: No shots, wrong shapes, non-finite values, or a column beyond the format's range.
        IncompatibleModelError: The shots' mean feature is zero (no direction).
    """
    shots = _embeddings(head, shots, "shots")
    prototype = head.features(shots).astype(np.float64).mean(axis=0)
    norm = float(np.sqrt(np.dot(prototype, prototype)))
    if not norm > 0 or not math.isfinite(norm):
        raise IncompatibleModelError("the shots' mean feature is zero, so the new class has no direction; "
                                     "give other examples")
    column64 = (mean_column_norm(head) if scale is None else scale) * (prototype / norm)
    if not np.all(np.abs(column64) <= MAX_ABS_WEIGHT):
        raise InputError("the new column exceeds 2^64, the head file's weight limit: the head's columns are far too large")
    return column64.astype(np.float32), prototype


def prototype_column(
    head: Head, shots: np.ndarray, background: np.ndarray | None = None, claim_budget: float = 0.01
) -> tuple[np.ndarray, float]:
    """The column and bias of a new class from a few embeddings of it.

    Args:
        head: the head the class is added to (any normalisation; zero classes allowed).
        shots: (n, D) raw embeddings of the new class, n >= 1.
        background: optional (m, D) raw embeddings of other things the device sees; with them
            the bias is set so that the new class claims at most ``claim_budget`` of them.
        claim_budget: q in (0, 1), used only with background embeddings.

    Returns:
        ``(column, bias)``: the (D,) float32 column and the float bias (a float32 value).

    Raises:
        InputError: no shots, wrong shapes, non-finite values, or q outside (0, 1).
        IncompatibleModelError: the shots' mean feature is zero (no direction).
    """
    column, prototype = prototype_direction(head, shots)
    if background is not None and len(background) == 0:
        background = None  # m = 0, as in C
    if background is None or head.num_classes == 0:
        bias = float(np.mean(head.bias.astype(np.float64))) if head.num_classes else 0.0
        return column, raise_to_floor(head, column, prototype, float(np.float32(bias)))
    if not 0.0 < float(claim_budget) < 1.0:
        raise InputError(f"claim_budget must lie in (0, 1), got {claim_budget}")
    background = _embeddings(head, background, "background embeddings")
    others = head.features(background).astype(np.float64)
    existing = others @ head.weights.astype(np.float64) + head.bias.astype(np.float64)
    margins = np.sort(existing.max(axis=1) - others @ column.astype(np.float64))
    return column, raise_to_floor(head, column, prototype, float(_float32_at_most(claim_threshold(margins, claim_budget))))


def gap(value: float) -> float:
    """The safety distance of a threshold from a margin ``value``: ``1e-3 (1 + |value|)``."""
    return 1e-3 * (1.0 + abs(value))


def claim_threshold(sorted_margins: np.ndarray, claim_budget: float) -> float:
    """The bias at which a new class takes at most ``claim_budget`` of samples with these margins.

    Args:
        sorted_margins: ``max_c logit_c - f . w`` of each sample, ascending (at least one).
        claim_budget: q in (0, 1).

    Returns:
        The midpoint between the last claimed and the first unclaimed margin (or below the
        smallest margin by :func:`gap` when none may be claimed), in float64.
    """
    count = sorted_margins.shape[0]
    rank = min(max(math.ceil((1.0 - float(claim_budget)) * count), 1), count)  # the rank-th largest
    index = count - rank
    if index == 0:
        return float(sorted_margins[0]) - gap(float(sorted_margins[0]))
    return 0.5 * (float(sorted_margins[index - 1]) + float(sorted_margins[index]))


def raise_to_floor(head: Head, column: np.ndarray, prototype: np.ndarray, bias: float) -> float:
    """``bias``, raised to the smallest float32 at which ``column`` beats ``head`` at ``prototype``.

    Args:
        head: The head without the new class.
        column: The new column (D,), float32 values.
        prototype: The mean feature of the new class's examples (D,) (rounded to float32 here).
        bias: The bias found so far (a float32 value).

    Returns:
        ``bias`` or the floor, whichever is higher (``bias`` when the head has no classes).

    Raises:
        InputError: The floor does not fit float32.
    """
    if head.num_classes == 0:
        return bias
    point32 = np.asarray(prototype, dtype=np.float32)
    point = point32.astype(np.float64)
    # the best logit in float64 (as the C library computes it), over the columns that float32 puts near the top
    rough = point32 @ head.weights + head.bias
    near = np.flatnonzero(rough >= rough.max() - 1e-3 * (1.0 + abs(float(rough.max()))))
    if rough.shape[0] > 16:
        near = np.union1d(near, np.argpartition(rough, -16)[-16:])
    else:
        near = np.arange(rough.shape[0])
    best = float(np.max(point @ head.weights[:, near].astype(np.float64) + head.bias[near].astype(np.float64)))
    floor = best - float(point @ np.asarray(column, dtype=np.float32).astype(np.float64))
    if not abs(floor) <= float(np.finfo(np.float32).max):
        raise InputError("the new class's bias does not fit float32: its examples are far outside the head's range")
    if bias > floor:
        return bias
    target = floor + gap(floor)
    rounded = np.float32(target)
    if float(rounded) < target:
        rounded = np.nextafter(rounded, np.float32(np.inf))
    return float(rounded)


def _float32_at_most(value: float) -> np.float32:
    """The largest float32 not above ``value`` (so the example whose margin is the bias is not claimed)."""
    if not abs(value) <= float(np.finfo(np.float32).max):
        raise InputError("the new class's bias does not fit float32: the background is far outside the head's range")
    rounded = np.float32(value)
    if float(rounded) > value:
        rounded = np.nextafter(rounded, np.float32(-np.inf))
    return rounded


def append_column(head: Head, column: np.ndarray, bias: float) -> Head:
    """``head`` with ``column``/``bias`` appended as its last class (old columns unchanged)."""
    weights = np.concatenate([head.weights, np.asarray(column, dtype=np.float32).reshape(-1, 1)], axis=1)
    return head.with_columns(weights, np.append(head.bias, np.float32(bias)))
