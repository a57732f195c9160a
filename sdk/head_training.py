"""Train a linear head on cached embeddings (the backbone never runs during training)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from edgeadapt.device.errors import InputError
from edgeadapt.device.head import Head

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


def train_head(
    embeddings: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    options: HeadTrainingOptions = HeadTrainingOptions(),
    validation: tuple[np.ndarray, np.ndarray] | None = None,
    initial: Head | None = None,
) -> Head:
    """Fit ``logits = e @ W + b`` with Adam on cached embeddings (Keras, progress with ``verbose``).

    With ``validation`` (embeddings, labels), training stops early on validation loss and
    the best weights are restored. ``initial`` warm-starts from an existing head.
    """
    import keras

    embeddings = np.asarray(embeddings, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64)
    if embeddings.ndim != 2 or embeddings.shape[0] != labels.shape[0]:
        raise InputError(f"embeddings {embeddings.shape} and labels {labels.shape} do not match")
    if embeddings.shape[0] == 0:
        raise InputError("no training embeddings; give at least one example per class")
    if not np.all(np.isfinite(embeddings)):
        raise InputError("training embeddings contain NaN or infinite values")
    keras.utils.set_random_seed(options.seed)
    model = keras.Sequential(
        [
            keras.Input((embeddings.shape[1],)),
            keras.layers.Dense(num_classes, kernel_regularizer=keras.regularizers.l2(options.weight_decay)),
        ]
    )
    if initial is not None:
        model.layers[-1].set_weights([initial.weights, initial.bias])
    model.compile(
        optimizer=keras.optimizers.Adam(options.learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    callbacks = []
    validation_data = None
    if validation is not None and len(validation[1]):
        validation_data = (np.asarray(validation[0], np.float32), np.asarray(validation[1], np.int64))
        callbacks.append(
            keras.callbacks.EarlyStopping(monitor="val_loss", patience=options.patience, restore_best_weights=True)
        )
    model.fit(
        embeddings,
        labels,
        epochs=options.epochs,
        batch_size=options.batch_size,
        validation_data=validation_data,
        callbacks=callbacks,
        shuffle=True,
        verbose=options.verbose,
    )
    kernel, bias = model.layers[-1].get_weights()
    return Head(weights=kernel, bias=bias)
