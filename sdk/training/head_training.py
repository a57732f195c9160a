"""Train a linear head on cached embeddings (the backbone never runs during training).

Softmax regression with mini-batch Adam, L2 weight decay and early stopping, in numpy: on
cached embeddings an epoch is a few matrix products, so there is nothing for a graph
framework to speed up and its start-up cost would dominate.

The device's :func:`edgeadapt.device.incremental.train_columns` is a different trainer on
purpose: it trains only the new columns of an existing head (the old ones frozen), full-batch
and class-balanced on a few examples, deterministic and in float64. This module trains every
column of a new head on a whole dataset (shuffled mini-batches, early stopping, warm start),
so neither can stand in for the other without changing what it computes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from edgeadapt.device.errors import InputError
from edgeadapt.device.head import Head, softmax

logger = logging.getLogger(__name__)


#: Feature normalisations a head can be trained with (see :class:`HeadTrainingOptions`).
NORMALIZATIONS = ("none", "center", "center_l2")
#: The normalisation of the pipeline's base heads: centring with the stored base mean.
#: Class additions copy the normalisation unchanged, so old logits stay bit-identical
#: (docs/INCREMENTAL.md).
DEFAULT_NORMALIZATION = "center"


@dataclass(frozen=True)
class HeadTrainingOptions:
    """Softmax-regression settings for :func:`train_head`.

    ``normalization``: "none" (raw embeddings), "center" (subtract the mean training
    embedding, stored in the head as ``feature_mean``) or "center_l2" (centre, then
    L2-normalise: a cosine classifier, which the ``center_l2`` class-addition method needs).
    ``temperature``: logits are divided by it; with "center_l2" a small value such as 0.1
    lets the bounded cosine scores reach confident probabilities.
    """

    epochs: int = 60
    batch_size: int = 64
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    patience: int = 10
    seed: int = 0
    verbose: int = 0
    normalization: str = "none"
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.normalization not in NORMALIZATIONS:
            raise InputError(f"normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}")
        if not self.temperature > 0:
            raise InputError(f"temperature must be positive, got {self.temperature}")


def _check(embeddings: np.ndarray, labels: np.ndarray, num_classes: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    embeddings = np.asarray(embeddings, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64)
    if embeddings.ndim != 2 or labels.shape != (embeddings.shape[0],):
        raise InputError(f"{what} embeddings {embeddings.shape} and labels {labels.shape} do not match")
    if embeddings.shape[0] == 0:
        raise InputError(f"no {what} embeddings; give at least one example per class")
    if not np.all(np.isfinite(embeddings)):
        raise InputError(f"{what} embeddings contain NaN or infinite values")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise InputError(f"{what} labels must lie in 0..{num_classes - 1}")
    return embeddings, labels


def cross_entropy(head_weights: np.ndarray, head_bias: np.ndarray, embeddings: np.ndarray, labels: np.ndarray,
                  temperature: float = 1.0) -> float:
    """Mean softmax cross-entropy of a linear head (logits divided by ``temperature``)."""
    probabilities = softmax((embeddings @ head_weights + head_bias) / np.float32(temperature))
    return float(-np.mean(np.log(probabilities[np.arange(len(labels)), labels] + 1e-12)))


def train_head(
    embeddings: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    options: HeadTrainingOptions = HeadTrainingOptions(),
    validation: tuple[np.ndarray, np.ndarray] | None = None,
    initial: Head | None = None,
) -> Head:
    """Fit ``logits = e @ W + b`` on cached embeddings.

    With ``validation`` (embeddings, labels), training stops early when the validation loss
    has not improved for ``options.patience`` epochs and the best weights are restored.
    ``initial`` warm-starts from an existing head (e.g. the Dense layer of a trained model).

    ``options.normalization`` / ``options.temperature`` choose the head's feature
    normalisation (the feature mean is the mean of ``embeddings``); the returned head
    carries it. A warm start on raw embeddings is converted exactly to "center"; an
    L2-normalised initial head must already match the requested normalisation.
    """
    embeddings, labels = _check(embeddings, labels, num_classes, "training")
    dimension = embeddings.shape[1]
    shell = _normalisation_shell(embeddings, options)
    temperature = np.float32(options.temperature)
    weights, bias = _initial_columns(initial, shell, options, dimension, num_classes)
    if shell.feature_mean is not None or shell.l2_normalize:
        embeddings = shell.features(embeddings)
    validation = _normalised_validation(validation, shell, num_classes)

    rng = np.random.default_rng(options.seed)
    moments = [np.zeros_like(weights), np.zeros_like(bias)]
    squares = [np.zeros_like(weights), np.zeros_like(bias)]
    beta1, beta2, epsilon = 0.9, 0.999, 1e-7
    step = 0
    best = (np.inf, weights.copy(), bias.copy())
    epochs_without_improvement = 0
    count = embeddings.shape[0]
    for epoch in range(options.epochs):
        order = rng.permutation(count)
        for start in range(0, count, options.batch_size):
            batch = order[start : start + options.batch_size]
            features = embeddings[batch]
            if options.temperature == 1.0:
                gradient = softmax(features @ weights + bias)
            else:
                gradient = softmax((features @ weights + bias) / temperature)
            gradient[np.arange(len(batch)), labels[batch]] -= 1.0
            gradient /= len(batch) * temperature
            gradients = (features.T @ gradient + 2.0 * options.weight_decay * weights, gradient.sum(axis=0))
            step += 1
            correction = np.sqrt(1 - beta2**step) / (1 - beta1**step)
            for parameter, grad, moment, square in zip((weights, bias), gradients, moments, squares):
                moment *= beta1
                moment += (1 - beta1) * grad
                square *= beta2
                square += (1 - beta2) * grad * grad
                parameter -= options.learning_rate * correction * moment / (np.sqrt(square) + epsilon)
        if validation is None:
            continue
        loss = cross_entropy(weights, bias, *validation, temperature=options.temperature)
        if options.verbose:
            logger.info("head epoch %d/%d: validation loss %.4f", epoch + 1, options.epochs, loss)
        if loss < best[0] - 1e-6:
            best = (loss, weights.copy(), bias.copy())
            epochs_without_improvement = 0
        else:
            epochs_without_improvement += 1
            if epochs_without_improvement >= options.patience:
                logger.info("head training stopped early at epoch %d (best validation loss %.4f)", epoch + 1, best[0])
                break
    if validation is not None and np.isfinite(best[0]):
        weights, bias = best[1], best[2]
    return shell.with_columns(weights, bias)


def _initial_columns(initial: Head | None, shell: Head, options: HeadTrainingOptions, dimension: int,
                     num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(weights, bias) training starts from: the warm start's, converted to ``shell``'s normalisation, or zeros."""
    if initial is None:
        return np.zeros((dimension, num_classes), np.float32), np.zeros(num_classes, np.float32)
    if initial.weights.shape != (dimension, num_classes):
        raise InputError(f"initial head is {initial.weights.shape}, expected ({dimension}, {num_classes})")
    start = _warm_start(initial, shell, options)
    return start.weights.copy(), start.bias.copy()


