"""Split a Keras classifier into backbone (image -> embedding) and a linear :class:`Head`."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Union

import numpy as np

from edgeadapt.converters.fingerprint import backbone_fingerprint  # noqa: F401  (re-exported)
from edgeadapt.device.errors import IncompatibleModelError
from edgeadapt.device.head import Head

if TYPE_CHECKING:  # pragma: no cover
    import keras

logger = logging.getLogger(__name__)
ModelSource = Union[str, Path, "keras.Model"]


@dataclass
class SplitModel:
    """A backbone Keras model and the linear head that followed it (None if not linear)."""

    backbone: "keras.Model"
    head: Head | None
    embedding_layer: str

    @property
    def embedding_size(self) -> int:
        return int(self.backbone.output.shape[-1])


def load_keras_model(source: ModelSource) -> "keras.Model":
    """Load a ``.keras`` file (or return an in-memory model); clear errors for anything else.

    Args:
        source: A ``.keras`` file or a Keras model.

    Returns:
        The Keras model.

    Raises:
        IncompatibleModelError: When the file is missing, is not a Keras file or cannot be loaded.
    """
    import keras

    if isinstance(source, keras.Model):
        return source
    path = Path(source)
    if not path.is_file():
        raise IncompatibleModelError(f"model file {str(path)!r} does not exist")
    if path.suffix not in (".keras", ".h5"):
        raise IncompatibleModelError(
            f"{path.name} is not a Keras model file (.keras); for .tflite or .onnx use `edgeadapt import`"
        )
    try:
        return keras.models.load_model(path, compile=False)
    except Exception as error:  # Keras raises several types for broken files
        raise IncompatibleModelError(f"cannot load {path.name} as a Keras model: {error}") from error


def _final_dense(model: "keras.Model"):
    import keras

    for layer in reversed(model.layers):
        if isinstance(layer, keras.layers.Dense):
            return layer
        if isinstance(layer, (keras.layers.Softmax, keras.layers.Activation, keras.layers.Dropout)):
            continue
        raise IncompatibleModelError(
            f"the last layers of {model.name} end in {type(layer).__name__} {layer.name!r}, not a Dense "
            "classifier; name the embedding layer explicitly (embedding_layer=...) and train a new head"
        )
    raise IncompatibleModelError(f"{model.name} has no Dense classifier layer")


def split_classifier(source: ModelSource, embedding_layer: str | None = None) -> SplitModel:
    """Split a classifier at the input of its final Dense layer (or at ``embedding_layer``).

    The head keeps the Dense weights as float32 (softmax is applied by the runtime). If the
    named layer does not feed the final Dense directly, ``head`` is None and a head must be
    trained on the embeddings.

    Args:
        source: A Keras classifier or a ``.keras`` file.
        embedding_layer: Name of the layer whose output is the embedding (default: the input of
            the final Dense layer).

    Returns:
        The backbone (image -> embedding) and the linear head (or None, see above).

    Raises:
        IncompatibleModelError: When the model has no final Dense layer or no such layer.
    """
    import keras

    model = load_keras_model(source)
    dense = _final_dense(model)
    activation = getattr(dense.activation, "__name__", str(dense.activation))
    if activation not in ("softmax", "linear"):
        raise IncompatibleModelError(
            f"final Dense {dense.name!r} uses activation {activation!r}; a linear or softmax classifier is needed"
        )
    if embedding_layer is None:
        embedding_tensor = dense.input
        embedding_name = _producer_name(model, embedding_tensor)
    else:
        try:
            embedding_tensor = model.get_layer(embedding_layer).output
        except ValueError as error:
            raise IncompatibleModelError(f"{model.name} has no layer named {embedding_layer!r}") from error
        embedding_name = embedding_layer
    if len(embedding_tensor.shape) != 2:
        raise IncompatibleModelError(
            f"the embedding {embedding_name!r} has shape {tuple(embedding_tensor.shape)}; a flat (N, D) "
            "embedding is needed (add global pooling)"
        )
    backbone = keras.Model(model.inputs[0] if len(model.inputs) == 1 else model.inputs, embedding_tensor, name=f"{model.name}_backbone")
    head = None
    kernel, bias = (np.asarray(w) for w in dense.get_weights()) if dense.use_bias else (dense.get_weights()[0], None)
    if embedding_layer is None or _producer_name(model, dense.input) == embedding_layer:
        bias = np.zeros(kernel.shape[1], np.float32) if bias is None else bias
        head = Head(weights=kernel.astype(np.float32), bias=bias.astype(np.float32))
    logger.info("split %s at %s: embedding %d-d, %s", model.name, embedding_name,
                embedding_tensor.shape[-1], "linear head copied" if head else "no linear head")
    return SplitModel(backbone=backbone, head=head, embedding_layer=embedding_name)


def _producer_name(model: "keras.Model", tensor) -> str:
    history = getattr(tensor, "_keras_history", None)
    if history is not None:
        return history[0].name
    return getattr(tensor, "name", "embedding")
