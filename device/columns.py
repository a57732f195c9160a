"""Column helpers of the head math: norms, weight aligning, appending and replacing columns.

Shared by :mod:`edgeadapt.device.incremental` and :mod:`edgeadapt.device.merging` (numpy only).
"""

from __future__ import annotations

import numpy as np

from edgeadapt.device.errors import IncompatibleModelError
from edgeadapt.device.head import Head


def mean_norm(weights: np.ndarray) -> float:
    if weights.shape[1] == 0:  # a zero-class (headless) head: unit-norm columns
        return 1.0
    return float(np.mean(np.linalg.norm(weights.astype(np.float64), axis=0)))


def align_weights(
    new_weights: np.ndarray, new_bias: np.ndarray, old_weights: np.ndarray, old_bias: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Weight aligning: rescale new columns to the old columns' mean norm, recentre biases on the old mean."""
    new_norm = mean_norm(new_weights)
    factor = mean_norm(old_weights) / new_norm if new_norm > 0 else 1.0
    bias = factor * (new_bias - new_bias.mean()) + float(np.mean(old_bias))
    return new_weights * factor, bias


def unit_columns(vectors: np.ndarray) -> np.ndarray:
    """Columns of ``vectors`` (D, k) scaled to unit norm (zero columns stay zero)."""
    norms = np.linalg.norm(vectors, axis=0)
    return vectors / np.where(norms > 0, norms, 1.0)


def appended(head: Head, new_weights: np.ndarray, new_bias: np.ndarray) -> Head:
    new_weights = np.asarray(new_weights, dtype=np.float64)
    new_bias = np.asarray(new_bias, dtype=np.float64).reshape(-1)
    if not (np.all(np.isfinite(new_weights)) and np.all(np.isfinite(new_bias))):
        raise IncompatibleModelError(
            "the new columns came out non-finite; the class statistics are probably degenerate "
            "(recompute them from examples) or the examples are extreme"
        )
    weights = np.concatenate([head.weights, new_weights.astype(np.float32)], axis=1)
    bias = np.concatenate([head.bias, new_bias.astype(np.float32)])
    return head.with_columns(weights, bias)


def replaced_column(head: Head, index: int, column: np.ndarray, bias_value: float) -> Head:
    column = np.asarray(column, dtype=np.float64).reshape(-1)
    if not (np.all(np.isfinite(column)) and np.isfinite(bias_value)):
        raise IncompatibleModelError("the recomputed column came out non-finite; the class statistics are degenerate")
    weights = head.weights.copy()
    bias = head.bias.copy()
    weights[:, index] = column.astype(np.float32)
    bias[index] = np.float32(bias_value)
    return head.with_columns(weights, bias)
