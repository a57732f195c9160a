"""Input checks of the head math: options, statistics, embeddings, class indices (numpy only).

Shared by :mod:`edgeadapt.device.incremental` (adding and strengthening classes) and
:mod:`edgeadapt.device.merging` (merging and re-solving heads); every check raises an
:class:`~edgeadapt.device.errors.EdgeAdaptError` that says what to do.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from edgeadapt.device.add_options import DEFAULT_METHOD, STATISTICS_METHODS, AddClassOptions
from edgeadapt.device.errors import IncompatibleModelError, InputError
from edgeadapt.device.head import ClassStats, Head


def check_options(options: AddClassOptions) -> AddClassOptions:
    if not isinstance(options, AddClassOptions):
        raise InputError(f"options must be an AddClassOptions, got {type(options).__name__}")
    return options


def check_stats(head: Head, stats: ClassStats | None, what: str = "class statistics") -> None:
    if stats is None:
        return
    if stats.num_classes != head.num_classes or stats.embedding_size != head.embedding_size:
        raise IncompatibleModelError(
            f"{what} cover {stats.num_classes} classes x {stats.embedding_size} dimensions but the head has "
            f"{head.num_classes} classes x {head.embedding_size} dimensions; they do not belong to this head"
        )


def check_embeddings(head: Head, embeddings, what: str) -> np.ndarray:
    """One class's raw embeddings as float64 (n >= 1, D), or :class:`InputError`."""
    try:
        array = np.asarray(embeddings)
    except (TypeError, ValueError) as error:
        raise InputError(f"{what}: embeddings must be a numeric (n, {head.embedding_size}) array ({error})") from error
    if array.ndim == 1 and array.size == head.embedding_size:
        array = array[None]
    if array.ndim != 2 or array.shape[1] != head.embedding_size:
        raise InputError(
            f"{what}: embeddings have shape {array.shape}, but this head takes {head.embedding_size}-d embeddings "
            f"(an (n, {head.embedding_size}) array); were they computed with another backbone?"
        )
    if array.shape[0] == 0:
        raise InputError(f"{what}: no examples; give at least one embedding (image) per class")
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise InputError(f"{what}: embeddings must be real numbers, got dtype {array.dtype}")
    array = array.astype(np.float64)
    if not np.all(np.isfinite(array)):
        raise InputError(f"{what}: embeddings contain NaN or infinite values; check the backbone output and the images")
    return array


def check_calibration(head: Head, calibration) -> np.ndarray:
    """Calibration embeddings (N, D) as given (float32 or float64, no copy), or :class:`InputError`."""
    array = np.asarray(calibration)
    if array.ndim != 2 or array.shape[1] != head.embedding_size:
        raise InputError(f"calibration embeddings have shape {array.shape}, but this head takes "
                         f"{head.embedding_size}-d embeddings (an (N, {head.embedding_size}) array)")
    if array.dtype not in (np.float32, np.float64):
        array = check_embeddings(head, array, "calibration embeddings")
    if not np.isfinite(array).all():
        raise InputError("calibration embeddings contain NaN or infinite values; check the backbone output and "
                         "the stored background or reference embeddings")
    return array


def check_class_list(head: Head, new_embeddings: Sequence[np.ndarray]) -> list[np.ndarray]:
    if isinstance(new_embeddings, np.ndarray):
        raise InputError(
            "new_embeddings must be a list with one (n_i, D) array per new class, not a single array; "
            "wrap one class's embeddings as [embeddings]"
        )
    try:
        arrays = list(new_embeddings)
    except TypeError as error:
        raise InputError("new_embeddings must be a list with one (n_i, D) array per new class") from error
    if not arrays:
        raise InputError("no new classes given; pass one (n_i, D) embedding array per new class")
    return [check_embeddings(head, array, f"new class {number}") for number, array in enumerate(arrays)]


def check_index(head: Head, class_index: int) -> int:
    if isinstance(class_index, (bool, np.bool_)) or not isinstance(class_index, (int, np.integer)):
        raise InputError(f"class_index must be an integer, got {class_index!r}")
    index = int(class_index)
    if not 0 <= index < head.num_classes:
        raise InputError(f"class_index {index} is out of range: the head has classes 0..{head.num_classes - 1}")
    return index


def require_statistics(stats: ClassStats | None, method: str, action: str) -> ClassStats:
    """``stats`` if ``method`` can ``action`` with them, else :class:`IncompatibleModelError` saying what to do."""
    if stats is None:
        raise IncompatibleModelError(
            f"method {method!r} needs the class statistics of the existing classes to {action}, and this head "
            "has none. Re-export the base bundle with class statistics (export_bundle(..., class_stats=...), as "
            "`edgeadapt demo` does), or on the host pass examples of the old classes (replay) so that they can be "
            f"computed, or leave the method out (the default, {DEFAULT_METHOD!r}, needs no statistics) or choose "
            "another method that needs none (e.g. --method weight_align; also center_l2, imprint)"
        )
    if method in STATISTICS_METHODS and stats.gram is None:
        raise IncompatibleModelError(
            f"method {method!r} needs the shared Gram matrix in the class statistics to {action}, and these "
            "statistics have none. Recompute them with ClassStats.from_embeddings(..., with_gram=True) from "
            "examples of the old classes, or choose imprint_calibrated / center_l2 / weight_align / imprint"
        )
    return stats


def require_cosine_head(head: Head, method: str) -> None:
    if head.feature_mean is None or not head.l2_normalize:
        raise IncompatibleModelError(
            f"method {method!r} needs a head trained on centred, L2-normalised features (feature_mean set and "
            "l2_normalize true; train it with HeadTrainingOptions(normalization='center_l2')); this head "
            f"{'has no feature mean' if head.feature_mean is None else 'does not L2-normalise'}. Use method "
            "'ridge' or 'weight_align' for this head"
        )
