"""A tiny SSD-shaped uint8 ``.tflite`` detector, written with the TFLite schema object API (no TensorFlow).

Graph (like the COCO SSD MobileNet export, at 16x16 with 160 anchors)::

    image uint8 [1,16,16,3] -> CONV 3x3/2 relu6 -> map1 [1,8,8,6] -> CONV 3x3/2 relu6 -> map2 [1,4,4,6]
    map1 -> box CONV 1x1 -> RESHAPE [1,128,4]      map1 -> class CONV 3x3 -> RESHAPE [1,128,C]
    map2 -> box CONV 1x1 -> RESHAPE [1,32,4]       map2 -> class CONV 1x1 -> RESHAPE [1,32,C]
    CONCATENATION(boxes), CONCATENATION(classes) -> LOGISTIC -> TFLite_Detection_PostProcess (+ anchors)

The feature maps hold hand-made colour channels (red, green, blue, red-ness, blue-ness,
green-ness), so the old classes are real detectors: class 0 "blue" (blue squares) and class 1
"green" (green squares). The box predictors output zeros, so a decoded box is its anchor:
anchors are 0.25 and 0.375 of the image on map1, 0.5 and 0.75 on map2 (uint8, scale 1/128: exact). ``variant`` builds the
inputs the detector reader must refuse: ``"classifier"``, ``"raw_head"`` (no post-process op,
YOLO-like outputs), ``"shared_head"`` (one class-weight tensor for both maps) and
``"duplicated_head"`` (the same class weights stored once per map, as an EfficientDet export
of its shared class net may look).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SIZE = 16
ANCHORS = 2
OLD_CLASSES = ("blue", "green")
COLOURS = {"red": (230, 20, 20), "blue": (20, 20, 230), "green": (20, 230, 20)}
_FEATURE_SCALE = 2.0 / 255


def _quantize(values: np.ndarray, low: float, high: float) -> tuple[np.ndarray, float, int]:
    scale = (high - low) / 255.0
    zero_point = round(-low / scale)
    return np.clip(np.round(values / scale) + zero_point, 0, 255).astype(np.uint8), scale, zero_point


def _feature_weights(kind: str) -> np.ndarray:
    """[6, 3, 3, C_in] averaging colour filters (map1 from RGB, map2 from map1)."""
    if kind == "rgb":
        rows = [(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, -1, 0), (-1, 0, 1), (-1, 1, 0)]
        weights = np.zeros((6, 3, 3, 3), np.float32)
        for out, row in enumerate(rows):
            weights[out, :, :, :] = np.asarray(row, np.float32) / 9.0
        return weights
    weights = np.zeros((6, 3, 3, 6), np.float32)
    for channel in range(6):
        weights[channel, :, :, channel] = 1.0 / 9.0
    return weights


def _anchors() -> np.ndarray:
    rows = []
    for grid, sizes in ((8, (0.25, 0.375)), (4, (0.5, 0.75))):
        for y in range(grid):
            for x in range(grid):
                for size in sizes:
                    rows.append(((y + 0.5) / grid, (x + 0.5) / grid, size, size))
    return np.asarray(rows, np.float32)


def build_tiny_ssd(path: str | Path, variant: str = "ssd", seed: int = 0, precision: str = "uint8") -> Path:
    """Write the tiny detector (or a ``variant`` that is not one) to ``path``; returns the path.

    ``precision``: ``uint8`` (per-tensor asymmetric weights, like the COCO SSD), ``int8``
    (per-channel symmetric weights, DEQUANTIZE before the post-process, as newer converters
    write) or ``float32``.
    """
    from edgeadapt.converters.tflite_import import TFLiteGraph, tflite_schema, write_tflite_model
    from flatbuffers import flexbuffers

    schema = tflite_schema()
    rng = np.random.default_rng(seed)
    model = schema.ModelT()
    model.version = 3
    model.description = "edgeadapt tiny SSD test detector"
    model.buffers = [schema.BufferT()]
    model.operatorCodes = []
    subgraph = schema.SubGraphT()
    subgraph.tensors, subgraph.operators = [], []
    model.subgraphs = [subgraph]
    graph = TFLiteGraph(model)
    kind = precision.upper()

    def activation(name: str, shape: list[int], low: float, high: float) -> int:
        if precision == "float32":
            return graph.add_tensor(name, shape, "FLOAT32")
        scale = (high - low) / 255.0
        zero_point = round(-low / scale) - (128 if precision == "int8" else 0)
        return graph.add_tensor(name, shape, kind, scale=scale, zero_point=zero_point)

    def conv(source: int, weights: np.ndarray, bias: np.ndarray, stride: int, out_shape: list[int],
             out_range: tuple[float, float], relu6: bool, name: str, weight_tensor: int | None = None) -> int:
        source_scale = graph.quantization(source)[0]
        if weight_tensor is None:
            if precision == "uint8":
                limit = max(float(np.abs(weights).max()), 1e-3)
                quantized, w_scale, w_zero = _quantize(weights, -limit, limit)
                weight_tensor = graph.add_tensor(f"{name}/weights", list(weights.shape), "UINT8", data=quantized,
                                                 scale=w_scale, zero_point=w_zero)
            elif precision == "int8":
                scales = np.maximum(np.abs(weights).reshape(weights.shape[0], -1).max(axis=1), 1e-3) / 127.0
                quantized = np.round(weights / scales[:, None, None, None]).astype(np.int8)
                weight_tensor = graph.add_tensor(f"{name}/weights", list(weights.shape), "INT8", data=quantized,
                                                 scale=scales, zero_point=np.zeros(scales.size, np.int64))
            else:
                weight_tensor = graph.add_tensor(f"{name}/weights", list(weights.shape), "FLOAT32", data=weights)
        if precision == "float32":
            bias_tensor = graph.add_tensor(f"{name}/bias", [bias.size], "FLOAT32", data=bias.astype(np.float32))
        else:
            w_scales = graph.quantization(weight_tensor)[0]
            bias_scales = source_scale[0] * w_scales
            bias_q = np.round(bias / bias_scales).astype(np.int32)
            bias_tensor = graph.add_tensor(f"{name}/bias", [bias.size], "INT32", data=bias_q, scale=bias_scales,
                                           zero_point=np.zeros(bias_scales.size, np.int64))
        output = activation(name, out_shape, *out_range)
        options = schema.Conv2DOptionsT()
        options.padding = schema.Padding.SAME
        options.strideH = options.strideW = stride
        options.dilationHFactor = options.dilationWFactor = 1
        options.fusedActivationFunction = (schema.ActivationFunctionType.RELU6 if relu6
                                           else schema.ActivationFunctionType.NONE)
        graph.add_operator("CONV_2D", [source, weight_tensor, bias_tensor], [output], options, "Conv2DOptions")
        return output

    def reshape(source: int, shape: list[int], name: str) -> int:
        shape_tensor = graph.add_tensor(f"{name}/shape", [len(shape)], "INT32", data=np.asarray(shape, np.int32))
        scales, zero_points, _ = graph.quantization(source)
        output = (graph.add_tensor(name, shape, kind, scale=float(scales[0]), zero_point=int(zero_points[0]))
                  if scales.size else graph.add_tensor(name, shape, "FLOAT32"))
        options = schema.ReshapeOptionsT()
        options.newShape = np.asarray(shape, np.int32)
        graph.add_operator("RESHAPE", [source, shape_tensor], [output], options, "ReshapeOptions")
        return output

    def concat(sources: list[int], shape: list[int], out_range: tuple[float, float], name: str) -> int:
        output = activation(name, shape, *out_range)
        options = schema.ConcatenationOptionsT()
        options.axis = 1
        graph.add_operator("CONCATENATION", sources, [output], options, "ConcatenationOptions")
        return output

    if precision == "float32":
        image = graph.add_tensor("image", [1, SIZE, SIZE, 3], "FLOAT32")
    else:
        image = graph.add_tensor("image", [1, SIZE, SIZE, 3], kind, scale=1 / 128,
                                 zero_point=128 if precision == "uint8" else 0)
    map1 = conv(image, _feature_weights("rgb"), np.zeros(6, np.float32), 2, [1, 8, 8, 6], (0.0, 2.0), True, "map1")
    map2 = conv(map1, _feature_weights("map"), np.zeros(6, np.float32), 2, [1, 4, 4, 6], (0.0, 2.0), True, "map2")
    if variant == "classifier":
        pooled = reshape(map2, [1, 96], "flatten")
        graph.set_io([image], [pooled], ["image"], ["embedding"])
        (path := Path(path)).write_bytes(write_tflite_model(model))
        return path
    width = 1 + len(OLD_CLASSES)
    class_outputs, box_outputs = [], []
    shared = None
    for index, (source, grid, kernel) in enumerate(((map1, 8, 3), (map2, 4, 1))):
        box = conv(source, np.zeros((ANCHORS * 4, 1, 1, 6), np.float32), np.zeros(ANCHORS * 4, np.float32),
                   1, [1, grid, grid, ANCHORS * 4], (-12.8, 12.7), False, f"box{index}")
        box_outputs.append(reshape(box, [1, grid * grid * ANCHORS, 4], f"box{index}/reshape"))
        if variant in ("shared_head", "duplicated_head"):
            kernel = 1
        weights = rng.normal(0, 0.05, (ANCHORS, width, kernel, kernel, 6)).astype(np.float32)
        centre = kernel // 2
        bias = np.zeros((ANCHORS, width), np.float32)
        for anchor in range(ANCHORS):
            weights[anchor, 1, centre, centre, 4] += 4.0  # blue-ness -> "blue"
            weights[anchor, 2, centre, centre, 5] += 4.0  # green-ness -> "green"
            bias[anchor, 1:] = -2.5
        output = conv(source, weights.reshape(ANCHORS * width, kernel, kernel, 6), bias.reshape(-1), 1,
                      [1, grid, grid, ANCHORS * width], (-10.0, 2.75), False, f"class{index}", weight_tensor=shared)
        if variant == "shared_head":
            shared = int(graph.subgraph.operators[-1].inputs[1])
        if variant == "duplicated_head":  # same weights stored once per level (separate tensors and buffers)
            rng = np.random.default_rng(seed)
        class_outputs.append(reshape(output, [1, grid * grid * ANCHORS, width], f"class{index}/reshape"))
    count = 8 * 8 * ANCHORS + 4 * 4 * ANCHORS
    boxes = concat(box_outputs, [1, count, 4], (-12.8, 12.7), "boxes")
    logits = concat(class_outputs, [1, count, width], (-10.0, 2.75), "class_logits")
    if precision == "float32":
        scores = graph.add_tensor("scores", [1, count, width], "FLOAT32")
    else:
        scores = graph.add_tensor("scores", [1, count, width], kind, scale=1 / 256,
                                  zero_point=0 if precision == "uint8" else -128)
    graph.add_operator("LOGISTIC", [logits], [scores])
    if variant == "raw_head":
        graph.set_io([image], [boxes, scores], ["image"], ["boxes", "scores"])
        (path := Path(path)).write_bytes(write_tflite_model(model))
        return path
    if precision == "int8":  # newer converters dequantize before the post-process op
        float_boxes = graph.add_tensor("boxes/float", [1, count, 4], "FLOAT32")
        float_scores = graph.add_tensor("scores/float", [1, count, width], "FLOAT32")
        graph.add_operator("DEQUANTIZE", [boxes], [float_boxes])
        graph.add_operator("DEQUANTIZE", [scores], [float_scores])
        boxes, scores = float_boxes, float_scores
    if precision == "uint8":
        # uint8 box encodings need uint8 anchors: the kernel dequantizes both with their own parameters
        anchors = graph.add_tensor("anchors", [count, 4], "UINT8", data=np.round(_anchors() * 128).astype(np.uint8),
                                   scale=1 / 128, zero_point=0)
    else:
        anchors = graph.add_tensor("anchors", [count, 4], "FLOAT32", data=_anchors())
    outputs = [graph.add_tensor("TFLite_Detection_PostProcess" + suffix, shape, "FLOAT32")
               for suffix, shape in (("", [1, 5, 4]), (":1", [1, 5]), (":2", [1, 5]), (":3", [1]))]
    code = schema.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = schema.BuiltinOperator.CUSTOM
    code.customCode = "TFLite_Detection_PostProcess"
    code.version = 1
    model.operatorCodes.append(code)
    operator = schema.OperatorT()
    operator.opcodeIndex = len(model.operatorCodes) - 1
    operator.inputs = np.asarray([boxes, scores, anchors], np.int32)
    operator.outputs = np.asarray(outputs, np.int32)
    options = {"max_detections": 5, "max_classes_per_detection": 1, "num_classes": len(OLD_CLASSES),
               "nms_score_threshold": 1e-8, "nms_iou_threshold": 0.6, "y_scale": 10.0, "x_scale": 10.0,
               "h_scale": 5.0, "w_scale": 5.0, "use_regular_nms": False, "_output_quantized": precision == "uint8"}
    operator.customOptions = np.frombuffer(bytes(flexbuffers.Dumps(options)), np.uint8).copy()
    operator.customOptionsFormat = schema.CustomOptionsFormat.FLEXBUFFERS
    graph.subgraph.operators.append(operator)
    graph.set_io([image], outputs, ["image"], ["boxes", "classes", "scores", "count"])
    (path := Path(path)).write_bytes(write_tflite_model(model))
    return path


def write_labelmap(path: str | Path) -> Path:
    """The tiny detector's labelmap: line 0 ``???``, then the old classes."""
    (path := Path(path)).write_text("???\n" + "\n".join(OLD_CLASSES) + "\n")
    return path


