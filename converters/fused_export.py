"""Fused single-file models for apps: backbone + current head + softmax, labels embedded.

An app that wants one interpreter call and no edgeadapt code ships the file written by
:func:`export_fused` (CLI ``edgeadapt export-fused BUNDLE --format tflite|onnx --out FILE``):

- input ``"image"``: uint8 pixels, NHWC ``(1, H, W, C)`` for TFLite (``(batch, H, W, C)`` for
  ONNX), colour order and size as in the bundle's input spec (resize the camera frame to
  H x W first, as the bundle's ``input.resize`` says). Normalisation and input quantization
  are part of the graph, so the app feeds raw pixels.
- output ``"probabilities"``: float32 ``(N, C)`` softmax scores, one per class in label order.

The backbone part is the bundle's own backbone file, unchanged (int8 where the bundle's
backbone is int8). The head is kept in float32 (``logits = f @ W + b`` with the head's
centering / L2 normalisation / temperature folded in or added as operators), so the fused
model ranks classes exactly like the split bundle; its size grows by 4 x D x C bytes.

Labels and normalisation are embedded:

- TFLite: a TFLite Metadata flatbuffer (``TFLITE_METADATA`` entry, schema of the TFLite
  Support library: image input with NormalizationOptions mean 0 / std 1 because the graph
  normalises itself, output with an associated ``labels.txt`` of type TENSOR_AXIS_LABELS),
  and the associated files packed as a zip appended to the model, as the TFLite Support
  MetadataPopulator does: ``labels.txt`` (one name per line) and ``edgeadapt.json`` (the
  keys below). The model loads in any TFLite interpreter; ``zipfile`` / the Android
  MetadataExtractor read the files (written and read by :mod:`edgeadapt.converters.tflite_metadata`).
- ONNX: ``metadata_props`` with the keys of :data:`edgeadapt.converters.fused_format.ONNX_METADATA_KEYS`.

:func:`verify_fused` runs the fused file and the split bundle on the same images and
returns the top-1 agreement and the largest score difference.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeadapt.converters.fused_format import (
    FORMATS,
    INFO_FILE,
    INPUT_NAME,
    LABELS_FILE,
    OUTPUT_NAME,
    fused_info,
    onnx_metadata_props,
)
from edgeadapt.converters.tflite_graph import TFLiteGraph, read_tflite_model, write_tflite_model
from edgeadapt.converters.tflite_metadata import append_associated_files, tflite_metadata_flatbuffer
from edgeadapt.device.bundle import Bundle
from edgeadapt.device.errors import BundleError, ConversionError, InputError
from edgeadapt.device.head import Head
from edgeadapt.device.manifest import InputSpec
from edgeadapt.device.preprocessing import InputQuantizer
from edgeadapt.device.safefs import durable_write

logger = logging.getLogger(__name__)


@dataclass
class FusedExport:
    """What :func:`export_fused` wrote and measured."""

    path: Path
    format: str
    size: int
    num_classes: int
    backbone_quantization: str
    top1_agreement: float | None = None
    max_score_difference: float | None = None
    probes: int = 0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = str(self.path)
        return data


# ----------------------------------------------------------------------------- shared pieces
def _bundle(bundle: Bundle | str | Path) -> Bundle:
    return bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)


def _folded_head(head: Head) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(W', b', mean) with temperature folded in; the mean is folded into b' unless L2 normalisation needs it."""
    weights = head.weights.astype(np.float64)
    bias = head.bias.astype(np.float64)
    mean = None
    if head.feature_mean is not None:
        if head.l2_normalize:
            mean = head.feature_mean.astype(np.float32)
        else:
            bias = bias - head.feature_mean.astype(np.float64) @ weights
    weights = weights / head.temperature
    bias = bias / head.temperature
    return weights.astype(np.float32), bias.astype(np.float32), mean


def _backbone_content(bundle: Bundle, model_format: str) -> tuple[bytes, dict[str, Any]]:
    entry = bundle.model_entry(model_format)
    if entry is None:
        formats = [model.get("format") for model in bundle.manifest.models]
        raise BundleError(f"the bundle has no {model_format} backbone (it holds {formats}); choose another --format")
    return bundle.file_path(entry["file"]).read_bytes(), entry


