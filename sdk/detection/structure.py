"""Read the structure of an SSD-style detector ``.tflite``, by graph structure, not tensor names.

An SSD ends in the ``TFLite_Detection_PostProcess`` custom operator, whose three inputs are
the box encodings, the class scores and the (constant) anchors::

    feature map p --CONV_2D--> [1,H,W,A*C] --RESHAPE--> [1,H*W*A,C] --+
    feature map q --CONV_2D--> ...                                    +--CONCATENATION(axis 1)
                                                                           --> [LOGISTIC] --> scores [1,N,C]
    boxes [1,N,4], scores [1,N,C], anchors [N,4] --TFLite_Detection_PostProcess--> boxes, classes, scores, count

:func:`read_ssd` walks back from the scores input of the post-process operator to find every
class predictor (a linear convolution without activation), the feature map it reads, its
anchors per location and where its anchors start in the concatenated list. It refuses, with
an :class:`~edgeadapt.device.errors.IncompatibleModelError` that says why:

- a model without ``TFLite_Detection_PostProcess`` (a classifier, a YOLO/raw-head detector);
- a class head shared across feature maps (EfficientDet/RetinaNet style) or anything but
  RESHAPE/CONCATENATION/LOGISTIC/QUANTIZE between the predictors and the post-process;
- class predictors that are not plain linear convolutions (activation, stride, dilation).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from edgeadapt.device.errors import IncompatibleModelError

POSTPROCESS_OP = "TFLite_Detection_PostProcess"
#: Operators allowed on the score path between the class predictors and the post-process.
_PASS_THROUGH = ("LOGISTIC", "QUANTIZE", "DEQUANTIZE", "RESHAPE", "SQUEEZE")
_OPTION_DEFAULTS = {"detections_per_class": 100, "use_regular_nms": False, "max_classes_per_detection": 1}


@dataclass(frozen=True)
class PostProcessOptions:
    """The custom options of ``TFLite_Detection_PostProcess`` (a flexbuffer map).

    ``raw`` keeps every key as stored (unknown keys survive a rewrite).
    """

    num_classes: int
    max_detections: int
    max_classes_per_detection: int
    detections_per_class: int
    use_regular_nms: bool
    nms_score_threshold: float
    nms_iou_threshold: float
    y_scale: float
    x_scale: float
    h_scale: float
    w_scale: float
    raw: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_flexbuffer(cls, data: bytes | None) -> PostProcessOptions:
        """Parse the operator's custom options.

        Raises:
            IncompatibleModelError: the options are missing or lack a required key.
        """
        from flatbuffers import flexbuffers

        if data is None or len(data) == 0:
            raise IncompatibleModelError(f"the {POSTPROCESS_OP} operator has no options; the file is not a valid SSD export")
        raw = dict(flexbuffers.Loads(np.asarray(data, dtype=np.uint8).tobytes()))
        values = {**_OPTION_DEFAULTS, **raw}
        missing = [key for key in ("num_classes", "max_detections", "nms_score_threshold", "nms_iou_threshold",
                                   "y_scale", "x_scale", "h_scale", "w_scale") if key not in values]
        if missing:
            raise IncompatibleModelError(f"the {POSTPROCESS_OP} options lack {missing}; re-export the detector")
        return cls(
            num_classes=int(values["num_classes"]), max_detections=int(values["max_detections"]),
            max_classes_per_detection=int(values["max_classes_per_detection"]),
            detections_per_class=int(values["detections_per_class"]),
            use_regular_nms=bool(values["use_regular_nms"]),
            nms_score_threshold=float(values["nms_score_threshold"]),
            nms_iou_threshold=float(values["nms_iou_threshold"]),
            y_scale=float(values["y_scale"]), x_scale=float(values["x_scale"]),
            h_scale=float(values["h_scale"]), w_scale=float(values["w_scale"]), raw=raw,
        )

    def to_flexbuffer(self, num_classes: int | None = None, use_regular_nms: bool | None = None) -> bytes:
        """The options as a flexbuffer map, with ``num_classes`` / ``use_regular_nms`` replaced."""
        from flatbuffers import flexbuffers

        raw = dict(self.raw)
        raw["num_classes"] = int(self.num_classes if num_classes is None else num_classes)
        if use_regular_nms is not None:
            raw["use_regular_nms"] = bool(use_regular_nms)
            raw.setdefault("detections_per_class", self.detections_per_class)
        return bytes(flexbuffers.Dumps(raw))


@dataclass(frozen=True)
class ClassPredictor:
    """One class-prediction convolution and where its outputs go.

    Anchor ``anchor_offset + (y * width + x) * anchors_per_location + a`` takes its class
    scores from output channels ``a * C .. a * C + C - 1`` of this convolution at ``(y, x)``.
    """

    conv_operator: int
    reshape_operators: tuple[int, ...]
    feature_tensor: int
    weights_tensor: int
    bias_tensor: int
    output_tensor: int
    height: int
    width: int
    depth: int
    kernel: tuple[int, int]
    padding: str
    anchors_per_location: int
    anchor_offset: int

    @property
    def num_anchors(self) -> int:
        return self.height * self.width * self.anchors_per_location


@dataclass
class SSDStructure:
    """What :func:`read_ssd` found in a detector (tensor/operator indices refer to ``graph``)."""

    graph: Any  # edgeadapt.converters.tflite_import.TFLiteGraph
    postprocess_operator: int
    options: PostProcessOptions
    box_tensor: int
    score_tensor: int
    anchor_tensor: int
    score_path_tensors: tuple[int, ...]
    predictors: tuple[ClassPredictor, ...]
    scores_per_anchor: int
    anchors: np.ndarray  # (N, 4) float32: ycenter, xcenter, height, width (normalised)
    input_tensor: int
    input_shape: tuple[int, int, int]
    input_dtype: str
    input_quantization: tuple[float, int]

    @property
    def label_offset(self) -> int:
        """1 when score column 0 is the background class, 0 when there is none."""
        return self.scores_per_anchor - self.options.num_classes

    @property
    def num_anchors(self) -> int:
        return int(self.anchors.shape[0])

    def summary(self) -> dict[str, Any]:
        """A JSON-ready description (for logs and ``--json``)."""
        return {
            "input": list(self.input_shape), "input_dtype": self.input_dtype, "num_classes": self.options.num_classes,
            "scores_per_anchor": self.scores_per_anchor, "anchors": self.num_anchors,
            "regular_nms": self.options.use_regular_nms, "max_detections": self.options.max_detections,
            "predictors": [{"feature_map": [p.height, p.width, p.depth], "kernel": list(p.kernel),
                            "anchors_per_location": p.anchors_per_location} for p in self.predictors],
        }


def _refuse_non_detector(graph: Any) -> None:
    outputs = graph.outputs
    if not outputs:
        raise IncompatibleModelError(f"the model has no outputs and no {POSTPROCESS_OP} operator; not a detector")
    shapes = [graph.tensor_shape(index) for index in outputs]
    customs = sorted({graph.operator_name(op) for op in graph.subgraph.operators if graph.is_custom(op)})
    if customs:
        raise IncompatibleModelError(
            f"the model ends in custom operator(s) {customs}, not {POSTPROCESS_OP}; only SSD-style detectors "
            "with the TFLite post-process operator are supported")
    if len(outputs) == 1 and (len(shapes[0]) == 2 or (len(shapes[0]) == 4 and shapes[0][1:3] == [1, 1])):
        raise IncompatibleModelError(
            f"this is a classifier (one output of shape {shapes[0]}), not a detector; add classes to a "
            "classifier with `edgeadapt import` and `edgeadapt add-classes`")
    raise IncompatibleModelError(
        f"the model has no {POSTPROCESS_OP} operator (outputs {shapes}); raw-head detectors such as YOLO "
        "(boxes and scores decoded outside the graph) are not supported: export the SSD with its post-process op")


def _producer(graph: Any, producers: dict[int, int], tensor: int) -> tuple[int, Any] | tuple[None, None]:
    position = producers.get(int(tensor))
    return (position, graph.subgraph.operators[position]) if position is not None else (None, None)


def _trace_predictor(graph: Any, producers: dict[int, int], tensor: int, path: list[int]) -> tuple[int, list[int]]:
    """Follow RESHAPE/QUANTIZE back to the class-predictor convolution; (conv position, reshape positions)."""
    reshapes = []
    while True:
        position, operator = _producer(graph, producers, tensor)
        if operator is None:
            raise IncompatibleModelError(
                f"the class scores come from {graph.tensor_name(tensor)!r}, which no operator computes; "
                "this is not an SSD class head")
        name = graph.operator_name(operator)
        if name == "CONV_2D":
            return position, reshapes
        if name in ("RESHAPE", "QUANTIZE", "DEQUANTIZE", "SQUEEZE"):
            reshapes.append(position)
            path.append(int(tensor))
            tensor = int(operator.inputs[0])
            continue
        raise IncompatibleModelError(
            f"unsupported detection head: a {name} operator sits between a class predictor and the post-process "
            "(EfficientDet/RetinaNet/YOLO-style heads are not supported; SSD heads end in CONV_2D -> RESHAPE)")


def _predictor(graph: Any, conv_position: int, reshapes: list[int], class_width: int) -> dict[str, Any]:
    schema = graph.schema
    operator = graph.subgraph.operators[conv_position]
    inputs = [int(value) for value in operator.inputs]
    if len(inputs) < 3 or inputs[2] < 0:
        raise IncompatibleModelError("a class predictor convolution has no bias; re-export the detector")
    feature, weights, bias = inputs[:3]
    if graph.buffer_data(weights) is None or graph.buffer_data(bias) is None:
        raise IncompatibleModelError(
            "a class predictor's weights are computed at run time (not constants); cannot add rows to it")
    options = operator.builtinOptions
    if options is None or options.fusedActivationFunction != schema.ActivationFunctionType.NONE:
        raise IncompatibleModelError("a class predictor has a fused activation; SSD class predictors are linear")
    if options.strideH != 1 or options.strideW != 1 or options.dilationHFactor != 1 or options.dilationWFactor != 1:
        raise IncompatibleModelError("a class predictor convolution has stride or dilation != 1; not supported")
    output = int(operator.outputs[0])
    out_shape = graph.tensor_shape(output)
    feature_shape = graph.tensor_shape(feature)
    weight_shape = graph.tensor_shape(weights)
    if len(out_shape) != 4 or len(feature_shape) != 4 or out_shape[0] != 1:
        raise IncompatibleModelError(f"a class predictor has output shape {out_shape}; expected [1, H, W, A*C]")
    channels = out_shape[3]
    if channels % class_width:
        raise IncompatibleModelError(
            f"a class predictor has {channels} output channels, not a multiple of the {class_width} scores per anchor")
    return {
        "conv_operator": conv_position, "reshape_operators": tuple(reshapes), "feature_tensor": feature,
        "weights_tensor": weights, "bias_tensor": bias, "output_tensor": output,
        "height": out_shape[1], "width": out_shape[2], "depth": feature_shape[3],
        "kernel": (weight_shape[1], weight_shape[2]),
        "padding": "SAME" if options.padding == schema.Padding.SAME else "VALID",
        "anchors_per_location": channels // class_width,
    }


def _score_branches(graph: Any, producers: dict[int, int], score_tensor: int) -> tuple[list[int], list[int]]:
    """(the tensors concatenated into the scores, one per class predictor; the score path's tensors so far)."""
    path: list[int] = [score_tensor]
    tensor = score_tensor
    while True:  # walk back through activation/quantization to the concatenation
        _, operator = _producer(graph, producers, tensor)
        if operator is None:
            raise IncompatibleModelError("the class scores are a model input, not computed by a class head")
        name = graph.operator_name(operator)
        if name in ("LOGISTIC", "QUANTIZE", "DEQUANTIZE"):
            tensor = int(operator.inputs[0])
            path.append(tensor)
            continue
        break
    if name == "CONCATENATION":
        return [int(value) for value in operator.inputs], path
    path.pop()
    return [tensor], path


def _class_predictors(graph: Any, producers: dict[int, int], branches: list[int], path: list[int],
                      width: int) -> list[ClassPredictor]:
    """The class predictor convolution of each score branch, with its first anchor; refuses shared class nets."""
    found_predictors = []
    seen_weights: dict[bytes, int] = {}
    offset = 0
    for branch in branches:
        conv_position, reshapes = _trace_predictor(graph, producers, branch, path)
        details = _predictor(graph, conv_position, reshapes, width)
        # one tensor for several levels, or the same weights stored once per level: a shared class net
        weights = graph.buffer_data(details["weights_tensor"]).tobytes()
        if weights in seen_weights:
            raise IncompatibleModelError(
                "the class head is shared across feature maps (EfficientDet/RetinaNet style: the same class-net "
                "weights on every level); only SSD heads with one class predictor per feature map are supported")
        seen_weights[weights] = conv_position
        predictor = ClassPredictor(**details, anchor_offset=offset)
        found_predictors.append(predictor)
        offset += predictor.num_anchors
    return found_predictors


def read_ssd(graph: Any) -> SSDStructure:
    """Find the post-process options, anchors and class predictors of an SSD detector.

    Args:
        graph: a :class:`~edgeadapt.converters.tflite_import.TFLiteGraph` of the detector.

    Returns:
        The :class:`SSDStructure`.

    Raises:
        IncompatibleModelError: the model is not an SSD-style detector this module can extend.
    """
    operators = graph.subgraph.operators
    found = [position for position, op in enumerate(operators) if graph.operator_name(op) == POSTPROCESS_OP]
    if not found:
        _refuse_non_detector(graph)
    if len(found) > 1:
        raise IncompatibleModelError(f"the model has {len(found)} {POSTPROCESS_OP} operators; expected one")
    position = found[0]
    post = operators[position]
    inputs = [int(value) for value in post.inputs]
    if len(inputs) != 3:
        raise IncompatibleModelError(f"{POSTPROCESS_OP} has {len(inputs)} inputs; expected boxes, scores, anchors")
    box_tensor, score_tensor, anchor_tensor = inputs
    options = PostProcessOptions.from_flexbuffer(post.customOptions)
    score_shape = graph.tensor_shape(score_tensor)
    if len(score_shape) != 3:
        raise IncompatibleModelError(f"the scores input has shape {score_shape}; expected [1, anchors, classes]")
    width = score_shape[2]
    if width - options.num_classes not in (0, 1):
        raise IncompatibleModelError(
            f"the scores have {width} columns for num_classes {options.num_classes}; expected num_classes (+1 background)")
    if graph.buffer_data(anchor_tensor) is None:
        raise IncompatibleModelError("the anchors are not a constant tensor; cannot match boxes to anchors")
    anchors = graph.constant(anchor_tensor).reshape(-1, 4).astype(np.float32)

    producers = graph.producers()
    branches, path = _score_branches(graph, producers, score_tensor)
    found_predictors = _class_predictors(graph, producers, branches, path, width)
    offset = sum(predictor.num_anchors for predictor in found_predictors)
    if offset != anchors.shape[0] or score_shape[1] != offset:
        raise IncompatibleModelError(
            f"the class predictors cover {offset} anchors but the model has {anchors.shape[0]} anchors and "
            f"{score_shape[1]} score rows; unsupported head layout")
    input_tensor = graph.inputs[0]
    in_shape = graph.tensor_shape(input_tensor)
    if len(in_shape) != 4 or in_shape[3] not in (1, 3):
        raise IncompatibleModelError(f"the detector input has shape {in_shape}; expected [1, H, W, 3]")
    scales, zero_points, _ = graph.quantization(input_tensor)
    return SSDStructure(
        graph=graph, postprocess_operator=position, options=options, box_tensor=box_tensor, score_tensor=score_tensor,
        anchor_tensor=anchor_tensor, score_path_tensors=tuple(dict.fromkeys(path)), predictors=tuple(found_predictors),
        scores_per_anchor=width, anchors=anchors, input_tensor=input_tensor,
        input_shape=(in_shape[1], in_shape[2], in_shape[3]), input_dtype=graph.tensor_dtype(input_tensor),
        input_quantization=(float(scales[0]) if scales.size else 0.0, int(zero_points[0]) if zero_points.size else 0),
    )


def load_ssd(content: bytes) -> SSDStructure:
    """Parse ``.tflite`` bytes and read its SSD structure (see :func:`read_ssd`).

    Raises:
        ConversionError: the file is not a loadable TFLite model.
        IncompatibleModelError: it is not an SSD-style detector.
    """
    from edgeadapt.converters.tflite_import import TFLiteGraph, read_tflite_model

    return read_ssd(TFLiteGraph(read_tflite_model(content)))