def square_image(colour: str | None, cell: tuple[int, int] | None, size: int = 32, seed: int = 0) -> np.ndarray:
    """A gray noise image with a ``colour`` square, a quarter of the image side, centred on map1 cell ``cell``
    (row, col in 1..6 of the 8x8 grid): exactly the cell's 0.25 anchor."""
    rng = np.random.default_rng(seed)
    image = np.clip(rng.normal(128, 20, (size, size, 3)), 0, 255).astype(np.uint8)
    if colour is not None and cell is not None:
        xmin, ymin, xmax, ymax = square_box(cell, size)
        image[ymin:ymax, xmin:xmax] = COLOURS[colour]
    return image


def square_box(cell: tuple[int, int], size: int = 32) -> tuple[int, int, int, int]:
    """(xmin, ymin, xmax, ymax) pixels of :func:`square_image`'s square."""
    side, step = size // 4, size // 8
    y, x = cell
    return (x * step + step // 2 - side // 2, y * step + step // 2 - side // 2,
            x * step + step // 2 + side // 2, y * step + step // 2 + side // 2)


def write_voc(folder: Path, stem: str, image: np.ndarray, objects: list[tuple[str, tuple[float, float, float, float]]],
              size: tuple[int, int] | None = None) -> Path:
    """Save ``image`` as PNG and its Pascal VOC XML (``objects``: name, (xmin, ymin, xmax, ymax)) in ``folder``."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(folder / f"{stem}.png")
    height, width = size or image.shape[:2]
    parts = [(f"<annotation><filename>{stem}.png</filename><size><width>{width}</width><height>{height}</height>"
              "<depth>3</depth></size>")]
    for name, (xmin, ymin, xmax, ymax) in objects:
        parts.append(f"<object><name>{name}</name><bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin><xmax>{xmax}</xmax>"
                     f"<ymax>{ymax}</ymax></bndbox></object>")
    parts.append("</annotation>")
    (path := folder / f"{stem}.xml").write_text("".join(parts))
    return path


def write_red_squares(folder: Path, count: int, seed: int = 0) -> list[tuple[Path, tuple[int, int, int, int]]]:
    """``count`` VOC-annotated images of one red square each (class ``red``) in ``folder``; (image, box) pairs."""
    rng = np.random.default_rng(seed)
    written = []
    for index in range(count):
        cell = (int(rng.integers(1, 7)), int(rng.integers(1, 7)))
        image = square_image("red", cell, seed=seed * 1000 + index)
        box = square_box(cell)
        write_voc(folder, f"red-{index:03d}", image, [("red", box)])
        written.append((folder / f"red-{index:03d}.png", box))
    return written
