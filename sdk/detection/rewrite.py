"""Rewrite an SSD ``.tflite`` with more classes: new rows per anchor, old rows bit for bit.

Each class predictor has ``A * C`` output channels, anchor ``a`` owning channels
``a*C .. a*C+C-1`` (``[background, old classes...]``). New rows are interleaved per anchor,
``[background, old..., new...]``, so anchor ``a`` owns ``a*(C+K) .. a*(C+K)+C+K-1``: appending
them at the end would give every anchor after the first the wrong columns. The old rows and
their biases are copied as stored; the output quantization of every tensor on the score path
is unchanged, so the old classes' scores come out bit-identical. New rows are quantized on the
existing weight scale (per-tensor uint8/int8) or get their own scale (per-channel int8).

The post-process operator gets ``num_classes + K`` (its score width must stay
``num_classes + 1``) and the chosen NMS mode. Labels are embedded as TFLite Metadata (an
associated ``labelmap.txt`` of type TENSOR_VALUE_LABELS, index i = class i, as the TFLite Task
library reads it) plus the zip of associated files appended to the model, as the classifier's
fused export does.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from edgeadapt.detection.structure import SSDStructure
from edgeadapt.device.errors import ConversionError, IncompatibleModelError

NMS_MODES = ("regular", "fast")
EMBEDDED_LABELS_FILE = "labelmap.txt"
INFO_FILE = "edgeadapt.json"
_TENSOR_VALUE_LABELS = 3
_CONTENT_FEATURE, _CONTENT_IMAGE, _CONTENT_BOUNDING_BOX = 1, 2, 3


@dataclass
class NewRows:
    """Float weights of the new class rows of one predictor.

    ``weights``: (A, K, kh, kw, D) float32, ``bias``: (A, K) float32 (model units: logits).
    """

    weights: np.ndarray
    bias: np.ndarray


def _integer_range(dtype: str) -> tuple[int, int]:
    return {"uint8": (0, 255), "int8": (-127, 127)}.get(dtype, (0, 0))


def weight_limits(structure: SSDStructure, index: int) -> tuple[float, float] | None:
    """The float range a new row's weights can take on the predictor's existing per-tensor scale.

    ``None`` when the weights are float32 or quantized per channel (new rows get their own scale).
    """
    graph = structure.graph
    tensor = structure.predictors[index].weights_tensor
    scales, zero_points, _ = graph.quantization(tensor)
    if scales.size != 1:
        return None
    low, high = _integer_range(graph.tensor_dtype(tensor))
    return float((low - zero_points[0]) * scales[0]), float((high - zero_points[0]) * scales[0])


def logit_limits(structure: SSDStructure, index: int) -> tuple[float, float] | None:
    """The logit range the predictor's quantized output (and the score path after it) can carry.

    New-class logits above the upper end saturate: their scores are capped at ``sigmoid(high)``.
    """
    graph = structure.graph
    predictor = structure.predictors[index]
    own = [predictor.output_tensor] + [int(graph.subgraph.operators[p].outputs[0]) for p in predictor.reshape_operators]
    others = {int(graph.subgraph.operators[p].outputs[0]) for q in structure.predictors for p in q.reshape_operators}
    shared = [t for t in structure.score_path_tensors[1:] if t not in others]
    low, high = -np.inf, np.inf
    for tensor in own + shared:
        scales, zero_points, _ = graph.quantization(tensor)
        dtype = graph.tensor_dtype(tensor)
        if scales.size != 1 or dtype not in ("uint8", "int8"):
            continue
        qlow, qhigh = (0, 255) if dtype == "uint8" else (-128, 127)
        low = max(low, (qlow - zero_points[0]) * scales[0])
        high = min(high, (qhigh - zero_points[0]) * scales[0])
    return None if not np.isfinite(low) else (float(low), float(high))


def _set_data(graph: Any, tensor: int, values: np.ndarray) -> None:
    buffer = graph.model.buffers[int(graph.tensor(tensor).buffer)]
    buffer.data = np.frombuffer(np.ascontiguousarray(values).astype(values.dtype.newbyteorder("<")).tobytes(),
                                dtype=np.uint8).copy()
    graph.tensor(tensor).shape = np.asarray(values.shape, dtype=np.int32)


def _grow_last_dim(graph: Any, tensor: int, old: int, new: int) -> None:
    node = graph.tensor(tensor)
    for attribute in ("shape", "shapeSignature"):
        shape = getattr(node, attribute)
        if shape is not None and len(shape) and int(shape[-1]) == old:
            shape = np.asarray(shape, dtype=np.int32).copy()
            shape[-1] = new
            setattr(node, attribute, shape)


def _extend_predictor(structure: SSDStructure, index: int, rows: NewRows) -> None:
    graph = structure.graph
    predictor = structure.predictors[index]
    width = structure.scores_per_anchor
    anchors = predictor.anchors_per_location
    new_weights = np.asarray(rows.weights, dtype=np.float64)
    new_bias = np.asarray(rows.bias, dtype=np.float64)
    classes = new_weights.shape[1]
    kh, kw = predictor.kernel
    if new_weights.shape != (anchors, classes, kh, kw, predictor.depth) or new_bias.shape != (anchors, classes):
        raise IncompatibleModelError(
            f"new rows of predictor {index} have shape {new_weights.shape}/{new_bias.shape}; expected "
            f"({anchors}, K, {kh}, {kw}, {predictor.depth})/({anchors}, K)")
    old_weights = graph.constant(predictor.weights_tensor, dequantize=False)
    old_bias = graph.constant(predictor.bias_tensor, dequantize=False)
    w_dtype = graph.tensor_dtype(predictor.weights_tensor)
    w_scales, w_zero, w_axis = graph.quantization(predictor.weights_tensor)
    in_scales, _, _ = graph.quantization(predictor.feature_tensor)
    if w_dtype in ("uint8", "int8"):
        low, high = _integer_range(w_dtype)
        if w_scales.size == 1:
            quantized = np.clip(np.round(new_weights / w_scales[0]) + w_zero[0], low, high)
            row_scales = np.full((anchors, classes), w_scales[0])
        elif w_axis == 0 and w_scales.size == old_weights.shape[0]:
            peak = np.abs(new_weights).reshape(anchors, classes, -1).max(axis=2)
            row_scales = np.maximum(peak / high, 1e-9)
            quantized = np.clip(np.round(new_weights / row_scales[:, :, None, None, None]), low, high)
            quant = graph.tensor(predictor.weights_tensor).quantization
            quant.scale = np.concatenate([w_scales.reshape(anchors, width), row_scales], axis=1).reshape(-1).astype(np.float32)
            quant.zeroPoint = np.zeros(anchors * (width + classes), np.int64)
            bias_quant = graph.tensor(predictor.bias_tensor).quantization
            b_scales, _, _ = graph.quantization(predictor.bias_tensor)
            bias_quant.scale = np.concatenate(
                [b_scales.reshape(anchors, width), row_scales * in_scales[0]], axis=1).reshape(-1).astype(np.float32)
            bias_quant.zeroPoint = np.zeros(anchors * (width + classes), np.int64)
        else:
            raise IncompatibleModelError(f"class predictor {index} has weights quantized along axis {w_axis}; unsupported")
        merged = np.concatenate([old_weights.reshape(anchors, width, kh, kw, -1),
                                 quantized.astype(old_weights.dtype)], axis=1)
        if in_scales.size != 1:
            raise IncompatibleModelError(f"the feature map of class predictor {index} is not quantized per tensor")
        b_scale = (row_scales * in_scales[0])
        bias_q = np.clip(np.round(new_bias / b_scale), -2**31, 2**31 - 1).astype(old_bias.dtype)
        merged_bias = np.concatenate([old_bias.reshape(anchors, width), bias_q], axis=1)
    elif w_dtype == "float32":
        merged = np.concatenate([old_weights.reshape(anchors, width, kh, kw, -1),
                                 new_weights.astype(np.float32)], axis=1)
        merged_bias = np.concatenate([old_bias.reshape(anchors, width), new_bias.astype(np.float32)], axis=1)
    else:
        raise IncompatibleModelError(f"class predictor {index} has {w_dtype} weights; supported: uint8, int8, float32")
    _set_data(graph, predictor.weights_tensor, merged.reshape(anchors * (width + classes), kh, kw, -1))
    _set_data(graph, predictor.bias_tensor, merged_bias.reshape(-1))
    _grow_last_dim(graph, predictor.output_tensor, anchors * width, anchors * (width + classes))


def _grow_score_path(structure: SSDStructure, classes: int) -> None:
    graph = structure.graph
    width = structure.scores_per_anchor
    for tensor in structure.score_path_tensors:
        _grow_last_dim(graph, tensor, width, width + classes)
    for predictor in structure.predictors:
        for position in predictor.reshape_operators:
            operator = graph.subgraph.operators[position]
            if graph.operator_name(operator) != "RESHAPE":
                continue
            if len(operator.inputs) > 1 and operator.inputs[1] >= 0 and graph.buffer_data(int(operator.inputs[1])) is not None:
                shape_tensor = int(operator.inputs[1])
                target = graph.constant(shape_tensor, dequantize=False).astype(np.int32).copy()
                if target.size and target[-1] == width:
                    target[-1] = width + classes
                    graph.model.buffers[int(graph.tensor(shape_tensor).buffer)].data = np.frombuffer(
                        target.astype("<i4").tobytes(), dtype=np.uint8).copy()
            options = operator.builtinOptions
            if options is not None and getattr(options, "newShape", None) is not None and len(options.newShape):
                shape = np.asarray(options.newShape, dtype=np.int32).copy()
                if shape[-1] == width:
                    shape[-1] = width + classes
                    options.newShape = shape


def set_postprocess(structure: SSDStructure, num_classes: int, nms: str) -> None:
    """Write ``num_classes`` and the NMS mode (``regular`` = per class, ``fast`` = top class per anchor)."""
    if nms not in NMS_MODES:
        raise IncompatibleModelError(f"NMS mode {nms!r} is unknown; choose one of {', '.join(NMS_MODES)}")
    operator = structure.graph.subgraph.operators[structure.postprocess_operator]
    options = structure.options.to_flexbuffer(num_classes=num_classes, use_regular_nms=nms == "regular")
    operator.customOptions = np.frombuffer(options, dtype=np.uint8).copy()


def add_rows(structure: SSDStructure, rows: Sequence[NewRows], nms: str = "regular") -> None:
    """Add the new class rows to every class predictor of ``structure.graph`` (in place).

    Args:
        structure: the detector, as read by :func:`~edgeadapt.detection.structure.read_ssd`.
        rows: one :class:`NewRows` per predictor, in predictor order (K may be 0).
        nms: ``regular`` (per-class NMS, the default) or ``fast``.

    Raises:
        IncompatibleModelError: shapes or quantization do not fit.
    """
    if len(rows) != len(structure.predictors):
        raise IncompatibleModelError(f"{len(rows)} row sets for {len(structure.predictors)} class predictors")
    classes = int(rows[0].weights.shape[1]) if rows else 0
    if classes:
        for index, predictor_rows in enumerate(rows):
            _extend_predictor(structure, index, predictor_rows)
        _grow_score_path(structure, classes)
    set_postprocess(structure, structure.options.num_classes + classes, nms)


# ----------------------------------------------------------------------------- metadata
def detector_metadata_flatbuffer(labels: Sequence[str], structure: SSDStructure, info: dict[str, Any]) -> bytes:
    """A TFLite Support ``ModelMetadata`` flatbuffer for an SSD detector (outputs: location, category, score, count)."""
    from edgeadapt.converters.tflite_metadata import METADATA_PARSER_VERSION, FlatBufferWriter

    writer = FlatBufferWriter()
    builder = writer.builder
    height, width, _ = structure.input_shape
    label_file = writer.table({0: ("offset", writer.string(EMBEDDED_LABELS_FILE)),
                               1: ("offset", writer.string("Class names, line i = class index i of the category output")),
                               2: ("int8", _TENSOR_VALUE_LABELS)})
    info_file = writer.table({0: ("offset", writer.string(INFO_FILE)),
                              1: ("offset", writer.string("edgeadapt description: labels, classes added, NMS mode")),
                              2: ("int8", 1)})
    size = writer.table({0: ("uint32", width), 1: ("uint32", height)})
    image_properties = writer.table({0: ("int8", 1), 1: ("offset", size)})
    input_content = writer.table({0: ("uint8", _CONTENT_IMAGE), 1: ("offset", image_properties)})
    normalization = writer.table({0: ("offset", writer.floats([127.5])), 1: ("offset", writer.floats([127.5]))})
    process_unit = writer.table({0: ("uint8", 1), 1: ("offset", normalization)})
    input_metadata = writer.table({
        0: ("offset", writer.string("image")),
        1: ("offset", writer.string(f"RGB image {height}x{width}, stretched; {structure.input_dtype} pixels")),
        3: ("offset", input_content), 4: ("offset", writer.offsets([process_unit])),
    })
    builder.StartVector(4, 4, 4)
    for value in reversed([1, 0, 3, 2]):  # ymin, xmin, ymax, xmax
        builder.PrependUint32(value)
    box_index = builder.EndVector()
    box_properties = writer.table({0: ("offset", box_index), 1: ("int8", 1)})  # BOUNDARIES, RATIO
    range_table = writer.table({0: ("uint32", 2), 1: ("uint32", 2)})
    location_content = writer.table({0: ("uint8", _CONTENT_BOUNDING_BOX), 1: ("offset", box_properties),
                                     2: ("offset", range_table)})

    def feature_content() -> int:
        return writer.table({0: ("uint8", _CONTENT_FEATURE), 1: ("offset", writer.table({})),
                             2: ("offset", writer.table({0: ("uint32", 2), 1: ("uint32", 2)}))})

    outputs = [
        writer.table({0: ("offset", writer.string("location")), 1: ("offset", writer.string(
            "Boxes ymin, xmin, ymax, xmax, normalised to 0..1")), 3: ("offset", location_content)}),
        writer.table({0: ("offset", writer.string("category")), 1: ("offset", writer.string(
            "Class index of each box; line i of labelmap.txt")), 3: ("offset", feature_content()),
            6: ("offset", writer.offsets([label_file]))}),
        writer.table({0: ("offset", writer.string("score")), 1: ("offset", writer.string(
            "Score of each box (sigmoid)")), 3: ("offset", feature_content())}),
        writer.table({0: ("offset", writer.string("number of detections")), 1: ("offset", writer.string(
            "Number of valid boxes")), 3: ("offset", writer.table({0: ("uint8", _CONTENT_FEATURE),
                                                                   1: ("offset", writer.table({}))}))}),
    ]
    subgraph = writer.table({0: ("offset", writer.string("object_detector")),
                             2: ("offset", writer.offsets([input_metadata])),
                             3: ("offset", writer.offsets(outputs))})
    root = writer.table({
        0: ("offset", writer.string("SSD detector, classes added by edgeadapt")),
        1: ("offset", writer.string(f"SSD detector with {len(labels)} classes; added: {', '.join(info.get('added', []))}")),
        2: ("offset", writer.string("1")), 3: ("offset", writer.offsets([subgraph])),
        4: ("offset", writer.string("edgeadapt")), 6: ("offset", writer.offsets([info_file])),
        7: ("offset", writer.string(METADATA_PARSER_VERSION)),
    })
    return writer.finish(root, b"M001")


def serialize(structure: SSDStructure, labels: Sequence[str] | None = None, info: dict[str, Any] | None = None) -> bytes:
    """The model as ``.tflite`` bytes; with ``labels``, TFLite metadata and associated files are embedded.

    Raises:
        ConversionError: the model cannot be serialised.
    """
    from edgeadapt.converters.tflite_metadata import append_associated_files
    from edgeadapt.converters.tflite_import import write_tflite_model

    graph = structure.graph
    model = graph.model
    if labels is None:
        return write_tflite_model(model)
    info = dict(info or {})
    info["labels"] = list(labels)
    metadata = detector_metadata_flatbuffer(labels, structure, info)
    entry = graph.schema.MetadataT()
    entry.name = "TFLITE_METADATA"
    entry.buffer = graph.add_buffer(metadata)
    names = [(m.name.decode() if isinstance(m.name, bytes) else m.name) for m in model.metadata or []]
    model.metadata = [m for m, name in zip(model.metadata or [], names) if name != "TFLITE_METADATA"] + [entry]
    try:
        content = write_tflite_model(model)
    except Exception as error:  # flatbuffers raises plain exceptions on bad object trees
        raise ConversionError(f"cannot write the extended detector: {error}") from error
    return append_associated_files(content, {
        EMBEDDED_LABELS_FILE: ("\n".join(labels) + "\n").encode("utf-8"),
        INFO_FILE: json.dumps(info, indent=2).encode("utf-8"),
    })
