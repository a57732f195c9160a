"""Training under MultiWorkerMirroredStrategy: a custom synchronous loop, since Keras 3's ``fit`` has none.

Used by :func:`edgeadapt.training.finetune_keras.fit_model` when its strategy spans several workers
(keras-team/keras#20585). Owns the per-replica train and evaluation steps, distributing
the inputs and the epoch loop with Keras-style progress and early stopping.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np


@dataclass
class _Steps:
    """The two distributed steps of one model; each returns (summed loss, correct, examples) over all replicas."""

    train: Callable
    evaluate: Callable


def _replica_steps(model: Any, strategy: Any) -> _Steps:
    """Compiled train and evaluation steps of ``model`` under ``strategy`` (the optimizer built if needed)."""
    import keras
    import tensorflow as tf

    optimizer = model.optimizer
    replicas = strategy.num_replicas_in_sync
    if not optimizer.built:
        with strategy.scope():  # slot variables are created in cross-replica context, before the loop
            optimizer.build(model.trainable_variables)

    def per_example_loss(labels, logits):
        return keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)

    def train_replica(images, labels):
        with tf.GradientTape() as tape:
            logits = model(images, training=True)
            losses = per_example_loss(labels, logits)
            # mean over the global batch: each replica's share, summed by the all-reduce
            loss = tf.reduce_sum(losses) / tf.cast(tf.shape(labels)[0] * replicas, losses.dtype)
            if model.losses:
                loss += tf.add_n(model.losses) / replicas
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, axis=-1, output_type=labels.dtype), labels),
                                        tf.float32))
        return tf.reduce_sum(losses), correct, tf.cast(tf.shape(labels)[0], tf.float32)

    def evaluate_replica(images, labels):
        logits = model(images, training=False)
        losses = per_example_loss(labels, logits)
        correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, axis=-1, output_type=labels.dtype), labels),
                                        tf.float32))
        return tf.reduce_sum(losses), correct, tf.cast(tf.shape(labels)[0], tf.float32)

    def summed(values):
        return [strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None) for value in values]

    @tf.function
    def train_step(batch):
        return summed(strategy.run(train_replica, args=batch))

    @tf.function
    def evaluate_step(batch):
        return summed(strategy.run(evaluate_replica, args=batch))

    return _Steps(train_step, evaluate_step)


def _distribute(strategy: Any, inputs: Any) -> Callable:
    """A function giving each epoch's distributed batches. An input function is distributed once: its
    pipeline is built once per worker and every epoch's new iterator reshuffles it."""
    from edgeadapt.data.streaming import PerWorkerInput

    if isinstance(inputs, PerWorkerInput):
        distributed = strategy.distribute_datasets_from_function(inputs)
        return lambda: distributed
    return lambda: strategy.experimental_distribute_dataset(inputs)


def _run_epoch(distributed: Any, step: Callable, progress: Any = None) -> tuple[float, float]:
    """(mean loss, accuracy) of one pass of ``step`` over ``distributed``, updating ``progress`` per batch."""
    totals = np.zeros(3)
    for number, batch in enumerate(distributed, start=1):
        totals += np.array([float(value) for value in step(batch)])
        if progress is not None:
            progress.update(number, [("loss", totals[0] / totals[2]), ("accuracy", totals[1] / totals[2])])
    return totals[0] / max(totals[2], 1.0), totals[1] / max(totals[2], 1.0)


def _steps_per_epoch(train: Any, strategy: Any) -> int:
    from edgeadapt.data.streaming import PerWorkerInput, worker_shard

    if isinstance(train, PerWorkerInput):
        return train.steps(worker_shard(strategy)[0])
    return int(train.cardinality())


def fit_model_multi_worker(model, train, validation, *, epochs: int, patience: int, verbose: int, strategy,
                           start_is_candidate: bool) -> dict[str, list[float]]:
    """A synchronous data-parallel loop for MultiWorkerMirroredStrategy with Keras-style progress output.

    Every worker runs this with the same model, data and settings; per-example losses are
    summed across all replicas, gradients are all-reduced by the optimizer, and early
    stopping decides on the global validation loss, so all workers stop at the same epoch.
    ``train`` and ``validation`` are tf.data pipelines sharded by TensorFlow, or
    :class:`edgeadapt.data.streaming.PerWorkerInput` functions with which each worker reads
    only its own data.

    Args:
        model: A compiled Keras classifier (logits, sparse labels) built under ``strategy``.
        train: The training input (tf.data pipeline or ``PerWorkerInput``).
        validation: The validation input, or None (no early stopping).
        epochs: Most epochs.
        patience: Epochs without a better validation loss before stopping.
        verbose: Keras progress output (0 silent).
        strategy: The MultiWorkerMirroredStrategy.
        start_is_candidate: Whether the weights before training compete with every epoch's.

    Returns:
        The history (loss, accuracy and, with validation, val_loss, val_accuracy per epoch).
    """
    import keras

    steps = _replica_steps(model, strategy)
    distributed_train = _distribute(strategy, train)
    distributed_validation = _distribute(strategy, validation) if validation is not None else None
    history: dict[str, list[float]] = {"loss": [], "accuracy": [], "val_loss": [], "val_accuracy": []}
    best_loss, best_weights, waited = np.inf, None, 0
    if validation is not None and start_is_candidate:
        best_loss, _ = _run_epoch(distributed_validation(), steps.evaluate)
        best_weights = model.get_weights()
    steps_per_epoch = _steps_per_epoch(train, strategy)
    for epoch in range(epochs):
        if verbose:
            print(f"Epoch {epoch + 1}/{epochs}")
        progress = keras.utils.Progbar(steps_per_epoch if steps_per_epoch > 0 else None, verbose=verbose,
                                       stateful_metrics=["loss", "accuracy"]) if verbose else None
        loss, accuracy = _run_epoch(distributed_train(), steps.train, progress)
        history["loss"].append(loss)
        history["accuracy"].append(accuracy)
        if validation is None:
            continue
        validation_loss, validation_accuracy = _run_epoch(distributed_validation(), steps.evaluate)
        history["val_loss"].append(validation_loss)
        history["val_accuracy"].append(validation_accuracy)
        if verbose:
            print(f"val_loss: {validation_loss:.4f} - val_accuracy: {validation_accuracy:.4f}")
        if validation_loss < best_loss:
            best_loss, best_weights, waited = validation_loss, model.get_weights(), 0
        else:
            waited += 1
            if waited >= patience:  # as keras.callbacks.EarlyStopping
                break
    if best_weights is not None:
        model.set_weights(best_weights)
    return {key: values for key, values in history.items() if values}
