"""Keras building blocks of fine-tuning: optimizers, early stopping, trainable layers, fitting.

Used by :func:`edgeadapt.training.finetune.fine_tune` (one trainer; its settings and the order of
its stages live there). TensorFlow/Keras are imported inside the functions.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import numpy as np

from edgeadapt.device.errors import IncompatibleModelError, InputError
from edgeadapt.device.head import Head

if TYPE_CHECKING:  # pragma: no cover
    import keras

    from edgeadapt.data.image_folders import Dataset
    from edgeadapt.training.finetune import FineTuneOptions

logger = logging.getLogger("edgeadapt.training.finetune")


def time_budget(seconds: float):
    """A Keras callback that stops training once ``seconds`` of wall time have passed (checked every batch)."""
    import keras

    class TimeBudget(keras.callbacks.Callback):
        def __init__(self, limit: float):
            super().__init__()
            self.limit = float(limit)
            self.started = 0.0
            self.stopped = False

        def on_train_begin(self, logs=None):
            self.started = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            if time.perf_counter() - self.started > self.limit:
                self.model.stop_training = True
                self.stopped = True

    return TimeBudget(seconds)


def scaled_adam(learning_rate: float, slow_variable_ids: set[int], factor: float):
    """Adam in which the variables in ``slow_variable_ids`` learn at ``learning_rate * factor``.

    Keras 3 has no per-variable learning rate; scaling gradients would not work with Adam
    (it is invariant to gradient scale), so the learning rate itself is scaled in update_step.
    """
    import keras

    class BackboneScaledAdam(keras.optimizers.Adam):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self._slow_ids = frozenset(slow_variable_ids)
            self._factor = float(factor)
            self._multipliers: list[float] = []

        def build(self, variables):
            super().build(variables)
            self._multipliers = [self._factor if id(variable) in self._slow_ids else 1.0 for variable in variables]

        def update_step(self, gradient, variable, learning_rate):
            multiplier = self._multipliers[self._get_variable_index(variable)]
            if multiplier != 1.0:
                learning_rate = learning_rate * multiplier
            return super().update_step(gradient, variable, learning_rate)

    return BackboneScaledAdam(learning_rate=learning_rate)


def early_stopping(patience: int, initial_loss: float | None = None):
    """EarlyStopping on val_loss with best-weights restore; ``initial_loss`` makes the starting
    weights a candidate, so training never ends worse on validation than it began."""
    import keras

    class EarlyStoppingFromStart(keras.callbacks.EarlyStopping):
        def on_train_begin(self, logs=None):
            super().on_train_begin(logs)
            if initial_loss is not None and np.isfinite(initial_loss):
                self.best = float(initial_loss)
                self.best_weights = self.model.get_weights()
                self.best_epoch = -1

    return EarlyStoppingFromStart(monitor="val_loss", patience=patience, restore_best_weights=True)


def copy_model(model: "keras.Model") -> "keras.Model":
    """A new model with the same architecture and weights (created in the current strategy scope)."""
    import keras

    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy


def backbone_of(model: "keras.Model", embedding_layer: str | None) -> tuple["keras.Model", Head | None]:
    """(backbone, linear head or None): split a classifier, or take a model that outputs embeddings."""
    from edgeadapt.training.model_split import split_classifier

    try:
        split = split_classifier(model, embedding_layer)
        return without_trailing_dropout(split.backbone), split.head
    except IncompatibleModelError:
        if embedding_layer is None and len(model.outputs) == 1 and len(model.outputs[0].shape) == 2:
            logger.info("%s does not end in a Dense classifier; using its whole output (%d-d) as the embedding",
                        model.name, model.outputs[0].shape[-1])
            return model, None
        raise


def without_trailing_dropout(backbone: "keras.Model") -> "keras.Model":
    """Cut Dropout layers off the end of a backbone: they would add a second dropout in training and
    change nothing at inference (no weights, so the fingerprint is the same)."""
    import keras

    while True:
        history = getattr(backbone.outputs[0], "_keras_history", None)
        layer = history[0] if history is not None else None
        if not isinstance(layer, keras.layers.Dropout):
            return backbone
        backbone = keras.Model(backbone.inputs, layer.input, name=backbone.name)


def backbone_blocks(backbone: "keras.Model") -> list[list[str]]:
    """The backbone's blocks, input side first, each a list of layer paths.

    The built-in backbone's named blocks (stem, block1, ...) are used when present;
    otherwise a block starts at every layer with weights other than BatchNorm (a
    convolution or Dense) and takes the BatchNorm/weightless layers after it.
    """
    from edgeadapt.training.backbones import block_names, block_layer_names
    from edgeadapt.training.input_adaptation import _leaf_layers

    names = block_names(backbone)
    if names:
        blocks = []
        for index in range(len(names)):
            members = set(block_layer_names(backbone, len(names) - index)) - set(
                block_layer_names(backbone, len(names) - index - 1))
            blocks.append([layer.name for layer in backbone.layers if layer.name in members])
        return blocks
    blocks: list[list[str]] = []
    for path, layer in _leaf_layers(backbone):
        if layer.weights and not is_batch_norm(layer):
            blocks.append([path])
        elif blocks:
            blocks[-1].append(path)
    return blocks


def is_batch_norm(layer) -> bool:
    return "BatchNormalization" in type(layer).__name__


def set_trainable(backbone: "keras.Model", trainable_paths: set[str] | None, batch_norm_inference: bool) -> list[str]:
    """Freeze the backbone except ``trainable_paths`` (None: everything); returns the trainable layer paths."""
    from edgeadapt.training.input_adaptation import _leaf_layers

    backbone.trainable = True
    trainable = []
    for path, layer in _leaf_layers(backbone):
        wanted = trainable_paths is None or path in trainable_paths
        if is_batch_norm(layer) and batch_norm_inference:
            wanted = False  # a frozen BatchNorm layer runs in inference mode (moving statistics kept)
        layer.trainable = wanted
        if wanted and layer.weights:
            trainable.append(path)
    return trainable


def distribute_options(dataset, distribution_strategy):
    """Shard by element under a distribution strategy (the data come from memory, not files)."""
    if distribution_strategy is None:
        return dataset
    import tensorflow as tf

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def is_multi_worker(distribution_strategy) -> bool:
    if distribution_strategy is None:
        return False
    import tensorflow as tf

    kinds = (tf.distribute.MultiWorkerMirroredStrategy, tf.distribute.experimental.MultiWorkerMirroredStrategy)
    return isinstance(distribution_strategy, kinds)


def strategy_scope(distribution_strategy):
    import contextlib

    return distribution_strategy.scope() if distribution_strategy is not None else contextlib.nullcontext()


def validation_split(dataset: "Dataset", fraction: float, seed: int):
    """(train ImageSet, validation ImageSet): the dataset's own validation split, or a stratified carve-out."""
    from edgeadapt.data.image_folders import SplitOptions, split_entries

    if len(dataset.validation) or fraction == 0.0:
        return dataset.train, dataset.validation
    train, validation, rest = split_entries(dataset.train.labels, SplitOptions(validation_fraction=fraction,
                                                                                 test_fraction=0.0, seed=seed))
    train = np.sort(np.concatenate([train, rest]))  # split_entries keeps one "test" image per class: train on it
    logger.info("no validation split in the dataset: holding out %d of %d training images", len(validation),
                len(dataset.train))
    return dataset.train.subset(train), dataset.train.subset(validation)


