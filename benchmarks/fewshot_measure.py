"""The fair few-shot measure and the reference baselines (numpy only, no TensorFlow).

Every benchmark that reports few-shot quality (``edgeadapt bench fewshot``, ``edgeadapt bench
incremental``, ``benchmarks/bench_device_update.py``) scores an update with :func:`fair_scores`:

- **old-class accuracy**: the mean over the old classes of each class's accuracy on its
  held-out photos, predictions being the argmax over ALL classes of the updated head;
- **new-class recall**: the mean over the new classes of each class's recall;
- **harmonic mean** of the two, so refusing to learn (recall 0) scores 0, and forgetting
  the old classes is punished just as hard.

Each is compared with the joint retrain (the head trained on all images of all classes) on
the same backbone and data, and the old-class drop is taken against the head before the
update. The retired "all-class accuracy" rewarded not learning: old-class photos dominate a
test set, so a head that never predicts the new class already scored 0.8 of the joint.

The reference baselines build ordinary :class:`~edgeadapt.device.head.Head` objects, so they
are scored exactly like the SDK's methods:

- :func:`simpleshot_head`: SimpleShot (Wang et al. 2019): features centred by the base mean
  and L2-normalised, nearest class mean over old and new classes;
- :func:`shrinkage_discriminant_head`: a linear discriminant over old and new classes with
  the shared within-class covariance of the base statistics shrunk towards a scaled identity
  (Ledoit-Wolf-style intensity from the statistics), and the full small-sample correction of each class's bias;
- :func:`background_imprint_head`: an imprinted column whose bias lets it claim about 1% of
  the calibration photos (a background of ordinary photos, or the old classes' references).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from edgeadapt.device.errors import IncompatibleModelError, InputError
from edgeadapt.device.head import ClassStats, Head

#: Keys of one fair score (see :func:`fair_scores`).
SCORE_KEYS = ("old_accuracy", "new_recall", "harmonic_mean")


def harmonic_mean(old_accuracy: float, new_recall: float) -> float:
    """``2 a r / (a + r)``, 0 when both are 0."""
    total = old_accuracy + new_recall
    return 0.0 if total <= 0 else float(2.0 * old_accuracy * new_recall / total)


def per_class_accuracy(predictions: np.ndarray, labels: np.ndarray, classes: Sequence[int]) -> float:
    """Mean over ``classes`` of the share of each class's samples predicted as that class.

    Raises:
        InputError: when one of ``classes`` has no sample in ``labels`` (nothing to measure).
    """
    predictions = np.asarray(predictions).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    values = []
    for label in classes:
        members = labels == label
        if not np.any(members):
            raise InputError(f"class {label} has no test sample; every measured class needs held-out photos")
        values.append(float(np.mean(predictions[members] == label)))
    return float(np.mean(values)) if values else 0.0


def fair_scores(predictions: np.ndarray, labels: np.ndarray, old_classes: Sequence[int],
                new_classes: Sequence[int]) -> dict[str, float]:
    """Old-class accuracy, new-class recall and their harmonic mean.

    Args:
        predictions: predicted class index per test sample (argmax over ALL classes of the head).
        labels: true class index per test sample.
        old_classes: class indices that were in the head before the update.
        new_classes: class indices added by the update.

    Returns:
        ``{"old_accuracy", "new_recall", "harmonic_mean"}`` (floats in [0, 1]).

    Raises:
        InputError: when a class has no test sample or the arrays do not match.
    """
    predictions = np.asarray(predictions).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    if predictions.shape != labels.shape:
        raise InputError(f"{predictions.size} predictions for {labels.size} labels; they must match one to one")
    old = per_class_accuracy(predictions, labels, old_classes)
    new = per_class_accuracy(predictions, labels, new_classes)
    return {"old_accuracy": old, "new_recall": new, "harmonic_mean": harmonic_mean(old, new)}


def head_scores(head: Head, embeddings: np.ndarray, labels: np.ndarray, old_classes: Sequence[int],
                new_classes: Sequence[int]) -> dict[str, float]:
    """:func:`fair_scores` of ``head`` on raw ``embeddings`` (argmax over all of the head's columns)."""
    return fair_scores(head.logits(embeddings).argmax(axis=1), labels, old_classes, new_classes)


def against_joint(scores: dict[str, float], joint: dict[str, float], base_old_accuracy: float) -> dict[str, float]:
    """``scores`` plus ``ratio_to_joint`` (harmonic mean / the joint's) and ``old_drop``.

    ``old_drop`` is the base head's old-class accuracy minus the updated head's: positive
    when the update costs old-class accuracy.
    """
    ratio = scores["harmonic_mean"] / joint["harmonic_mean"] if joint["harmonic_mean"] > 0 else 0.0
    return {**scores, "ratio_to_joint": float(ratio), "old_drop": float(base_old_accuracy - scores["old_accuracy"])}


# ============================================================================= baselines
def _check_shots(shots: Sequence[np.ndarray], dimension: int) -> list[np.ndarray]:
    arrays = [np.asarray(array, dtype=np.float64) for array in shots]
    for number, array in enumerate(arrays):
        if array.ndim != 2 or array.shape[1] != dimension or array.shape[0] == 0:
            raise InputError(f"new class {number}: shots must be a non-empty (n, {dimension}) array, got {array.shape}")
        if not np.all(np.isfinite(array)):
            raise InputError(f"new class {number}: shots contain NaN or infinite values")
    return arrays


def _require_stats(stats: ClassStats | None, what: str, gram: bool) -> ClassStats:
    if stats is None:
        raise IncompatibleModelError(f"{what} needs the base classes' statistics, and this head has none")
    if gram and stats.gram is None:
        raise IncompatibleModelError(f"{what} needs the shared Gram matrix in the base statistics, which has none")
    if np.any(stats.counts <= 0):
        raise IncompatibleModelError(f"{what} needs examples of every base class; the statistics hold a class with none")
    return stats


def simpleshot_head(base_embeddings: np.ndarray, base_labels: np.ndarray, base_classes: int,
                    shots: Sequence[np.ndarray]) -> Head:
    """SimpleShot: centred (base mean), L2-normalised nearest class mean over old and new classes.

    With unit features ``f``, the nearest mean ``mu_c`` (of the normalised features) is the
    argmax of ``f . mu_c - |mu_c|^2 / 2``: a linear head on centred, L2-normalised features.

    Args:
        base_embeddings: raw training embeddings of the base classes (N, D).
        base_labels: their class indices 0..base_classes-1.
        base_classes: number of base classes.
        shots: one (k, D) array of raw embeddings per new class.

    Returns:
        A head with ``base_classes + len(shots)`` columns.

    Raises:
        InputError: on empty or malformed inputs.
    """
    embeddings = np.asarray(base_embeddings, dtype=np.float64)
    labels = np.asarray(base_labels, dtype=np.int64)
    if embeddings.ndim != 2 or labels.shape != (embeddings.shape[0],) or embeddings.shape[0] == 0:
        raise InputError(f"base embeddings {embeddings.shape} and labels {labels.shape} do not match")
    arrays = _check_shots(shots, embeddings.shape[1])
    mean = embeddings.mean(axis=0)

    def unit(values: np.ndarray) -> np.ndarray:
        centred = values - mean
        return centred / np.maximum(np.linalg.norm(centred, axis=1, keepdims=True), 1e-12)

    features = unit(embeddings)
    means = []
    for label in range(base_classes):
        members = features[labels == label]
        if members.shape[0] == 0:
            raise InputError(f"base class {label} has no training embedding")
        means.append(members.mean(axis=0))
    means.extend(unit(array).mean(axis=0) for array in arrays)
    centroids = np.stack(means, axis=1)
    bias = -0.5 * np.sum(centroids * centroids, axis=0)
    return Head(weights=centroids.astype(np.float32), bias=bias.astype(np.float32),
                feature_mean=mean.astype(np.float32), l2_normalize=True)


def shrinkage_discriminant_head(stats: ClassStats | None, shots: Sequence[np.ndarray],
                                shrinkage: float | None = None) -> Head:
    """Shrinkage linear discriminant over old and new classes with the full small-sample correction.

    ``S = (1 - a) Sw + a tr(Sw)/D I`` with ``Sw`` the shared within-class covariance of the
    base statistics; ``w_c = S^-1 m_c`` and ``b_c = -1/2 (m_c S^-1 m_c - d / n_c)`` with
    ``d = tr(S^-1 Sw)``: ``d / n_c`` is the expected inflation of ``m S^-1 m`` by a mean
    estimated from ``n_c`` examples. Classes are weighted equally (no prior term).

    Args:
        stats: the base classes' statistics with a Gram matrix.
        shots: one (k, D) array of raw embeddings per new class.
        shrinkage: the intensity ``a`` in [0, 1]; None estimates it from the statistics alone
            (the per-sample fourth moments Ledoit-Wolf uses are not stored) with the
            Rao-Blackwellised Ledoit-Wolf formula (Chen et al. 2010), ``n`` degrees of freedom:
            ``a = ((n-2)/n tr(Sw^2) + tr(Sw)^2) / ((n+2) (tr(Sw^2) - tr(Sw)^2 / D))``.

    Returns:
        A head on raw features centred by the base mean (old classes first, then new ones).

    Raises:
        IncompatibleModelError: without statistics or Gram matrix.
        InputError: on malformed shots or shrinkage.
    """
    stats = _require_stats(stats, "the shrinkage discriminant", gram=True)
    arrays = _check_shots(shots, stats.embedding_size)
    dimension = stats.embedding_size
    counts = stats.counts.astype(np.float64)
    means = stats.means()
    total = float(counts.sum())
    degrees = total - stats.num_classes
    if degrees <= 0:
        raise IncompatibleModelError("the shrinkage discriminant needs more base examples than base classes")
    scatter = stats.gram - (means.T * counts) @ means
    within = (scatter + scatter.T) / (2.0 * degrees)
    trace = float(np.trace(within))
    if shrinkage is None:
        trace_square = float(np.sum(within * within))
        spread = trace_square - trace ** 2 / dimension
        numerator = (degrees - 2.0) / degrees * trace_square + trace ** 2
        shrinkage = 1.0 if spread <= 0 else float(np.clip(numerator / ((degrees + 2.0) * spread), 0.0, 1.0))
    if not 0.0 <= shrinkage <= 1.0:
        raise InputError(f"shrinkage must be in [0, 1], got {shrinkage}")
    covariance = (1.0 - shrinkage) * within + shrinkage * trace / dimension * np.eye(dimension)
    centre = stats.overall_mean()
    all_means = np.concatenate([means, np.stack([array.mean(axis=0) for array in arrays])]) - centre
    all_counts = np.concatenate([counts, [float(array.shape[0]) for array in arrays]])
    try:
        inverse = np.linalg.inv(covariance)
    except np.linalg.LinAlgError as error:
        raise IncompatibleModelError(f"the shrunk covariance is singular ({error}); give more shrinkage") from error
    weights = inverse @ all_means.T
    effective = float(np.trace(inverse @ within))
    bias = -0.5 * (np.sum(all_means.T * weights, axis=0) - effective / all_counts)
    return Head(weights=weights.astype(np.float32), bias=bias.astype(np.float32), feature_mean=centre.astype(np.float32))


def background_imprint_head(head: Head, shots: Sequence[np.ndarray], calibration: np.ndarray | None,
                            claim: float = 0.01) -> Head:
    """Imprinting calibrated on a background: each new column claims about ``claim`` of the calibration photos.

    The column is the unit mean of the new class's features (the head's own normalisation),
    scaled to the old columns' mean norm; its bias is set so that its logit beats the best
    old logit on a share ``claim`` of the calibration embeddings (ordinary photos, or the
    old classes' references). Each new class is calibrated against the old columns only, so
    the result does not depend on the order of the new classes.

    Args:
        head: the head before the update (its columns stay as they are).
        shots: one (k, D) array of raw embeddings per new class.
        calibration: raw embeddings (N, D) of background photos / references.
        claim: the share in [0, 1) of the calibration photos a new class may take.

    Returns:
        The head with one appended column per new class.

    Raises:
        IncompatibleModelError: without calibration embeddings.
        InputError: on malformed shots or ``claim``.
    """
    if calibration is None or len(calibration) == 0:
        raise IncompatibleModelError("background-calibrated imprinting needs calibration embeddings (background "
                                     "photos or references), and this setup has none")
    if not 0.0 <= claim < 1.0:
        raise InputError(f"claim must be in [0, 1), got {claim}")
    arrays = _check_shots(shots, head.embedding_size)
    background = head.features(np.asarray(calibration, dtype=np.float32)).astype(np.float64)
    best_old = head.logits(calibration).astype(np.float64).max(axis=1) * head.temperature
    scale = float(np.mean(np.linalg.norm(head.weights.astype(np.float64), axis=0)))
    columns, biases = [], []
    for array in arrays:
        mean = head.features(array.astype(np.float32)).astype(np.float64).mean(axis=0)
        column = mean / max(float(np.linalg.norm(mean)), 1e-12) * scale
        margins = best_old - background @ column
        columns.append(column)
        biases.append(float(np.quantile(margins, claim)))  # wins where margin < bias: on a share ``claim``
    weights = np.concatenate([head.weights, np.stack(columns, axis=1).astype(np.float32)], axis=1)
    bias = np.concatenate([head.bias, np.array(biases, dtype=np.float32)])
    return head.with_columns(weights, bias)