# ----------------------------------------------------------------------------- TFLite
def _fused_tflite(bundle: Bundle) -> tuple[bytes, str]:
    content, entry = _backbone_content(bundle, "tflite")
    head = bundle.load_head()
    model = read_tflite_model(content)
    graph = TFLiteGraph(model)
    schema = graph.schema
    if len(graph.inputs) != 1 or len(graph.outputs) != 1:
        raise BundleError("the bundle's TFLite backbone must have one input and one output")
    backbone_input, embedding = graph.inputs[0], graph.outputs[0]
    if graph.tensor_dtype(embedding) != "float32":
        raise BundleError("the bundle's TFLite backbone must output float32 embeddings")
    image = _tflite_pixel_input(graph, bundle.manifest.input_spec, backbone_input)
    probabilities = _tflite_head(graph, head, embedding)
    graph.subgraph.inputs = np.asarray([image], np.int32)
    graph.subgraph.outputs = np.asarray([probabilities], np.int32)
    graph.prune()
    graph.set_io(graph.inputs, graph.outputs, [INPUT_NAME], [OUTPUT_NAME])

    quantization = str(entry.get("quantization", "float32"))
    info = fused_info(bundle, "tflite", quantization)
    metadata = tflite_metadata_flatbuffer(bundle, info)
    metadata_entry = schema.MetadataT()
    metadata_entry.name = "TFLITE_METADATA"
    metadata_entry.buffer = graph.add_buffer(metadata)
    model.metadata = [*(model.metadata or []), metadata_entry]
    model.description = f"edgeadapt fused classifier {bundle.manifest.data.get('name', '')}: uint8 image -> probabilities"
    fused = write_tflite_model(model)
    return append_associated_files(fused, {
        LABELS_FILE: ("\n".join(bundle.manifest.class_names) + "\n").encode("utf-8"),
        INFO_FILE: json.dumps(info, indent=2).encode("utf-8"),
    }), quantization


def _tflite_pixel_input(graph: TFLiteGraph, spec: InputSpec, backbone_input: int) -> int:
    """The uint8 ``"image"`` input: CAST, MUL scale, ADD offset (and QUANTIZE) in front of ``backbone_input``.

    Reuses ``backbone_input`` itself when it already takes the bundle's pixels unchanged.
    Returns the index of the new input tensor.
    """
    schema = graph.schema
    input_dtype = graph.tensor_dtype(backbone_input)
    scales, zero_points, _ = graph.quantization(backbone_input)
    image_shape = [1, *graph.tensor_shape(backbone_input)[1:]]
    identity = input_dtype == "uint8" and scales.size and InputQuantizer(
        spec, "uint8", float(scales[0]), int(zero_points[0])).is_identity
    if identity:
        graph.tensor(backbone_input).name = INPUT_NAME
        return backbone_input
    image = graph.add_tensor(INPUT_NAME, image_shape, "UINT8")
    first_new = len(graph.subgraph.operators)
    as_float = graph.add_tensor("edgeadapt/pixels_float", image_shape, "FLOAT32")
    cast = schema.CastOptionsT()
    cast.inDataType = schema.TensorType.UINT8
    cast.outDataType = schema.TensorType.FLOAT32
    graph.add_operator("CAST", [image], [as_float], cast, "CastOptions")
    scale = graph.add_tensor("edgeadapt/input_scale", [1], "FLOAT32", data=np.array([spec.scale], np.float32))
    offset = graph.add_tensor("edgeadapt/input_offset", [1], "FLOAT32", data=np.array([spec.offset], np.float32))
    scaled = graph.add_tensor("edgeadapt/pixels_scaled", image_shape, "FLOAT32")
    graph.add_operator("MUL", [as_float, scale], [scaled], schema.MulOptionsT(), "MulOptions")
    normalized = backbone_input if input_dtype == "float32" else graph.add_tensor(
        "edgeadapt/pixels_normalized", image_shape, "FLOAT32")
    graph.add_operator("ADD", [scaled, offset], [normalized], schema.AddOptionsT(), "AddOptions")
    if input_dtype != "float32":
        graph.add_operator("QUANTIZE", [normalized], [backbone_input], version=2 if input_dtype == "int8" else 1)
    # the new operators must run first
    added = graph.subgraph.operators[first_new:]
    del graph.subgraph.operators[first_new:]
    graph.subgraph.operators[0:0] = added
    return image


