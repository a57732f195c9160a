"""Train a linear head on cached embeddings (the backbone never runs during training).

Softmax regression with mini-batch Adam, L2 weight decay and early stopping, in numpy: on
cached embeddings an epoch is a few matrix products, so there is nothing for a graph
framework to speed up and its start-up cost would dominate.

The optimisation itself is :func:`edgeadapt.device.head_trainer.fit_softmax_head`, the one
head trainer, which the device's :func:`edgeadapt.device.incremental.train_columns` calls too
with its own settings. This module adds what a whole new head needs around it: the feature
normalisation stored in the head, warm starts, and the host's settings (every column, float32,
shuffled mini-batches, early stopping on the validation loss with the best weights restored).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from edgeadapt.device.errors import InputError
from edgeadapt.device.head import Head
from edgeadapt.device.head_trainer import HeadFitSettings, check_examples, fit_softmax_head

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

    Args:
        embeddings: Training embeddings (N, D).
        labels: Their class indices (N,), in 0..num_classes-1.
        num_classes: Columns of the head.
        options: Epochs, batch size, learning rate, weight decay, patience, seed, normalisation.
        validation: Optional (embeddings, labels) for early stopping; ignored when empty.
        initial: Optional head to start from, of shape (D, num_classes).

    Returns:
        The trained head (float32) carrying the requested normalisation and temperature.

    Raises:
        InputError: The embeddings, labels or initial head do not fit, or an option is out of range.
    """
    embeddings, labels = check_examples(embeddings, labels, num_classes, "training")
    dimension = embeddings.shape[1]
    shell = _normalisation_shell(embeddings, options)
    weights, bias = _initial_columns(initial, shell, options, dimension, num_classes)
    if shell.feature_mean is not None or shell.l2_normalize:
        embeddings = shell.features(embeddings)
    validation = _normalised_validation(validation, shell, num_classes)

    settings = HeadFitSettings(
        epochs=options.epochs,
        batch_size=options.batch_size,
        learning_rate=options.learning_rate,
        decay=2.0 * options.weight_decay,  # the gradient of the penalty weight_decay * |W|^2
        temperature=options.temperature,
        epsilon=1e-7,
        dtype="float32",
        seed=options.seed,
        patience=options.patience,
    )
    weights, bias = fit_softmax_head(embeddings, labels, weights, bias, settings, validation, _epoch_logger(options))
    return shell.with_columns(weights, bias)


def _epoch_logger(options: HeadTrainingOptions):
    """With ``options.verbose``, an ``on_epoch`` callback that logs each epoch's validation loss."""
    if not options.verbose:
        return None

    def on_epoch(epoch: int, loss: float | None) -> None:
        if loss is not None:
            logger.info("head epoch %d/%d: validation loss %.4f", epoch, options.epochs, loss)

    return on_epoch


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
    validation = check_examples(validation[0], validation[1], num_classes, "validation")
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