def history_dict(history) -> dict[str, list[float]]:
    return {key: [float(value) for value in values] for key, values in (history.history or {}).items()}


def fit_head(train_embeddings, train_labels, validation_embeddings, validation_labels, num_classes: int,
                options: FineTuneOptions, distribution_strategy,
                sharded_totals: tuple[int, int] | None = None) -> tuple[Head, dict]:
    """Stage 1: a linear softmax head on cached embeddings (Keras, early stopping, best weights).

    ``sharded_totals`` (train, validation sizes over all workers) means the embeddings are
    this worker's shard only (a streamed folder under MultiWorkerMirroredStrategy): each
    worker then feeds its own embeddings (:class:`edgeadapt.data.streaming.PerWorkerInput`).
    """
    import keras
    import tensorflow as tf

    with strategy_scope(distribution_strategy):
        model = keras.Sequential([
            keras.Input((train_embeddings.shape[1],), name="embedding"),
            keras.layers.Dense(num_classes, name="classifier",
                               kernel_regularizer=keras.regularizers.l2(options.head_weight_decay)),
        ], name="head")
        model.compile(optimizer=keras.optimizers.Adam(options.head_learning_rate),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    if sharded_totals is not None:
        train, validation = sharded_embedding_inputs(train_embeddings, train_labels, validation_embeddings,
                                                      validation_labels, sharded_totals, options,
                                                      distribution_strategy)
        history = fit_model(model, train, validation, epochs=options.head_epochs, patience=options.head_patience,
                       verbose=options.verbose, distribution_strategy=distribution_strategy)
        kernel, bias = model.layers[-1].get_weights()
        return Head(weights=kernel, bias=bias), history
    train = (tf.data.Dataset.from_tensor_slices((train_embeddings, train_labels.astype(np.int64)))
             .shuffle(len(train_labels), seed=options.seed, reshuffle_each_iteration=True)
             .batch(options.batch_size).prefetch(tf.data.AUTOTUNE))
    train = distribute_options(train, distribution_strategy)
    validation = None
    if len(validation_labels):
        validation = tf.data.Dataset.from_tensor_slices(
            (validation_embeddings, validation_labels.astype(np.int64))).batch(256)
        validation = distribute_options(validation, distribution_strategy)
    history = fit_model(model, train, validation, epochs=options.head_epochs, patience=options.head_patience,
                   verbose=options.verbose, distribution_strategy=distribution_strategy)
    kernel, bias = model.layers[-1].get_weights()
    return Head(weights=kernel, bias=bias), history


def sharded_embedding_inputs(train_embeddings, train_labels, validation_embeddings, validation_labels,
                              totals: tuple[int, int], options: FineTuneOptions, distribution_strategy):
    """Per-worker inputs over this worker's own embeddings (already one shard of the files)."""
    import tensorflow as tf

    from edgeadapt.data.streaming import PerWorkerInput, worker_shard

    shard = worker_shard(distribution_strategy)

    def check(num_workers: int, index: int) -> None:
        if (num_workers, index) != shard:
            raise InputError(f"TensorFlow gave this worker input pipeline {index} of {num_workers}, but its data "
                             f"are shard {shard[1]} of {shard[0]}: check TF_CONFIG (cluster and task index)")

    def train_batches(num_workers: int, index: int, batch_size: int):
        check(num_workers, index)
        return (tf.data.Dataset.from_tensor_slices((train_embeddings, train_labels.astype(np.int64)))
                .shuffle(max(len(train_labels), 1), seed=options.seed, reshuffle_each_iteration=True)
                .repeat().batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE))

    def validation_batches(num_workers: int, index: int, batch_size: int):
        check(num_workers, index)
        return tf.data.Dataset.from_tensor_slices((validation_embeddings, validation_labels.astype(np.int64))
                                                  ).batch(batch_size)

    replicas = distribution_strategy.num_replicas_in_sync
    train = PerWorkerInput(train_batches, totals[0], options.batch_size, training=True)
    validation = None
    if totals[1]:
        validation = PerWorkerInput(validation_batches, totals[1], multiple_of(256, replicas), training=False)
    return train, validation