def _tflite_head(graph: TFLiteGraph, head: Head, embedding: int) -> int:
    """[SUB mean -> L2_NORMALIZATION] -> FULLY_CONNECTED -> SOFTMAX after ``embedding``; the output's index."""
    schema = graph.schema
    size, classes = head.embedding_size, head.num_classes
    weights, bias, mean = _folded_head(head)
    features = embedding
    if head.l2_normalize:
        if mean is not None:
            mean_tensor = graph.add_tensor("edgeadapt/feature_mean", [size], "FLOAT32", data=mean)
            centered = graph.add_tensor("edgeadapt/centered", [1, size], "FLOAT32", shape_signature=[-1, size])
            graph.add_operator("SUB", [features, mean_tensor], [centered], schema.SubOptionsT(), "SubOptions")
            features = centered
        normalized = graph.add_tensor("edgeadapt/l2_normalized", [1, size], "FLOAT32", shape_signature=[-1, size])
        graph.add_operator("L2_NORMALIZATION", [features], [normalized], schema.L2NormOptionsT(), "L2NormOptions")
        features = normalized
    weights_tensor = graph.add_tensor("edgeadapt/head_weights", [classes, size], "FLOAT32",
                                      data=np.ascontiguousarray(weights.T))
    bias_tensor = graph.add_tensor("edgeadapt/head_bias", [classes], "FLOAT32", data=bias)
    logits = graph.add_tensor("edgeadapt/logits", [1, classes], "FLOAT32", shape_signature=[-1, classes])
    options = schema.FullyConnectedOptionsT()
    options.fusedActivationFunction = schema.ActivationFunctionType.NONE
    graph.add_operator("FULLY_CONNECTED", [features, weights_tensor, bias_tensor], [logits], options,
                       "FullyConnectedOptions")
    probabilities = graph.add_tensor(OUTPUT_NAME, [1, classes], "FLOAT32", shape_signature=[-1, classes])
    softmax = schema.SoftmaxOptionsT()
    softmax.beta = 1.0
    graph.add_operator("SOFTMAX", [logits], [probabilities], softmax, "SoftmaxOptions")
    return probabilities


# ----------------------------------------------------------------------------- ONNX
def _fused_onnx(bundle: Bundle) -> tuple[bytes, str]:
    import onnx
    from onnx import TensorProto, helper

    content, entry = _backbone_content(bundle, "onnx")
    spec = bundle.manifest.input_spec
    head = bundle.load_head()
    model = onnx.load_from_string(content)
    graph = model.graph
    initializer_names = {initializer.name for initializer in graph.initializer}
    inputs = [value for value in graph.input if value.name not in initializer_names]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise BundleError("the bundle's ONNX backbone must have one input and one output")
    backbone_input, embedding = inputs[0], graph.output[0].name
    if backbone_input.type.tensor_type.elem_type != TensorProto.FLOAT:
        raise BundleError("the bundle's ONNX backbone must take float32 input")
    used = {name for node in graph.node for name in (*node.input, *node.output)} | initializer_names
    for name in (INPUT_NAME, OUTPUT_NAME):
        if name in used and name != backbone_input.name:
            raise BundleError(f"the ONNX backbone already uses the tensor name {name!r}")
    normalized = "edgeadapt_normalized_input"
    for node in graph.node:
        node.input[:] = [normalized if name == backbone_input.name else name for name in node.input]
    front, front_initializers = _onnx_pixel_nodes(spec, normalized)
    back, back_initializers = _onnx_head_nodes(head, embedding)
    nodes = front + list(graph.node) + back
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(front_initializers + back_initializers)
    graph.input.remove(backbone_input)
    graph.input.insert(0, helper.make_tensor_value_info(
        INPUT_NAME, TensorProto.UINT8, ["batch", spec.height, spec.width, spec.channels]))
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", head.num_classes]))
    graph.name = "edgeadapt_fused_classifier"
    quantization = str(entry.get("quantization", "float32"))
    del model.metadata_props[:]
    for key, value in onnx_metadata_props(fused_info(bundle, "onnx", quantization)):
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    model.doc_string = (f"edgeadapt fused classifier: uint8 NHWC {spec.color_order} image -> softmax probabilities "
                        f"over {head.num_classes} classes; labels in metadata_props['edgeadapt.labels']")
    model.producer_name = "edgeadapt"
    try:
        onnx.checker.check_model(model)
    except Exception as error:
        raise ConversionError(f"the fused ONNX model is invalid: {error}") from error
    return model.SerializeToString(), quantization


