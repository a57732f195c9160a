"""Train the built-in classifier from scratch (the base model of the demo pipeline)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from edgeadapt.training.backbones import BackboneOptions, build_classifier
from edgeadapt.device.manifest import InputSpec

if TYPE_CHECKING:  # pragma: no cover
    import keras

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClassifierTrainingOptions:
    """End-to-end training of the built-in classifier."""

    epochs: int = 15
    batch_size: int = 32
    learning_rate: float = 2e-3
    augment: bool = True
    patience: int = 5
    seed: int = 0
    verbose: int = 2
    backbone: BackboneOptions = field(default_factory=BackboneOptions)


def augmentation_layers(seed: int):
    """Random flip, zoom, shift and brightness/contrast jitter on float pixels in 0..255."""
    import keras
    from keras import layers

    return keras.Sequential(
        [
            layers.RandomFlip("horizontal", seed=seed),
            layers.RandomZoom((-0.15, 0.0), seed=seed + 1),
            layers.RandomTranslation(0.08, 0.08, seed=seed + 2),
            layers.RandomBrightness(0.15, value_range=(0.0, 255.0), seed=seed + 3),
            layers.RandomContrast(0.15, value_range=(0.0, 255.0), seed=seed + 4),
        ],
        name="augmentation",
    )


def make_tf_dataset(images: np.ndarray, labels: np.ndarray, spec: InputSpec, batch_size: int,
                    shuffle: bool, seed: int, augment=None):
    """A tf.data pipeline: uint8 batches -> (augmented) float pixels -> normalised input, prefetched.

    Augmentation works on pixel values 0..255, before normalisation, so it is the same
    whatever normalisation the input spec asks for.
    """
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensor_slices((images, labels.astype(np.int64)))
    if shuffle:
        dataset = dataset.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
    scale, offset = np.float32(spec.scale), np.float32(spec.offset)
    dataset = dataset.batch(batch_size).map(lambda x, y: (tf.cast(x, tf.float32), y), num_parallel_calls=tf.data.AUTOTUNE)
    if augment is not None:
        dataset = dataset.map(lambda x, y: (augment(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE)
    dataset = dataset.map(lambda x, y: (x * scale + offset, y), num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.prefetch(tf.data.AUTOTUNE)


def train_classifier(dataset, options: ClassifierTrainingOptions = ClassifierTrainingOptions(),
                     callbacks=()) -> "keras.Model":
    """Train the built-in backbone + softmax head on ``dataset`` (an :class:`edgeadapt.data.image_folders.Dataset`).

    Early stopping on validation loss restores the best weights. Keras prints its progress
    bar when ``options.verbose`` is 1 (one line per epoch with 2). ``callbacks`` are extra
    Keras callbacks (e.g. :func:`edgeadapt.training.finetune_keras.time_budget` for a wall-time limit).

    Args:
        dataset: The split dataset to train on (its validation split drives early stopping).
        options: Epochs, learning rate, backbone architecture, augmentation, seed, verbosity.
        callbacks: Extra Keras callbacks.

    Returns:
        The trained Keras classifier (backbone + Dense head); split it with :func:`split_classifier`.

    Raises:
        DatasetError: When the dataset is empty or has fewer than two classes.
    """
    import keras

    keras.utils.set_random_seed(options.seed)
    spec = dataset.spec
    model = build_classifier(spec.shape, len(dataset.class_names), options.backbone)
    model.compile(
        optimizer=keras.optimizers.Adam(options.learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    augment = augmentation_layers(options.seed) if options.augment else None
    train = make_tf_dataset(dataset.train.images, dataset.train.labels, spec, options.batch_size, True, options.seed, augment)
    callbacks = list(callbacks)
    validation = None
    if len(dataset.validation):
        validation = make_tf_dataset(dataset.validation.images, dataset.validation.labels, spec, 128, False, options.seed)
        # Early epochs of from-scratch training have noisy validation loss (BatchNorm statistics
        # still settling): only start watching after a third of the epochs.
        callbacks.append(keras.callbacks.EarlyStopping(monitor="val_loss", patience=options.patience,
                                                       restore_best_weights=True,
                                                       start_from_epoch=max(1, options.epochs // 3)))
    model.fit(train, validation_data=validation, epochs=options.epochs, callbacks=callbacks, verbose=options.verbose,
              shuffle=False)  # the tf.data pipeline already shuffles
    return model
