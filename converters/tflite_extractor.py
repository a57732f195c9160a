"""Import a headless TFLite model (an embedding extractor) as a backbone with a zero-class head.

An embedding extractor has no classifier: its one output IS the embedding, e.g. a network
that ends in global average pooling, a flatten or a reshape to ``(1, D)`` (the backbone file
of an imported bundle is one). :func:`import_tflite_extractor` checks that, renames the output
to ``"embedding"`` (appending RESHAPE and DEQUANTIZE when it is 4-D or quantized, exactly as
the classifier cut does) and returns it with an empty float32 head (``W``: D x 0, ``bias``: 0
values). The device then learns its first classes from a few photos each (Coral's imprinting
flow, see docs/APPS.md). TensorFlow is not imported by this module.
"""

from __future__ import annotations

import logging

import numpy as np

from edgeadapt.converters.model_info import check_tflite_runs, inspect_tflite
from edgeadapt.converters.tflite_import import (
    ImportedClassifier,
    ImportOptions,
    TFLiteGraph,
    _check_builtin_only,
    cut_at_embedding,
    input_spec_from_quantization,
    read_tflite_model,
    write_tflite_model,
)
from edgeadapt.device.errors import ConversionError, IncompatibleModelError, InputError
from edgeadapt.device.head import Head

logger = logging.getLogger(__name__)

#: Operators that may follow the embedding without changing it (layout and quantization only).
_PASS_THROUGH = ("RESHAPE", "SQUEEZE", "QUANTIZE", "DEQUANTIZE")
#: Output operators that mean the model returns class scores, not an embedding.
_SCORE_OPERATORS = ("SOFTMAX", "LOG_SOFTMAX", "LOGISTIC", "ARG_MAX")


def empty_head(embedding_size: int) -> Head:
    """A head with zero classes for ``embedding_size``-d embeddings (weights D x 0, bias of length 0)."""
    return Head(weights=np.zeros((embedding_size, 0), np.float32), bias=np.zeros(0, np.float32))


def _producing_operator(graph: TFLiteGraph, output: int) -> tuple[str, list[str]]:
    """The operator that computes the embedding behind any pass-through tail, and that tail."""
    position, name, tail = graph.producer_behind(output, _PASS_THROUGH)
    if position is None:
        return ("graph input" if name is None else "a long chain of reshapes"), tail
    if name in _SCORE_OPERATORS:
        raise IncompatibleModelError(
            f"the model's output {graph.tensor_name(output)!r} comes from {name}: these are class scores, not an "
            "embedding. Import it as a classifier with --labels LABELS.txt (one class name per line), or give "
            "the feature extractor without its classifier"
        )
    return name, tail


def import_tflite_extractor(content: bytes, options: ImportOptions = ImportOptions()) -> ImportedClassifier:
    """Make a headless TFLite model's output the bundle embedding; the head has zero classes.

    Args:
        content: the .tflite file's bytes.
        options: how to read the model's input (see :class:`ImportOptions`).

    Returns:
        An :class:`ImportedClassifier` whose ``head`` has zero classes and whose backbone
        outputs the original model's output as a float32 (batch, D) ``"embedding"``.

    Raises:
        ConversionError: the file is not a readable TFLite model, or the rewritten one does not run.
        IncompatibleModelError: the model has several inputs/outputs, a non-image input, a
            spatial feature map or class scores (SOFTMAX, LOGISTIC) as output, or custom operators.
        InputError: per-channel mean/std given (ONNX imports only).
    """
    model = read_tflite_model(content)
    graph = TFLiteGraph(model)
    image_input, output, shape = _image_and_embedding(graph, options)
    producer, tail = _producing_operator(graph, output)
    input_dtype = graph.tensor_dtype(image_input)
    if input_dtype not in ("float32", "uint8", "int8"):
        raise IncompatibleModelError(f"the model input has type {input_dtype}; edgeadapt supports float32, uint8, int8")
    scales, zero_points, _ = graph.quantization(image_input)
    height, width, channels = graph.tensor_shape(image_input)[1:]
    spec, source = input_spec_from_quantization(
        height, width, channels, input_dtype,
        float(scales[0]) if scales.size else 0.0, int(zero_points[0]) if scales.size else 0, options,
    )
    size = int(np.prod(shape[1:]))
    output_name = graph.tensor_name(output)
    cut = cut_at_embedding(graph, output)
    backbone_content = write_tflite_model(model)
    described = inspect_tflite(backbone_content)
    if described.output.dtype != "float32":
        raise ConversionError(f"the rewritten extractor has a {described.output.dtype} output; expected float32")
    _check_builtin_only(backbone_content)
    check_tflite_runs(backbone_content, size, "headless TFLite extractor")
    logger.info("imported headless TFLite extractor: %d-d embedding %r produced by %s", size, output_name, producer)
    return ImportedClassifier(
        source_format="tflite",
        backbone=described,
        head=empty_head(size),
        input_spec=spec,
        head_operator=f"none: headless, the output {output_name!r} ({producer}) is the {size}-d embedding",
        tail=tail,
        output_kind="embedding",
        normalization_source=source,
        details={
            "headless": True,
            "embedding_tensor": output_name,
            "embedding_producer": producer,
            "embedding_tensor_type": cut["embedding_tensor_type"],
            "appended_operators": cut["appended"],
            "original_input": {"dtype": input_dtype, "scale": float(scales[0]) if scales.size else 0.0,
                               "zero_point": int(zero_points[0]) if scales.size else 0},
        },
    )


def _image_and_embedding(graph: TFLiteGraph, options: ImportOptions) -> tuple[int, int, list[int]]:
    """(the image input, the embedding output, its shape) of a headless model; refuses anything else.

    One NHWC image input of 1 or 3 channels, one (1, D) or (1, 1, 1, D) output, no per-channel
    mean/std in ``options`` (ONNX imports only).
    """
    inputs, outputs = graph.inputs, graph.outputs
    if len(inputs) != 1:
        raise IncompatibleModelError(f"the model has {len(inputs)} inputs; an image feature extractor takes one image")
    input_shape = graph.tensor_shape(inputs[0])
    if len(input_shape) != 4 or input_shape[3] not in (1, 3):
        raise IncompatibleModelError(
            f"the model input {graph.tensor_name(inputs[0])!r} has shape {input_shape}; edgeadapt imports image "
            "models with an NHWC input of 1 or 3 channels"
        )
    if len(outputs) != 1:
        raise IncompatibleModelError(
            f"the model has {len(outputs)} outputs; a feature extractor has one embedding output (a detection or "
            "multi-task model cannot be imported)"
        )
    output = outputs[0]
    shape = graph.tensor_shape(output)
    if len(shape) == 4 and shape[1] * shape[2] != 1:
        raise IncompatibleModelError(
            f"the model's output {graph.tensor_name(output)!r} is a {shape[1]}x{shape[2]}x{shape[3]} feature map, not "
            "an embedding; end the extractor in a global average pooling (or give a classifier with --labels)"
        )
    if len(shape) not in (2, 4) or (len(shape) == 2 and shape[1] < 1):
        raise IncompatibleModelError(
            f"the model's output {graph.tensor_name(output)!r} has shape {shape}; an embedding is (1, D) or (1, 1, 1, D)"
        )
    if options.channel_mean is not None:
        raise InputError("per-channel mean/std normalisation is supported for ONNX imports only")
    return inputs[0], output, shape