def _onnx_pixel_nodes(spec: InputSpec, normalized: str) -> tuple[list[Any], list[Any]]:
    """(nodes, initializers): uint8 ``"image"`` -> Cast -> Mul scale -> Add offset -> ``normalized``."""
    from onnx import TensorProto, helper, numpy_helper

    initializers = [
        numpy_helper.from_array(np.array(spec.scale, np.float32), "edgeadapt_fused_pixel_scale"),
        numpy_helper.from_array(np.array(spec.offset, np.float32), "edgeadapt_fused_pixel_offset"),
    ]
    nodes = [
        helper.make_node("Cast", [INPUT_NAME], ["edgeadapt_pixels_float"], to=TensorProto.FLOAT, name="edgeadapt_cast"),
        helper.make_node("Mul", ["edgeadapt_pixels_float", "edgeadapt_fused_pixel_scale"], ["edgeadapt_pixels_scaled"],
                         name="edgeadapt_scale"),
        helper.make_node("Add", ["edgeadapt_pixels_scaled", "edgeadapt_fused_pixel_offset"], [normalized],
                         name="edgeadapt_offset"),
    ]
    return nodes, initializers


def _onnx_head_nodes(head: Head, embedding: str) -> tuple[list[Any], list[Any]]:
    """(nodes, initializers): ``embedding`` -> [Sub mean -> LpNormalization] -> Gemm -> Softmax ``"probabilities"``."""
    from onnx import helper, numpy_helper

    weights, bias, mean = _folded_head(head)
    initializers = [
        numpy_helper.from_array(weights, "edgeadapt_head_weights"),
        numpy_helper.from_array(bias, "edgeadapt_head_bias"),
    ]
    nodes = []
    features = embedding
    if head.l2_normalize:
        if mean is not None:
            initializers.append(numpy_helper.from_array(mean, "edgeadapt_feature_mean"))
            nodes.append(helper.make_node("Sub", [features, "edgeadapt_feature_mean"], ["edgeadapt_centered"],
                                          name="edgeadapt_center"))
            features = "edgeadapt_centered"
        nodes.append(helper.make_node("LpNormalization", [features], ["edgeadapt_l2_normalized"], axis=-1, p=2,
                                      name="edgeadapt_l2_normalize"))
        features = "edgeadapt_l2_normalized"
    nodes += [
        helper.make_node("Gemm", [features, "edgeadapt_head_weights", "edgeadapt_head_bias"], ["edgeadapt_logits"],
                         name="edgeadapt_head"),
        helper.make_node("Softmax", ["edgeadapt_logits"], [OUTPUT_NAME], axis=-1, name="edgeadapt_softmax"),
    ]
    return nodes, initializers


# ----------------------------------------------------------------------------- API
def fused_model_bytes(bundle: Bundle | str | Path, model_format: str) -> tuple[bytes, str]:
    """(content, backbone quantization) of the fused model of ``bundle`` in ``model_format``."""
    if model_format not in FORMATS:
        raise InputError(f"unknown fused format {model_format!r}; choose one of {FORMATS}")
    opened = _bundle(bundle)
    return _fused_tflite(opened) if model_format == "tflite" else _fused_onnx(opened)


class FusedRunner:
    """Runs a fused file on uint8 images (N, H, W, C); returns (N, C) probabilities."""

    def __init__(self, content: bytes, model_format: str, num_threads: int | None = None):
        self.format = model_format
        if model_format == "tflite":
            from ai_edge_litert.interpreter import Interpreter

            self.interpreter = Interpreter(model_content=bytes(content), num_threads=num_threads)
            self.interpreter.allocate_tensors()
            self._input = self.interpreter.get_input_details()[0]["index"]
            self._output = self.interpreter.get_output_details()[0]["index"]
        else:
            import onnxruntime

            options = onnxruntime.SessionOptions()
            options.log_severity_level = 3
            if num_threads:
                options.intra_op_num_threads = num_threads
            self.session = onnxruntime.InferenceSession(bytes(content), sess_options=options,
                                                        providers=["CPUExecutionProvider"])

    def __call__(self, images: np.ndarray) -> np.ndarray:
        if self.format == "onnx":
            return np.asarray(self.session.run([OUTPUT_NAME], {INPUT_NAME: images})[0], np.float32)
        rows = []
        for image in images:
            self.interpreter.set_tensor(self._input, image[None])
            self.interpreter.invoke()
            rows.append(self.interpreter.get_tensor(self._output)[0].copy())
        return np.stack(rows).astype(np.float32)


