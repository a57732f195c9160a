"""Import a third-party TFLite classifier: cut it into a backbone file and a float32 head.

A classifier ``.tflite`` ends in a linear layer that maps an embedding (D values) to C class
scores, usually followed by a tail of RESHAPE / SQUEEZE / SOFTMAX / QUANTIZE operators::

    image -> ... backbone ... -> embedding (1x1xD or D) -> FULLY_CONNECTED or 1x1 CONV_2D
          -> [RESHAPE | SQUEEZE | QUANTIZE | DEQUANTIZE]* -> [SOFTMAX] -> [QUANTIZE] -> output

:func:`import_tflite_classifier` finds that head, dequantizes its weights to a float32
:class:`~edgeadapt.device.head.Head` (``W``: D x C, ``bias``: C) and rewrites the flatbuffer
so that the backbone ends at the embedding: a standalone ``.tflite`` with builtin operators
only, whose output is a float32 ``(batch, D)`` tensor named ``"embedding"`` (a RESHAPE and a
DEQUANTIZE are appended at the cut for quantized models), with every operator, tensor and
buffer the embedding does not need dropped. The input quantization of uint8/int8 models is
carried over into the :class:`~edgeadapt.device.manifest.InputSpec` so that the device maps a
uint8 pixel to exactly the integer the original model was fed.

The flatbuffer is edited through the object API generated from the TFLite schema
(``ai_edge_litert.schema_py_generated``, or TensorFlow's copy), host side only. TensorFlow
is not imported by this module.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgeadapt.converters.model_info import ExportedModel, check_tflite_runs, inspect_tflite, tflite_interpreter
from edgeadapt.converters.tflite_graph import (  # noqa: F401 (re-exported: the flatbuffer layer)
    SIGNATURE_KEY,
    TFLiteGraph,
    builtin_operator_names,
    read_tflite_model,
    tensor_type_names,
    tflite_schema,
    write_tflite_model,
)
from edgeadapt.device.errors import ConversionError, IncompatibleModelError, InputError
from edgeadapt.device.head import Head
from edgeadapt.device.manifest import InputSpec
from edgeadapt.device.preprocessing import InputQuantizer

logger = logging.getLogger(__name__)

#: The name of the backbone's input and output tensors (and its signature keys).
INPUT_NAME = "input"
EMBEDDING_NAME = "embedding"
#: Default normalisation assumed for float models when none is given: pixel/127.5 - 1.
DEFAULT_FLOAT_SCALE = 1.0 / 127.5
DEFAULT_FLOAT_OFFSET = -1.0

# Operators that may follow the classifier's linear layer (they do not change the top-1).
_TAIL_OPERATORS = ("RESHAPE", "SQUEEZE", "QUANTIZE", "DEQUANTIZE", "SOFTMAX", "LOG_SOFTMAX")


# ----------------------------------------------------------------------------- shared types
@dataclass(frozen=True)
class ImportOptions:
    """How a third-party classifier is read.

    input_scale, input_offset: the float input of the original model is
        ``pixel * input_scale + input_offset``. For uint8/int8-input TFLite models they are
        derived from the input quantization (exact) and need not be given; for float models
        they default to pixel/127.5 - 1 (MobileNet-style) with a warning.
    channel_mean, channel_std: per-channel normalisation applied *after* the scalar one
        (``(x - mean[c]) / std[c]``), e.g. ImageNet mean/std for PyTorch-exported ONNX models
        with ``input_scale=1/255``. It is baked into the imported ONNX backbone graph.
    color_order: "RGB" or "BGR" order of the model's colour channels.
    resize: how the device fits an image to the input size ("stretch" or "center_crop").
    resample: the resize filter. Imports default to "lanczos", the antialiased resize that
        model-zoo reference pipelines (e.g. pycoral's examples) use; with "bilinear" the
        Coral cat.bmp test image comes out "Egyptian cat" instead of "tiger cat".
    input_size: (height, width) for models whose input size is dynamic.
    """

    input_scale: float | None = None
    input_offset: float | None = None
    channel_mean: tuple[float, ...] | None = None
    channel_std: tuple[float, ...] | None = None
    color_order: str = "RGB"
    resize: str = "stretch"
    resample: str = "lanczos"
    input_size: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if (self.input_scale is None) != (self.input_offset is None):
            raise InputError("give both input_scale and input_offset, or neither")
        if self.input_scale is not None and not self.input_scale > 0:
            raise InputError(f"input_scale must be positive, got {self.input_scale}")
        if (self.channel_mean is None) != (self.channel_std is None):
            raise InputError("give both channel_mean and channel_std, or neither")
        if self.channel_std is not None and any(not value > 0 for value in self.channel_std):
            raise InputError(f"channel_std values must be positive, got {self.channel_std}")

    @property
    def normalization_given(self) -> bool:
        return self.input_scale is not None


@dataclass
class ImportedClassifier:
    """A third-party classifier split into a backbone file and a float32 linear head.

    ``backbone`` is the cut model (image -> float32 (batch, D) embedding) in ``source_format``;
    ``head`` holds the dequantized weights of the original linear layer, so that
    ``softmax(head.logits(backbone(image)))`` ranks classes like the original model.
    ``details`` records what was found (head operator, tail, dropped ops, quantization).
    """

    source_format: str
    backbone: ExportedModel
    head: Head
    input_spec: InputSpec
    head_operator: str
    tail: list[str]
    output_kind: str
    normalization_source: str
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    @property
    def embedding_size(self) -> int:
        return self.head.embedding_size


def input_spec_from_quantization(
    height: int, width: int, channels: int, dtype: str, scale: float, zero_point: int, options: ImportOptions
) -> tuple[InputSpec, str]:
    """The InputSpec of a model input tensor, and where its normalisation came from.

    uint8 input: the pixel is the quantized value itself, so ``scale``/``offset`` are the
    tensor's quantization (``real = (pixel - zero_point) * scale``). int8 input: the pixel
    maps to ``pixel - 128``. Float input: the normalisation given in ``options`` or the
    MobileNet-style default. The InputQuantizer built from the result is checked to
    reproduce the exact integer mapping.
    """
    color = "GRAY" if channels == 1 else options.color_order
    if dtype in ("uint8", "int8"):
        if not scale > 0:
            raise IncompatibleModelError(
                f"the model's {dtype} input has no quantization scale; edgeadapt cannot tell how pixels map to it"
            )
        shift = 0 if dtype == "uint8" else -128
        spec_scale = float(scale)
        spec_offset = float((shift - zero_point) * scale)
        spec = InputSpec(height=height, width=width, channels=channels, color_order=color, resize=options.resize, resample=options.resample,
                         scale=spec_scale, offset=spec_offset)
        table = InputQuantizer(spec, dtype, scale, zero_point).table
        expected = (np.arange(256) + shift).astype(np.dtype(dtype))
        if not np.array_equal(table, expected):
            raise ConversionError(
                f"the {dtype} input quantization (scale {scale}, zero point {zero_point}) cannot be reproduced "
                "exactly from uint8 pixels; report this model"
            )
        if options.normalization_given and (
            not np.isclose(options.input_scale, spec_scale) or not np.isclose(options.input_offset, spec_offset)
        ):
            logger.warning(
                "ignoring the given normalisation (scale %g, offset %g): the model's %s input quantization fixes it "
                "to scale %g, offset %g", options.input_scale, options.input_offset, dtype, spec_scale, spec_offset,
            )
        return spec, "input quantization"
    if options.normalization_given:
        return (
            InputSpec(height=height, width=width, channels=channels, color_order=color, resize=options.resize, resample=options.resample,
                      scale=float(options.input_scale), offset=float(options.input_offset)),
            "given",
        )
    logger.warning(
        "the model takes float input and no normalisation was given; assuming pixel * %g + %g "
        "(MobileNet-style [-1, 1]): pass input_scale/input_offset (CLI --input-scale/--input-offset) if it differs",
        DEFAULT_FLOAT_SCALE, DEFAULT_FLOAT_OFFSET,
    )
    return (
        InputSpec(height=height, width=width, channels=channels, color_order=color, resize=options.resize, resample=options.resample,
                  scale=DEFAULT_FLOAT_SCALE, offset=DEFAULT_FLOAT_OFFSET),
        "assumed",
    )


# ----------------------------------------------------------------------------- head detection
@dataclass
class HeadLocation:
    """Where the classifier head of a TFLite graph is."""

    operator_position: int
    operator_name: str
    embedding_tensor: int
    weights_tensor: int
    bias_tensor: int
    tail: list[str]


def _describe_output(graph: TFLiteGraph) -> str:
    outputs = graph.outputs
    return ", ".join(f"{graph.tensor_name(i)!r} {graph.tensor_shape(i)}" for i in outputs)


def locate_head(graph: TFLiteGraph) -> HeadLocation:
    """Find the classifier's linear layer; raise IncompatibleModelError saying what was found instead."""
    outputs = graph.outputs
    custom = sorted({graph.operator_name(op) for op in graph.subgraph.operators if graph.is_custom(op)})
    if len(outputs) != 1:
        hint = f" (custom operators: {', '.join(custom)})" if custom else ""
        raise IncompatibleModelError(
            f"the model has {len(outputs)} outputs ({_describe_output(graph)}){hint}; an image classifier has one "
            "class-score output: this looks like a detection (boxes, classes, scores, count) or multi-task model, "
            "which edgeadapt cannot import"
        )
    output = outputs[0]
    shape = graph.tensor_shape(output)
    if len(shape) == 4 and shape[1] * shape[2] > 1:
        raise IncompatibleModelError(
            f"the model's output {graph.tensor_name(output)!r} has shape {shape}: a per-pixel map "
            "(segmentation or dense prediction), not class scores; edgeadapt imports image classifiers only"
        )
    position, name, tail = graph.producer_behind(output, _TAIL_OPERATORS)
    if position is None and name is None:
        raise IncompatibleModelError(
            f"no classifier head found: the output {graph.tensor_name(output)!r} is not computed by a "
            "FULLY_CONNECTED or 1x1 CONV_2D layer"
        )
    if position is None:
        raise IncompatibleModelError("no classifier head found: the output tail is longer than 32 operators")
    if name == "LOGISTIC":
        raise IncompatibleModelError(
            "the classifier ends in LOGISTIC (sigmoid, multi-label scores); edgeadapt imports single-label "
            "classifiers whose linear layer feeds an optional SOFTMAX"
        )
    if name in ("FULLY_CONNECTED", "CONV_2D"):
        return _check_linear(graph, position, name, tail)
    chain = " <- ".join([*reversed(tail), name]) if tail else name
    raise IncompatibleModelError(
        f"no classifier head found: the output {graph.tensor_name(output)!r} {shape} is produced by {chain}; "
        "edgeadapt looks for the last FULLY_CONNECTED, or a 1x1 CONV_2D on a pooled 1x1 map, followed only by "
        f"{'/'.join(_TAIL_OPERATORS)}. If the model is a feature extractor (its output is the embedding), import "
        "it without labels: `edgeadapt import MODEL.tflite --out B.eab` makes a bundle with zero classes"
    )


def _check_linear(graph: TFLiteGraph, position: int, name: str, tail: list[str]) -> HeadLocation:
    operator = graph.subgraph.operators[position]
    inputs = [int(index) for index in operator.inputs]
    options = operator.builtinOptions
    activation = int(getattr(options, "fusedActivationFunction", 0) or 0)
    if activation != 0:
        activation_names = {v: k for k, v in vars(graph.schema.ActivationFunctionType).items() if not k.startswith("_")}
        raise IncompatibleModelError(
            f"the classifier {name} {graph.tensor_name(int(operator.outputs[0]))!r} has a fused "
            f"{activation_names.get(activation, activation)} activation; a linear classifier layer is needed"
        )
    embedding, weights = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else -1
    weight_shape = graph.tensor_shape(weights)
    if name == "CONV_2D":
        input_shape = graph.tensor_shape(embedding)
        if len(weight_shape) != 4 or weight_shape[1:3] != [1, 1]:
            raise IncompatibleModelError(
                f"no classifier head found: the last layer is a {weight_shape[1:3]} CONV_2D, not a 1x1 classifier"
            )
        if len(input_shape) != 4 or input_shape[1:3] != [1, 1]:
            raise IncompatibleModelError(
                f"no classifier head found: the last layer is a 1x1 CONV_2D on a {input_shape[1:3]} map, not on a "
                "pooled 1x1 map (a segmentation-style head?)"
            )
    elif len(weight_shape) != 2:
        raise IncompatibleModelError(f"FULLY_CONNECTED weights have shape {weight_shape}, expected (classes, D)")
    return HeadLocation(position, name, embedding, weights, bias, tail)


def head_from_location(graph: TFLiteGraph, location: HeadLocation) -> Head:
    """Dequantize the head's weights and bias into a float32 Head (W: D x C)."""
    weights = graph.constant(location.weights_tensor)
    classes = weights.shape[0]
    matrix = weights.reshape(classes, -1).T  # OHWI / (C, D) -> (D, C)
    if location.bias_tensor >= 0:
        bias = graph.constant(location.bias_tensor).reshape(-1)
        if bias.shape != (classes,):
            raise IncompatibleModelError(f"classifier bias has {bias.size} values for {classes} classes")
    else:
        bias = np.zeros(classes, np.float32)
    embedding_values = int(np.prod(graph.tensor_shape(location.embedding_tensor)[1:] or [0]))
    if embedding_values and embedding_values != matrix.shape[0]:
        raise IncompatibleModelError(
            f"the classifier expects {matrix.shape[0]} input values but its input tensor "
            f"{graph.tensor_name(location.embedding_tensor)!r} holds {embedding_values}"
        )
    return Head(weights=matrix.astype(np.float32), bias=bias.astype(np.float32))


# ----------------------------------------------------------------------------- cutting
def cut_at_embedding(graph: TFLiteGraph, embedding: int) -> dict[str, Any]:
    """Make ``embedding`` the graph's only output as a float32 (batch, D) tensor named "embedding".

    Appends RESHAPE (when the tensor is not 2-D) and DEQUANTIZE (when it is quantized),
    then prunes everything the output does not need. Returns what was added and dropped.
    """
    schema = graph.schema
    shape = graph.tensor_shape(embedding)
    size = int(np.prod(shape[1:])) if len(shape) > 1 else int(shape[0]) if shape else 0
    if size <= 0:
        raise IncompatibleModelError(f"the embedding tensor {graph.tensor_name(embedding)!r} has shape {shape}")
    dtype = graph.tensor_dtype(embedding)
    added = []
    current = embedding
    if len(shape) != 2:
        scales, zero_points, _ = graph.quantization(embedding)
        reshaped = graph.add_tensor(
            "edgeadapt/embedding_2d", [1, size], graph.tensor_type(embedding),
            scale=scales.tolist() if scales.size else None,
            zero_point=zero_points.tolist() if scales.size else None,
            shape_signature=[-1, size],
        )
        new_shape = graph.add_tensor("edgeadapt/embedding_shape", [2], "INT32", data=np.array([-1, size], np.int32))
        options = schema.ReshapeOptionsT()
        options.newShape = np.array([-1, size], dtype=np.int32)
        graph.add_operator("RESHAPE", [current, new_shape], [reshaped], options, "ReshapeOptions")
        current = reshaped
        added.append("RESHAPE")
    if dtype in ("uint8", "int8", "int16"):
        output = graph.add_tensor(EMBEDDING_NAME, [1, size], "FLOAT32", shape_signature=[-1, size])
        graph.add_operator("DEQUANTIZE", [current], [output], version=2 if dtype == "int8" else 1)
        current = output
        added.append("DEQUANTIZE")
    elif dtype != "float32":
        raise IncompatibleModelError(f"the embedding tensor has type {dtype}; edgeadapt needs float32 or int8/uint8")
    else:
        graph.tensor(current).name = EMBEDDING_NAME
    input_index = graph.inputs[0]
    graph.subgraph.outputs = np.asarray([current], dtype=np.int32)
    graph.subgraph.inputs = np.asarray([input_index], dtype=np.int32)
    dropped = graph.prune()
    graph.set_io(graph.inputs, graph.outputs, [INPUT_NAME], [EMBEDDING_NAME])
    graph.model.description = "edgeadapt backbone: image -> embedding (cut from an imported classifier)"
    return {"appended": added, "dropped": dropped, "embedding_tensor_type": dtype}


# ----------------------------------------------------------------------------- public API
def import_tflite_classifier(content: bytes, options: ImportOptions = ImportOptions()) -> ImportedClassifier:
    """Split a TFLite classifier into an embedding backbone and a float32 head.

    Raises :class:`ConversionError` for unreadable or truncated files and
    :class:`IncompatibleModelError` (saying what was found) for models without a
    recognisable classifier head: several outputs (detection), per-pixel outputs
    (segmentation), sigmoid outputs, or a non-linear last layer.

    Args:
        content: The ``.tflite`` file's bytes.
        options: Input normalisation, colour order, resize rule and input size.

    Returns:
        The backbone bytes, the head, the input spec and what was cut.

    Raises:
        ConversionError: Unreadable or truncated file.
        IncompatibleModelError: No recognisable classifier head (see above).
    """
    model = read_tflite_model(content)
    graph = TFLiteGraph(model)
    image_input = _image_input(graph)
    location = locate_head(graph)
    head = head_from_location(graph, location)
    spec, source, original_input = _input_spec(graph, image_input, options)
    weights_quantization = graph.quantization(location.weights_tensor)[0]
    head_description = (
        f"{location.operator_name} {graph.tensor_name(int(graph.subgraph.operators[location.operator_position].outputs[0]))!r}"
        f" ({head.embedding_size} -> {head.num_classes})"
    )
    output_kind = "probabilities" if "SOFTMAX" in location.tail else (
        "log_probabilities" if "LOG_SOFTMAX" in location.tail else "logits"
    )
    embedding_name = graph.tensor_name(location.embedding_tensor)
    cut = cut_at_embedding(graph, location.embedding_tensor)
    described = _checked_backbone(write_tflite_model(model), head.embedding_size)
    logger.info(
        "imported TFLite classifier: head %s after %s, embedding %r (%d), dropped %s",
        head_description, embedding_name, embedding_name, head.embedding_size, cut["dropped"],
    )
    return ImportedClassifier(
        source_format="tflite",
        backbone=described,
        head=head,
        input_spec=spec,
        head_operator=head_description,
        tail=location.tail,
        output_kind=output_kind,
        normalization_source=source,
        details={
            "embedding_tensor": embedding_name,
            "embedding_tensor_type": cut["embedding_tensor_type"],
            "appended_operators": cut["appended"],
            "dropped": cut["dropped"],
            "head_weights_quantized": bool(weights_quantization.size),
            "head_weights_per_channel": bool(weights_quantization.size > 1),
            "original_input": original_input,
        },
    )


def _image_input(graph: TFLiteGraph) -> int:
    """The model's one input tensor; refuses models whose input is not one NHWC image of 1 or 3 channels."""
    inputs = graph.inputs
    if len(inputs) != 1:
        raise IncompatibleModelError(
            f"the model has {len(inputs)} inputs; an image classifier takes one image tensor"
        )
    input_shape = graph.tensor_shape(inputs[0])
    if len(input_shape) != 4 or input_shape[3] not in (1, 3):
        raise IncompatibleModelError(
            f"the model input {graph.tensor_name(inputs[0])!r} has shape {input_shape}; edgeadapt imports image "
            "classifiers with an NHWC input of 1 or 3 channels"
        )
    return inputs[0]


def _input_spec(graph: TFLiteGraph, image_input: int,
                options: ImportOptions) -> tuple[InputSpec, str, dict[str, Any]]:
    """(input spec, where its normalisation came from, the original input's dtype/scale/zero point)."""
    input_dtype = graph.tensor_dtype(image_input)
    if input_dtype not in ("float32", "uint8", "int8"):
        raise IncompatibleModelError(f"the model input has type {input_dtype}; edgeadapt supports float32, uint8, int8")
    scales, zero_points, _ = graph.quantization(image_input)
    height, width, channels = graph.tensor_shape(image_input)[1:]
    if options.input_size is not None and tuple(options.input_size) != (height, width):
        logger.warning("ignoring input_size %s: the TFLite model's input is %dx%d", options.input_size, height, width)
    scale = float(scales[0]) if scales.size else 0.0
    zero_point = int(zero_points[0]) if scales.size else 0
    spec, source = input_spec_from_quantization(height, width, channels, input_dtype, scale, zero_point, options)
    if options.channel_mean is not None:
        raise InputError("per-channel mean/std normalisation is supported for ONNX imports only")
    return spec, source, {"dtype": input_dtype, "scale": scale, "zero_point": zero_point}


def _checked_backbone(backbone_content: bytes, embedding_size: int) -> ExportedModel:
    """Describe the cut backbone and check it: float32 output, builtin operators only, runs once."""
    described = inspect_tflite(backbone_content)
    if described.output.dtype != "float32":
        raise ConversionError(f"the cut backbone has a {described.output.dtype} output; expected float32")
    _check_builtin_only(backbone_content)
    _smoke_test(backbone_content, embedding_size)
    return described


def _check_builtin_only(content: bytes) -> None:
    from edgeadapt.converters.model_info import tflite_custom_operator_names

    custom = tflite_custom_operator_names(content)
    if custom:
        raise IncompatibleModelError(
            f"the backbone needs custom/Flex operators {', '.join(custom)}; device runtimes run builtin operators only"
        )


def _smoke_test(content: bytes, embedding_size: int) -> None:
    """Run the cut backbone on a batch of 2 zero images; it must give (2, D) floats."""
    check_tflite_runs(content, embedding_size, "cut TFLite backbone")


def tflite_scores(content: bytes, images: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Run an original TFLite classifier on prepared uint8 images, one at a time; (N, C) float32 scores.

    The input is quantized/normalised exactly as the device does (InputQuantizer) and the
    output is dequantized with the output tensor's quantization.
    """
    interpreter = tflite_interpreter(content)
    interpreter.allocate_tensors()
    input_details = interpreter.get_input_details()[0]
    output_details = interpreter.get_output_details()[0]
    scale, zero_point = input_details["quantization"]
    quantizer = InputQuantizer(spec, np.dtype(input_details["dtype"]).name, float(scale), int(zero_point))
    out_scale, out_zero = output_details["quantization"]
    rows = []
    for image in images:
        interpreter.set_tensor(input_details["index"], quantizer(image[None]))
        interpreter.invoke()
        values = interpreter.get_tensor(output_details["index"]).reshape(-1)
        if np.dtype(output_details["dtype"]).kind in "iu" and out_scale > 0:
            values = (values.astype(np.float32) - np.float32(out_zero)) * np.float32(out_scale)
        rows.append(values.astype(np.float32))
    return np.stack(rows)
