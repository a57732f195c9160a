"""Train a linear head on cached embeddings (the backbone never runs during training).

Softmax regression with mini-batch Adam, L2 weight decay and early stopping, in numpy: on
cached embeddings an epoch is a few matrix products, so there is nothing for a graph
framework to speed up and its start-up cost would dominate.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from edgeadapt.device.errors import InputError
from edgeadapt.device.head import Head, softmax

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeadTrainingOptions:
    """Softmax-regression settings for :func:`train_head`."""

    epochs: int = 60
    batch_size: int = 64
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    patience: int = 10
    seed: int = 0
    verbose: int = 0


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


def cross_entropy(head_weights: np.ndarray, head_bias: np.ndarray, embeddings: np.ndarray, labels: np.ndarray) -> float:
    """Mean softmax cross-entropy of a linear head."""
    probabilities = softmax(embeddings @ head_weights + head_bias)
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
    """
    embeddings, labels = _check(embeddings, labels, num_classes, "training")
    dimension = embeddings.shape[1]
    if initial is not None:
        if initial.weights.shape != (dimension, num_classes):
            raise InputError(f"initial head is {initial.weights.shape}, expected ({dimension}, {num_classes})")
        weights, bias = initial.weights.astype(np.float32).copy(), initial.bias.astype(np.float32).copy()
    else:
        weights, bias = np.zeros((dimension, num_classes), np.float32), np.zeros(num_classes, np.float32)
    if validation is not None and len(validation[1]):
        validation = _check(validation[0], validation[1], num_classes, "validation")
    else:
        validation = None

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
            gradient = softmax(features @ weights + bias)
            gradient[np.arange(len(batch)), labels[batch]] -= 1.0
            gradient /= len(batch)
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
        loss = cross_entropy(weights, bias, *validation)
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
    return Head(weights=weights, bias=bias)
