"""The one trainer of linear softmax heads (numpy only): Adam on softmax cross-entropy.

Both trainers of the SDK call :func:`fit_softmax_head` with their own settings:

* the device's :func:`edgeadapt.device.incremental.train_columns` (the ``weight_align`` and
  ``none`` class-addition methods): a few new columns trained with every other column frozen,
  full-batch and class-balanced, in float64, without randomness, so that a device update is
  reproducible;
* the host's :func:`edgeadapt.training.head_training.train_head`: every column of a new head
  on a whole dataset, shuffled mini-batches, float32, early stopping on a validation loss.

:class:`HeadFitSettings` holds everything that differs between the two. Adam follows
Kingma & Ba with the bias corrections folded into the step size
(``w -= lr * sqrt(1 - beta2^t) / (1 - beta1^t) * m / (sqrt(v) + epsilon)``, as Keras does;
``epsilon_corrected`` puts epsilon where the paper's Algorithm 1 has it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from edgeadapt.device.errors import InputError
from edgeadapt.device.head import softmax

logger = logging.getLogger(__name__)

#: The float types a head can be trained in.
DTYPES = ("float32", "float64")
#: Adam's moment decay rates (the usual defaults).
BETA1, BETA2 = 0.9, 0.999

#: ``on_epoch(epoch, validation_loss)``: called after every epoch (1-based), with None without validation data.
EpochCallback = Callable[[int, "float | None"], None]


def _require_count(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"{name} must be a whole number of at least 1, got {value!r}")


def _require_positive(name: str, value) -> None:
    if not (isinstance(value, (int, float, np.integer, np.floating)) and np.isfinite(value) and value > 0):
        raise InputError(f"{name} must be a finite positive number, got {value!r}")


def _column_tuple(columns: Sequence[int] | np.ndarray) -> tuple[int, ...]:
    array = np.asarray(columns)
    if array.ndim != 1 or array.size == 0 or not np.issubdtype(array.dtype, np.integer):
        raise InputError(
            f"columns must be a non-empty 1-d sequence of column indices (or None for all), got {columns!r}"
        )
    if array.min() < 0:
        raise InputError(f"columns must be non-negative column indices, got {array.min()}")
    if np.unique(array).size != array.size:
        raise InputError("columns lists a column more than once; give each trained column once")
    return tuple(int(column) for column in array)


@dataclass(frozen=True)
class HeadFitSettings:
    """How :func:`fit_softmax_head` trains ``logits = (features @ W + b) / temperature``.

    Attributes:
        epochs: Passes over the training data. Without ``batch_size`` an epoch is one
            full-batch Adam step, so this is the number of steps.
        batch_size: Examples per Adam step, drawn in an order shuffled afresh every epoch
            (seeded with ``seed``). None trains on the whole set at every step (no randomness).
        learning_rate: Adam's step size.
        decay: L2 weight decay: ``decay * W`` is added to the gradient of the trained weight
            columns (not the bias). ``2 * wd`` is the gradient of the penalty ``wd * |W|^2``.
        temperature: The logits are divided by it.
        class_balanced: Weight every example by the inverse of its class's count (within each
            batch the weights are normalised to sum to one), so every class counts equally
            however many examples it has. Otherwise every example weighs the same.
        columns: The indices of the columns (and bias entries) to train; the others stay
            bit-identical (copied, converted to ``dtype``). None trains every column.
        epsilon: Adam's epsilon, added to ``sqrt(v)``.
        epsilon_corrected: Add ``epsilon`` to the bias-corrected ``sqrt(v / (1 - beta2^t))``
            instead (Kingma & Ba's Algorithm 1; otherwise as Keras). The two differ only for
            gradients about as small as ``epsilon``, in the first few hundred steps.
        dtype: "float32" or "float64": the type the features, weights and Adam state are held in.
        seed: Seeds the shuffling of the mini-batches (unused without ``batch_size``).
        patience: With validation data, stop when the validation loss has not improved by
            ``min_improvement`` for this many epochs. None never stops early.
        restore_best: With validation data, return the weights of the epoch with the lowest
            validation loss instead of the last epoch's.
        min_improvement: How much lower a validation loss must be to count as an improvement.

    Raises:
        InputError: A setting is out of range (the message names it).
    """

    epochs: int = 100
    batch_size: int | None = None
    learning_rate: float = 1e-3
    decay: float = 0.0
    temperature: float = 1.0
    class_balanced: bool = False
    columns: tuple[int, ...] | None = None
    epsilon: float = 1e-8
    epsilon_corrected: bool = False
    dtype: str = "float64"
    seed: int = 0
    patience: int | None = None
    restore_best: bool = True
    min_improvement: float = 1e-6

    def __post_init__(self) -> None:
        _require_count("epochs", self.epochs)
        if self.batch_size is not None:
            _require_count("batch_size", self.batch_size)
        if self.patience is not None:
            _require_count("patience", self.patience)
        _require_positive("learning_rate", self.learning_rate)
        _require_positive("temperature", self.temperature)
        _require_positive("epsilon", self.epsilon)
        for name in ("decay", "min_improvement"):
            value = getattr(self, name)
            if not (np.isfinite(value) and value >= 0):
                raise InputError(f"{name} must be a finite non-negative number, got {value!r}")
        if self.dtype not in DTYPES:
            raise InputError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.columns is not None:
            object.__setattr__(self, "columns", _column_tuple(self.columns))


def fit_softmax_head(
    features: np.ndarray,
    labels: np.ndarray,
    weights: np.ndarray,
    bias: np.ndarray,
    settings: HeadFitSettings = HeadFitSettings(),
    validation: tuple[np.ndarray, np.ndarray] | None = None,
    on_epoch: EpochCallback | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Train a linear softmax head from ``weights``, ``bias`` with Adam on cross-entropy.

    The features are used as given (apply the head's normalisation first).

    Args:
        features: Training features (N, D), N >= 1, finite.
        labels: Their class indices (N,), integers in 0..C-1.
        weights: Starting weights (D, C); not modified.
        bias: Starting bias (C,); not modified.
        settings: What to train and how (:class:`HeadFitSettings`).
        validation: Optional (features (M, D), labels (M,)): the mean cross-entropy on them is
            measured after every epoch for ``settings.patience`` and ``settings.restore_best``.
        on_epoch: Optional ``on_epoch(epoch, validation_loss)``, called after every epoch
            (1-based; the loss is None without validation data), e.g. to log progress.

    Returns:
        New arrays (weights (D, C), bias (C,)) of ``settings.dtype``.

    Raises:
        InputError: The arrays do not fit together (shapes, label range, non-finite values)
            or ``settings.columns`` names a column the head does not have.
    """
    dtype = np.dtype(settings.dtype)
    features, labels, weights, bias, columns, validation = _checked_inputs(
        features, labels, weights, bias, settings, validation, dtype)
    count = weights.shape[1]
    trained_w = weights if columns is None else weights[:, columns]
    state = _Adam(settings, (trained_w.shape, (trained_w.shape[1],)))
    balance = None
    if settings.class_balanced:
        balance = 1.0 / np.bincount(labels, minlength=count).astype(np.float64)[labels]
    temperature = dtype.type(settings.temperature)
    rng = np.random.default_rng(settings.seed) if settings.batch_size is not None else None
    best = (np.inf, weights.copy(), bias.copy())
    stale = 0
    for epoch in range(1, settings.epochs + 1):
        for batch in _batches(labels.size, settings.batch_size, rng):
            _adam_step(state, features, labels, balance, batch, weights, bias, columns, temperature, settings.decay)
        loss = None
        if validation is not None:
            loss = cross_entropy(weights, bias, *validation, temperature=settings.temperature)
        if on_epoch is not None:
            on_epoch(epoch, loss)
        if loss is None:
            continue
        if loss < best[0] - settings.min_improvement:
            best = (loss, weights.copy(), bias.copy())
            stale = 0
        else:
            stale += 1
            if settings.patience is not None and stale >= settings.patience:
                logger.info("head training stopped early at epoch %d (best validation loss %.4f)", epoch, best[0])
                break
    if validation is not None and settings.restore_best and np.isfinite(best[0]):
        weights, bias = best[1], best[2]
    return weights, bias


def _checked_inputs(features, labels, weights, bias, settings: HeadFitSettings, validation, dtype: np.dtype):
    """The arrays of :func:`fit_softmax_head` checked and converted to ``dtype`` (weights and bias copied)."""
    features, labels = _checked_examples(features, labels, dtype, "training")
    weights = np.array(weights, dtype=dtype)
    bias = np.array(bias, dtype=dtype)
    count = _check_head(weights, bias, features.shape[1])
    _check_labels(labels, count, "training")
    columns = None if settings.columns is None else np.array(settings.columns, dtype=np.int64)
    if columns is not None and columns.max() >= count:
        raise InputError(f"columns must lie in 0..{count - 1} (the head has {count} columns), got {columns.max()}")
    if validation is not None:
        validation = _checked_examples(validation[0], validation[1], dtype, "validation")
        if validation[0].shape[1] != features.shape[1]:
            raise InputError(
                f"validation features have {validation[0].shape[1]} dimensions, the training features "
                f"{features.shape[1]}; give both in the same feature space"
            )
        _check_labels(validation[1], count, "validation")
    return features, labels, weights, bias, columns, validation


def _adam_step(state: "_Adam", features, labels, balance, batch, weights, bias, columns, temperature, decay) -> None:
    """One Adam step on the rows ``batch`` (None: all), updating ``weights`` and ``bias`` in place."""
    batch_features = features if batch is None else features[batch]
    batch_labels = labels if batch is None else labels[batch]
    batch_balance = balance if balance is None or batch is None else balance[batch]
    gradients = _gradients(batch_features, batch_labels, batch_balance, weights, bias, columns, temperature, decay)
    steps = state.steps(gradients)
    if columns is None:
        weights -= steps[0]
        bias -= steps[1]
    else:
        weights[:, columns] -= steps[0]
        bias[columns] -= steps[1]


def cross_entropy(
    head_weights: np.ndarray,
    head_bias: np.ndarray,
    embeddings: np.ndarray,
    labels: np.ndarray,
    temperature: float = 1.0,
) -> float:
    """Mean softmax cross-entropy of a linear head.

    Args:
        head_weights: Weights (D, C).
        head_bias: Bias (C,).
        embeddings: Features (N, D), already normalised as the head expects.
        labels: Class indices (N,).
        temperature: The logits are divided by it.

    Returns:
        The mean of ``-log p(label)`` (probabilities floored at 1e-12), as a Python float.
    """
    logits = embeddings @ head_weights + head_bias
    probabilities = softmax(logits / logits.dtype.type(temperature))
    return float(-np.mean(np.log(probabilities[np.arange(len(labels)), labels] + 1e-12)))


# ----------------------------------------------------------------------------- the steps
class _Adam:
    """Adam's moments for the trained (weights, bias) pair; :meth:`steps` turns gradients into updates."""

    def __init__(self, settings: HeadFitSettings, shapes: tuple[tuple[int, ...], tuple[int, ...]]) -> None:
        dtype = np.dtype(settings.dtype)
        self.moments = [np.zeros(shape, dtype) for shape in shapes]
        self.squares = [np.zeros(shape, dtype) for shape in shapes]
        self.learning_rate = settings.learning_rate
        self.epsilon = settings.epsilon
        self.epsilon_corrected = settings.epsilon_corrected
        self.step = 0

    def steps(self, gradients: tuple[np.ndarray, np.ndarray]) -> list[np.ndarray]:
        """The amounts to subtract from the trained weights and bias for ``gradients``."""
        self.step += 1
        correction = np.sqrt(1 - BETA2**self.step) / (1 - BETA1**self.step)
        # lr * m_hat / (sqrt(v_hat) + eps) == lr * correction * m / (sqrt(v) + eps * sqrt(1 - beta2^t))
        epsilon = self.epsilon * np.sqrt(1 - BETA2**self.step) if self.epsilon_corrected else self.epsilon
        steps = []
        for gradient, moment, square in zip(gradients, self.moments, self.squares):
            moment *= BETA1
            moment += (1 - BETA1) * gradient
            square *= BETA2
            square += (1 - BETA2) * gradient * gradient
            steps.append(self.learning_rate * correction * moment / (np.sqrt(square) + epsilon))
        return steps


def _gradients(
    features: np.ndarray,
    labels: np.ndarray,
    balance: np.ndarray | None,
    weights: np.ndarray,
    bias: np.ndarray,
    columns: np.ndarray | None,
    temperature,
    decay: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Gradients of the (weighted) mean cross-entropy plus decay for the trained columns of one batch."""
    logits = features @ weights + bias
    error = softmax(logits if temperature == 1 else logits / temperature)
    error[np.arange(labels.size), labels] -= 1.0
    if columns is not None:
        error = error[:, columns]
    if balance is None:
        error /= labels.size * temperature
    else:
        error *= (balance / balance.sum())[:, None] / temperature
    gradient_w = features.T @ error
    if decay:
        gradient_w += decay * (weights if columns is None else weights[:, columns])
    return gradient_w, error.sum(axis=0)


def _batches(count: int, batch_size: int | None, rng: np.random.Generator | None):
    """The index arrays of one epoch's batches; a single None for the full batch."""
    if batch_size is None:
        yield None
        return
    order = rng.permutation(count)
    for start in range(0, count, batch_size):
        yield order[start : start + batch_size]


# ----------------------------------------------------------------------------- checks
def check_examples(features, labels, count: int, what: str, dtype: str = "float32") -> tuple[np.ndarray, np.ndarray]:
    """Features (N >= 1, D), finite, as ``dtype`` and integer labels in 0..count-1, as int64.

    Args:
        features: The examples' features or embeddings.
        labels: Their class indices.
        count: The number of classes (columns) the labels may name.
        what: What they are, for the messages ("training", "validation").
        dtype: The float type to return the features in.

    Returns:
        (features, labels), converted.

    Raises:
        InputError: The shapes do not match, there are no examples, a value is not finite or a
            label is out of range.
    """
    features, labels = _checked_examples(features, labels, np.dtype(dtype), what)
    _check_labels(labels, count, what)
    return features, labels


def _checked_examples(features, labels, dtype: np.dtype, what: str) -> tuple[np.ndarray, np.ndarray]:
    features = np.asarray(features, dtype=dtype)
    labels = np.asarray(labels)
    if features.ndim != 2 or labels.shape != (features.shape[0],):
        raise InputError(
            f"{what} features {features.shape} and labels {labels.shape} do not match; "
            "give features (N, D) and one label per row"
        )
    if features.shape[0] == 0:
        raise InputError(f"no {what} features; give at least one example")
    if not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"{what} labels must be integer class indices, got {labels.dtype}")
    if not np.all(np.isfinite(features)):
        raise InputError(f"{what} features contain NaN or infinite values")
    return features, labels.astype(np.int64, copy=False)


def _check_labels(labels: np.ndarray, count: int, what: str) -> None:
    if labels.min() < 0 or labels.max() >= count:
        raise InputError(
            f"{what} labels must lie in 0..{count - 1} (the head has {count} columns), "
            f"got {labels.min()}..{labels.max()}"
        )


def _check_head(weights: np.ndarray, bias: np.ndarray, dimension: int) -> int:
    if weights.ndim != 2 or weights.shape[0] != dimension or bias.shape != (weights.shape[1],):
        raise InputError(
            f"weights {weights.shape} and bias {bias.shape} do not fit {dimension}-d features; "
            f"give weights ({dimension}, C) and bias (C,)"
        )
    if weights.shape[1] == 0:
        raise InputError("the head has no columns; give weights with at least one column")
    if not (np.all(np.isfinite(weights)) and np.all(np.isfinite(bias))):
        raise InputError("the starting weights or bias contain NaN or infinite values")
    return weights.shape[1]