def verify_fused(content: bytes, model_format: str, bundle: Bundle | str | Path, images: np.ndarray) -> tuple[float, float]:
    """(top-1 agreement, max |score difference|) of the fused file against the split bundle on ``images``.

    The split bundle runs with the device runtime on the backbone of the same format.
    """
    from edgeadapt.device.runtime import Runtime

    opened = _bundle(bundle)
    backend = "onnxruntime" if model_format == "onnx" else "litert"
    runtime = Runtime(opened, backend=backend)
    split = runtime.probabilities(images)
    fused = FusedRunner(content, model_format)(images)
    agreement = float(np.mean(split.argmax(1) == fused.argmax(1)))
    return agreement, float(np.max(np.abs(split - fused)))


def export_fused(
    bundle: Bundle | str | Path,
    output: str | Path,
    model_format: str = "tflite",
    probe_images: np.ndarray | None = None,
    probes: int = 16,
    min_agreement: float = 1.0,
) -> FusedExport:
    """Write the fused model of ``bundle`` to ``output`` and check it against the split bundle.

    ``probe_images`` (uint8, prepared for the bundle's input spec) are used for the check,
    plus ``probes`` generated images. Raises :class:`ConversionError` if the top-1 agreement
    is below ``min_agreement`` (nothing is written then).

    Args:
        bundle: The bundle (path or opened :class:`Bundle`).
        output: The file to write (``.tflite`` or ``.onnx``).
        model_format: "tflite" or "onnx".
        probe_images: Optional real images for the check.
        probes: Number of generated probe images.
        min_agreement: Lowest top-1 agreement with the split bundle that is accepted.

    Returns:
        The written file, its size, class count and the measured agreement.

    Raises:
        ConversionError: When fusing fails or the agreement is below ``min_agreement``.
        InputError: When the format is unknown.
    """
    opened = _bundle(bundle)
    content, quantization = fused_model_bytes(opened, model_format)
    spec = opened.manifest.input_spec
    images = probe_image_batch(spec, probes, seed=0)
    if probe_images is not None and len(probe_images):
        images = np.concatenate([np.asarray(probe_images, np.uint8), images])
    result = FusedExport(path=Path(output), format=model_format, size=len(content),
                         num_classes=len(opened.manifest.class_names), backbone_quantization=quantization)
    if len(images):
        agreement, difference = verify_fused(content, model_format, opened, images)
        result.top1_agreement, result.max_score_difference, result.probes = agreement, difference, len(images)
        if agreement < min_agreement:
            raise ConversionError(
                f"the fused {model_format} model agrees with the split bundle on only {agreement:.1%} of "
                f"{len(images)} probe images (max score difference {difference:.3g}); not writing it"
            )
    path = durable_write(output, content)
    logger.info("wrote fused %s model %s (%d bytes)", model_format, path, len(content))
    return result


def probe_image_batch(spec: InputSpec, count: int, seed: int = 0) -> np.ndarray:
    """``count`` generated image-like uint8 pictures (gradients, blobs, stripes, noise) for ``spec``."""
    rng = np.random.default_rng(seed)
    height, width, channels = spec.shape
    rows, columns = np.mgrid[0:height, 0:width]
    rows, columns = rows / max(height - 1, 1), columns / max(width - 1, 1)
    images = np.empty((count, height, width, channels), np.uint8)
    for index in range(count):
        picture = np.empty((height, width, channels))
        for channel in range(channels):
            a, b, c = rng.uniform(-1, 1, 3)
            picture[:, :, channel] = 0.5 + 0.4 * (a * rows + b * columns + c * rows * columns)
        for _ in range(rng.integers(1, 4)):
            center = rng.uniform(0, 1, 2)
            blob = np.exp(-((rows - center[0]) ** 2 + (columns - center[1]) ** 2) / rng.uniform(0.005, 0.08))
            picture += blob[:, :, None] * rng.uniform(-0.6, 0.6, channels)
        if rng.random() < 0.5:
            frequency = rng.uniform(3, 20)
            angle = rng.uniform(0, np.pi)
            stripes = np.sin(2 * np.pi * frequency * (rows * np.cos(angle) + columns * np.sin(angle)))
            picture += 0.15 * stripes[:, :, None] * rng.uniform(-1, 1, channels)
        picture += rng.normal(0, rng.uniform(0.01, 0.08), picture.shape)
        images[index] = np.clip(picture * 255, 0, 255).astype(np.uint8)
    return images
