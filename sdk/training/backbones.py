"""A compact MobileNet-style backbone that trains from scratch on a CPU in about a minute."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import keras

EMBEDDING_LAYER_NAME = "embedding"
CLASSIFIER_LAYER_NAME = "classifier"


@dataclass(frozen=True)
class BackboneOptions:
    """Shape of the built-in backbone.

    ``blocks`` lists (kind, filters, stride) after a 3x3 stem: "conv" blocks are full 3x3
    convolutions (fast to train from scratch at high resolution, like EfficientNet's fused
    stages), "separable" blocks are MobileNet depthwise 3x3 + pointwise 1x1. The embedding
    is the global average of the last block. The stem uses stride 2 for inputs of 64
    pixels or more and stride 1 below.
    """

    stem_filters: int = 32
    blocks: tuple[tuple[str, int, int], ...] = (
        ("conv", 32, 1),
        ("conv", 32, 2),
        ("conv", 64, 1),
        ("conv", 64, 2),
        ("separable", 128, 1),
        ("separable", 128, 2),
        ("separable", 256, 1),
    )
    width_multiplier: float = 1.0
    dropout: float = 0.2
    #: Small datasets give few steps per epoch; 0.9 lets BatchNorm's moving statistics
    #: converge within a few epochs (Keras' default 0.99 leaves inference-mode accuracy at chance).
    batch_norm_momentum: float = 0.9


def _filters(count: int, multiplier: float) -> int:
    return max(8, int(round(count * multiplier / 8)) * 8)


def build_backbone(input_shape: tuple[int, int, int], options: BackboneOptions = BackboneOptions()) -> "keras.Model":
    """Image (normalised float, N x H x W x C) -> embedding (N x D). D = last block's filters."""
    import keras
    from keras import layers

    def conv_bn_relu(x, filters, kernel, stride, name, depthwise=False):
        if depthwise:
            x = layers.DepthwiseConv2D(kernel, strides=stride, padding="same", use_bias=False, name=name)(x)
        else:
            x = layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False, name=name)(x)
        x = layers.BatchNormalization(momentum=options.batch_norm_momentum, name=f"{name}_bn")(x)
        return layers.ReLU(6.0, name=f"{name}_relu")(x)

    inputs = keras.Input(shape=input_shape, name="image")
    stem_stride = 2 if min(input_shape[:2]) >= 64 else 1
    x = conv_bn_relu(inputs, _filters(options.stem_filters, options.width_multiplier), 3, stem_stride, "stem_conv")
    for number, (kind, filters, stride) in enumerate(options.blocks, start=1):
        width = _filters(filters, options.width_multiplier)
        prefix = f"block{number}"
        if kind == "conv":
            # Max pooling (rather than a strided convolution) keeps small-data training translation-robust.
            x = conv_bn_relu(x, width, 3, 1, f"{prefix}_conv")
            if stride > 1:
                x = layers.MaxPooling2D(stride, name=f"{prefix}_pool")(x)
        elif kind == "separable":
            x = conv_bn_relu(x, None, 3, stride, f"{prefix}_depthwise", depthwise=True)
            x = conv_bn_relu(x, width, 1, 1, f"{prefix}_pointwise")
        else:
            raise ValueError(f"unknown block kind {kind!r}; use 'conv' or 'separable'")
    outputs = layers.GlobalAveragePooling2D(name=EMBEDDING_LAYER_NAME)(x)
    return keras.Model(inputs, outputs, name="edgeadapt_backbone")


def build_classifier(
    input_shape: tuple[int, int, int], num_classes: int, options: BackboneOptions = BackboneOptions()
) -> "keras.Model":
    """The built-in backbone followed by dropout and a softmax Dense head named ``classifier``."""
    import keras
    from keras import layers

    if num_classes < 2:
        raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
    backbone = build_backbone(input_shape, options)
    x = backbone.output
    if options.dropout:
        x = layers.Dropout(options.dropout, name="head_dropout")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name=CLASSIFIER_LAYER_NAME)(x)
    return keras.Model(backbone.input, outputs, name="edgeadapt_classifier")


def block_names(model: "keras.Model") -> list[str]:
    """The built-in backbone's blocks present in ``model``, input side first: "stem", "block1", ...

    Layer names of the built-in backbone start with their block ("stem_conv_bn",
    "block3_conv", "block6_pointwise_relu"); a model with no such names gives [].
    """
    names: list[str] = []
    for layer in model.layers:
        block = _block_of(layer.name)
        if block is not None and block not in names:
            names.append(block)
    return names


def block_layer_names(model: "keras.Model", blocks: int) -> list[str]:
    """Names of the layers in the last ``blocks`` blocks of a built-in backbone (for "top n blocks")."""
    if blocks < 0:
        raise ValueError(f"blocks must be non-negative, got {blocks}")
    present = block_names(model)
    chosen = set(present[len(present) - blocks:]) if blocks else set()
    return [layer.name for layer in model.layers if _block_of(layer.name) in chosen]


def _block_of(layer_name: str) -> str | None:
    import re

    match = re.match(r"^(stem|block\d+)_", layer_name)
    return match.group(1) if match else None
