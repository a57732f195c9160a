"""The backbone stage of fine-tuning: unfreeze the top blocks (or all) and train them with the head.

Used by :func:`edgeadapt.training.finetune.fine_tune` after its head stage (``top_layers`` and
``full``); the backbone learns at its own, lower learning rate.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING

from edgeadapt.device.head import Head
from edgeadapt.device.manifest import InputSpec
from edgeadapt.training.finetune_keras import backbone_blocks, copy_model, fit_model, scaled_adam, set_trainable, strategy_scope

if TYPE_CHECKING:  # pragma: no cover
    from edgeadapt.training.finetune import FineTuneOptions
    from edgeadapt.training.finetune_data import MemoryData, StreamData

logger = logging.getLogger("edgeadapt.training.finetune")


def train_backbone(backbone, head: Head, data: "MemoryData | StreamData", spec: InputSpec,
                    options: FineTuneOptions, distribution_strategy):
    """Stage 2: unfreeze the top blocks (or all), train them with the head; returns a plain copy.

    Args:
        backbone: the backbone after the head stage (not modified).
        head: the head of the head stage, the starting point of the classifier layer.
        data: the training data source.
        spec: the input spec of the images.
        options: strategy, learning rates, epochs, BatchNorm mode, dropout, seed.
        distribution_strategy: an optional ``tf.distribute.Strategy``.

    Returns:
        ``(trained backbone, head, names of the trainable layers, history)``.
    """
    import keras

    from edgeadapt.training.classifier import augmentation_layers

    if options.strategy == "top_layers":
        blocks = backbone_blocks(backbone)
        trainable_paths = {path for block in blocks[-options.unfreeze_blocks:] for path in block}
    else:
        trainable_paths = None
    backbone_rate = options.effective_backbone_learning_rate
    with strategy_scope(distribution_strategy):
        network = copy_model(backbone)
        trainable = set_trainable(network, trainable_paths, options.batch_norm_inference)
        inputs = keras.Input(spec.shape, name="image")
        features = network(inputs)
        if options.head_dropout:
            features = keras.layers.Dropout(options.head_dropout, seed=options.seed, name="head_dropout")(features)
        dense = keras.layers.Dense(head.num_classes, name="classifier")
        training_model = keras.Model(inputs, dense(features), name="fine_tuning")
        dense.set_weights([head.weights, head.bias])
        slow = {id(variable) for variable in network.trainable_variables}
        training_model.compile(
            optimizer=scaled_adam(options.head_learning_rate, slow, backbone_rate / options.head_learning_rate),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
    logger.info("backbone stage: %d layer(s) with weights trainable (%s), head lr %g, backbone lr %g, "
                "BatchNorm in %s mode", len(trainable), ", ".join(trainable[:6]) + (" ..." if len(trainable) > 6 else ""),
                options.head_learning_rate, backbone_rate, "inference" if options.batch_norm_inference else "training")
    augment = augmentation_layers(options.seed) if options.augment else None
    train, validation = data.backbone_inputs(options, augment, distribution_strategy)
    with data.reading():
        history = fit_model(training_model, train, validation, epochs=options.epochs, patience=options.patience,
                       verbose=options.verbose, distribution_strategy=distribution_strategy,
                       start_is_candidate=True, max_seconds=options.max_seconds)
    kernel, bias = dense.get_weights()
    plain = copy_model(network)  # outside the strategy scope: ordinary variables, exportable
    plain.trainable = True
    return plain, replace(head, weights=kernel, bias=bias), trainable, history