def _normalised_validation(validation: tuple[np.ndarray, np.ndarray] | None, shell: Head,
                           num_classes: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The checked validation split with ``shell``'s feature normalisation applied; None when empty or absent."""
    if validation is None or not len(validation[1]):
        return None
    validation = _check(validation[0], validation[1], num_classes, "validation")
    if shell.feature_mean is not None or shell.l2_normalize:
        validation = (shell.features(validation[0]), validation[1])
    return validation


def _normalisation_shell(embeddings: np.ndarray, options: HeadTrainingOptions) -> Head:
    """A zero-column head that carries the normalisation ``options`` ask for."""
    mean = None
    if options.normalization in ("center", "center_l2"):
        mean = embeddings.astype(np.float64).mean(axis=0).astype(np.float32)
    return Head(
        weights=np.zeros((embeddings.shape[1], 0), np.float32),
        bias=np.zeros(0, np.float32),
        feature_mean=mean,
        l2_normalize=options.normalization == "center_l2",
        temperature=options.temperature,
    )


def _warm_start(initial: Head, shell: Head, options: HeadTrainingOptions) -> Head:
    """``initial`` re-expressed in the normalisation of ``shell``."""
    if initial.l2_normalize != shell.l2_normalize:
        raise InputError(
            "the initial head and the requested normalisation differ in L2 normalisation, which cannot be "
            "converted; train without initial= or with the initial head's normalisation"
        )
    ratio = options.temperature / initial.temperature
    weights = initial.weights.astype(np.float64) * ratio
    bias = initial.bias.astype(np.float64) * ratio
    if not initial.l2_normalize:
        # e @ W + b == (e - m) @ W + (b + m @ W): move the centring from one head to the other exactly.
        size = initial.embedding_size
        old_mean = np.zeros(size) if initial.feature_mean is None else initial.feature_mean.astype(np.float64)
        new_mean = np.zeros(size) if shell.feature_mean is None else shell.feature_mean.astype(np.float64)
        bias = bias + (new_mean - old_mean) @ weights
    elif not np.array_equal(initial.feature_mean, shell.feature_mean):
        raise InputError("the initial L2-normalised head centres with another mean; train it without initial=")
    return shell.with_columns(weights.astype(np.float32), bias.astype(np.float32))