def multiple_of(value: int, divisor: int) -> int:
    """The smallest multiple of ``divisor`` that is at least ``value``."""
    return -(-value // divisor) * divisor


def fit_model(model, train, validation, *, epochs: int, patience: int, verbose: int, distribution_strategy,
         start_is_candidate: bool = False, max_seconds: float | None = None) -> dict[str, list[float]]:
    """Train a compiled classifier (logits, sparse labels) with early stopping on val_loss and best weights.

    Keras ``fit`` does the work, except under MultiWorkerMirroredStrategy, which Keras 3's
    ``fit`` does not support (keras-team/keras#20585): there :func:`fit_model_multi_worker`
    runs an equivalent custom loop. With ``start_is_candidate`` the weights before training
    compete with every epoch's, so training never ends worse on validation than it began.
    """
    if is_multi_worker(distribution_strategy):
        from edgeadapt.training.multi_worker_training import fit_model_multi_worker

        return fit_model_multi_worker(model, train, validation, epochs=epochs, patience=patience, verbose=verbose,
                                 strategy=distribution_strategy, start_is_candidate=start_is_candidate)
    callbacks = []
    if validation is not None:
        initial = None
        if start_is_candidate:
            initial = model.evaluate(validation, verbose=0, return_dict=True)["loss"]
        callbacks.append(early_stopping(patience, initial_loss=initial))
    if max_seconds is not None:
        callbacks.append(time_budget(max_seconds))
    fitted = model.fit(train, validation_data=validation, epochs=epochs, callbacks=callbacks,
                       shuffle=False, verbose=verbose)  # the tf.data pipeline shuffles
    return history_dict(fitted)


def classifier_model(backbone: "keras.Model", head: Head) -> "keras.Model":
    """backbone -> Dense "classifier" (the head, linear) -> Softmax: a plain Keras classifier."""
    import keras

    dense = keras.layers.Dense(head.num_classes, name="classifier")
    logits = dense(backbone.output)
    scores = keras.layers.Softmax(name="probabilities")(logits)
    model = keras.Model(backbone.input, scores, name="edgeadapt_finetuned")
    dense.set_weights([head.weights, head.bias])
    return model
