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
  MetadataExtractor read the files.
- ONNX: ``metadata_props`` with the keys of :data:`ONNX_METADATA_KEYS`.

:func:`verify_fused` runs the fused file and the split bundle on the same images and
returns the top-1 agreement and the largest score difference.
"""

from __future__ import annotations

import io
import json
import logging
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeadapt.device.bundle import Bundle
from edgeadapt.device.errors import BundleError, ConversionError, InputError
from edgeadapt.device.head import Head
from edgeadapt.device.manifest import InputSpec
from edgeadapt.device.preprocessing import InputQuantizer
from edgeadapt.device.safefs import durable_write

logger = logging.getLogger(__name__)

FORMATS = ("tflite", "onnx")
INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"
LABELS_FILE = "labels.txt"
INFO_FILE = "edgeadapt.json"
FUSED_FORMAT_VERSION = 1
#: ONNX ``metadata_props`` keys written into fused ONNX files (values are strings).
ONNX_METADATA_KEYS = {
    "edgeadapt.format_version": "fused-model format version (\"1\")",
    "edgeadapt.labels": "JSON list of class names, index i = output column i",
    "edgeadapt.input": "JSON: name, dtype (uint8), layout (NHWC), height, width, channels, color_order, resize, "
                       "scale, offset (the graph computes pixel*scale+offset itself)",
    "edgeadapt.output": "JSON: name (probabilities), dtype (float32), kind (softmax)",
    "edgeadapt.bundle": "JSON: bundle name, id, version, head version, backbone fingerprint, backbone quantization",
}


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


def fused_info(bundle: Bundle, model_format: str, quantization: str) -> dict[str, Any]:
    """The description embedded in a fused file (``edgeadapt.json`` / ONNX metadata_props)."""
    spec = bundle.manifest.input_spec
    data = bundle.manifest.data
    return {
        "format_version": FUSED_FORMAT_VERSION,
        "labels": bundle.manifest.class_names,
        "input": {
            "name": INPUT_NAME, "dtype": "uint8", "layout": "NHWC", "height": spec.height, "width": spec.width,
            "channels": spec.channels, "color_order": spec.color_order, "resize": spec.resize,
            "scale": spec.scale, "offset": spec.offset,
            "normalization": "inside the graph: float input = pixel * scale + offset",
        },
        "output": {"name": OUTPUT_NAME, "dtype": "float32", "kind": "softmax", "classes": len(bundle.manifest.class_names)},
        "bundle": {
            "name": data.get("name"), "bundle_id": data.get("bundle_id"), "version": data.get("version"),
            "head_version": data["head"].get("version"), "backbone_fingerprint": bundle.manifest.backbone_fingerprint,
            "backbone_quantization": quantization, "format": model_format,
        },
    }


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
    from edgeadapt.converters.tflite_import import TFLiteGraph, read_tflite_model, write_tflite_model

    content, entry = _backbone_content(bundle, "tflite")
    spec = bundle.manifest.input_spec
    head = bundle.load_head()
    model = read_tflite_model(content)
    graph = TFLiteGraph(model)
    schema = graph.schema
    if len(graph.inputs) != 1 or len(graph.outputs) != 1:
        raise BundleError("the bundle's TFLite backbone must have one input and one output")
    backbone_input, embedding = graph.inputs[0], graph.outputs[0]
    if graph.tensor_dtype(embedding) != "float32":
        raise BundleError("the bundle's TFLite backbone must output float32 embeddings")
    size = head.embedding_size
    classes = head.num_classes

    # input: uint8 pixels -> whatever the backbone takes
    input_dtype = graph.tensor_dtype(backbone_input)
    scales, zero_points, _ = graph.quantization(backbone_input)
    shape = graph.tensor_shape(backbone_input)
    image_shape = [1, *shape[1:]]
    identity = input_dtype == "uint8" and scales.size and InputQuantizer(
        spec, "uint8", float(scales[0]), int(zero_points[0])).is_identity
    if identity:
        image = backbone_input
        graph.tensor(image).name = INPUT_NAME
    else:
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

    # head: [SUB mean -> L2_NORMALIZATION] -> FULLY_CONNECTED -> SOFTMAX
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
    return _append_associated_files(fused, {
        LABELS_FILE: ("\n".join(bundle.manifest.class_names) + "\n").encode("utf-8"),
        INFO_FILE: json.dumps(info, indent=2).encode("utf-8"),
    }), quantization


def _append_associated_files(model_content: bytes, files: dict[str, bytes]) -> bytes:
    """Append a zip of ``files`` to the model, as the TFLite Support MetadataPopulator does."""
    buffer = io.BytesIO(model_content)
    buffer.seek(0, io.SEEK_END)
    with zipfile.ZipFile(buffer, "a", compression=zipfile.ZIP_STORED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


# -- TFLite Metadata flatbuffer (metadata_schema.fbs of TFLite Support, file identifier "M001")
_ASSOCIATED_FILE_TYPES = {"DESCRIPTIONS": 1, "TENSOR_AXIS_LABELS": 2}
_CONTENT_FEATURE, _CONTENT_IMAGE = 1, 2
_COLOR_SPACE = {"RGB": 1, "GRAY": 2, "BGR": 0}
_PROCESS_UNIT_NORMALIZATION = 1
METADATA_PARSER_VERSION = "1.0.0"


class _FlatBufferWriter:
    def __init__(self) -> None:
        import flatbuffers

        self.builder = flatbuffers.Builder(1024)

    def string(self, text: str) -> int:
        return self.builder.CreateString(text)

    def offsets(self, offsets: list[int]) -> int:
        builder = self.builder
        builder.StartVector(4, len(offsets), 4)
        for offset in reversed(offsets):
            builder.PrependUOffsetTRelative(offset)
        return builder.EndVector()

    def floats(self, values: list[float]) -> int:
        builder = self.builder
        builder.StartVector(4, len(values), 4)
        for value in reversed(values):
            builder.PrependFloat32(float(value))
        return builder.EndVector()

    def table(self, fields: dict[int, tuple[str, Any]]) -> int:
        """fields: slot -> (kind, value), kind in offset/int8/uint8/uint32."""
        builder = self.builder
        builder.StartObject(max(fields) + 1 if fields else 0)
        for slot, (kind, value) in sorted(fields.items()):
            if kind == "offset":
                builder.PrependUOffsetTRelativeSlot(slot, value, 0)
            elif kind == "int8":
                builder.PrependInt8Slot(slot, value, 0)
            elif kind == "uint8":
                builder.PrependUint8Slot(slot, value, 0)
            elif kind == "uint32":
                builder.PrependUint32Slot(slot, value, 0)
        return builder.EndObject()

    def finish(self, root: int, identifier: bytes) -> bytes:
        self.builder.Finish(root, file_identifier=identifier)
        return bytes(self.builder.Output())


def tflite_metadata_flatbuffer(bundle: Bundle, info: dict[str, Any]) -> bytes:
    """A TFLite Support ``ModelMetadata`` flatbuffer describing the fused classifier."""
    spec = bundle.manifest.input_spec
    writer = _FlatBufferWriter()
    # associated files
    labels = writer.table({0: ("offset", writer.string(LABELS_FILE)),
                           1: ("offset", writer.string("Class names, one per line, in output order")),
                           2: ("int8", _ASSOCIATED_FILE_TYPES["TENSOR_AXIS_LABELS"])})
    info_file = writer.table({0: ("offset", writer.string(INFO_FILE)),
                              1: ("offset", writer.string("edgeadapt description: labels, input spec, bundle identity")),
                              2: ("int8", _ASSOCIATED_FILE_TYPES["DESCRIPTIONS"])})
    # input tensor: image, RGB, uint8 pixels (the graph normalises: mean 0, std 1)
    size = writer.table({0: ("uint32", spec.width), 1: ("uint32", spec.height)})
    image_properties = writer.table({0: ("int8", _COLOR_SPACE.get(spec.color_order, 0)), 1: ("offset", size)})
    input_content = writer.table({0: ("uint8", _CONTENT_IMAGE), 1: ("offset", image_properties)})
    normalization = writer.table({0: ("offset", writer.floats([0.0])), 1: ("offset", writer.floats([1.0]))})
    process_unit = writer.table({0: ("uint8", _PROCESS_UNIT_NORMALIZATION), 1: ("offset", normalization)})
    input_stats = writer.table({0: ("offset", writer.floats([255.0])), 1: ("offset", writer.floats([0.0]))})
    input_metadata = writer.table({
        0: ("offset", writer.string(INPUT_NAME)),
        1: ("offset", writer.string(
            f"uint8 {spec.color_order} image {spec.height}x{spec.width} ({spec.resize}); raw pixels, the model "
            f"normalises them itself (pixel * {spec.scale:.9g} + {spec.offset:.9g})")),
        3: ("offset", input_content),
        4: ("offset", writer.offsets([process_unit])),
        5: ("offset", input_stats),
    })
    feature = writer.table({})
    output_content = writer.table({0: ("uint8", _CONTENT_FEATURE), 1: ("offset", feature)})
    output_stats = writer.table({0: ("offset", writer.floats([1.0])), 1: ("offset", writer.floats([0.0]))})
    output_metadata = writer.table({
        0: ("offset", writer.string(OUTPUT_NAME)),
        1: ("offset", writer.string("Softmax score of each class (float32), in the order of labels.txt")),
        3: ("offset", output_content),
        5: ("offset", output_stats),
        6: ("offset", writer.offsets([labels])),
    })
    subgraph = writer.table({
        0: ("offset", writer.string("image_classifier")),
        2: ("offset", writer.offsets([input_metadata])),
        3: ("offset", writer.offsets([output_metadata])),
    })
    data = bundle.manifest.data
    root = writer.table({
        0: ("offset", writer.string(str(data.get("name") or "edgeadapt classifier"))),
        1: ("offset", writer.string(
            f"Image classifier with {len(info['labels'])} classes, fused by edgeadapt from bundle "
            f"{data.get('bundle_id')} version {data.get('version')} (backbone {info['bundle']['backbone_quantization']}, "
            "float32 head, softmax output)")),
        2: ("offset", writer.string(str(data.get("version", 1)))),
        3: ("offset", writer.offsets([subgraph])),
        4: ("offset", writer.string("edgeadapt")),
        6: ("offset", writer.offsets([info_file])),
        7: ("offset", writer.string(METADATA_PARSER_VERSION)),
    })
    return writer.finish(root, b"M001")


def read_tflite_fused_metadata(content: bytes) -> dict[str, Any]:
    """Read back what a fused .tflite embeds: labels and info (zip), and the TFLite Metadata fields.

    Returns ``{"labels", "info", "metadata": {name, min_parser_version, input_name,
    input_mean, input_std, output_name, output_label_file, output_label_type}}``.
    """
    from flatbuffers import table as flatbuffer_table
    from flatbuffers.number_types import UOffsetTFlags

    from edgeadapt.converters.tflite_import import read_tflite_model

    with zipfile.ZipFile(io.BytesIO(bytes(content))) as archive:
        labels = archive.read(LABELS_FILE).decode("utf-8").splitlines()
        info = json.loads(archive.read(INFO_FILE).decode("utf-8"))
    model = read_tflite_model(content)
    entry = next((e for e in model.metadata or [] if (e.name.decode() if isinstance(e.name, bytes) else e.name) == "TFLITE_METADATA"), None)
    if entry is None:
        raise ConversionError("the TFLite file has no TFLITE_METADATA entry")
    buffer = bytes(np.asarray(model.buffers[entry.buffer].data, np.uint8).tobytes())
    if buffer[4:8] != b"M001":
        raise ConversionError("the TFLITE_METADATA buffer is not a metadata flatbuffer (identifier M001)")

    def root(position: int) -> Any:
        return flatbuffer_table.Table(bytearray(buffer), position)

    def field(tab: Any, slot: int) -> int:
        return tab.Offset(4 + 2 * slot)

    def string(tab: Any, slot: int) -> str | None:
        offset = field(tab, slot)
        return tab.String(offset + tab.Pos).decode("utf-8") if offset else None

    def subtable(tab: Any, slot: int) -> Any:
        offset = field(tab, slot)
        return root(tab.Indirect(offset + tab.Pos)) if offset else None

    def vector_tables(tab: Any, slot: int) -> list[Any]:
        offset = field(tab, slot)
        if not offset:
            return []
        start = tab.Vector(offset)
        return [root(tab.Indirect(start + 4 * i)) for i in range(tab.VectorLen(offset))]

    def vector_floats(tab: Any, slot: int) -> list[float]:
        offset = field(tab, slot)
        if not offset:
            return []
        start = tab.Vector(offset)
        return [float(np.frombuffer(buffer[start + 4 * i : start + 4 * i + 4], "<f4")[0]) for i in range(tab.VectorLen(offset))]

    top = root(UOffsetTFlags.py_type(int.from_bytes(buffer[0:4], "little")))
    subgraph = vector_tables(top, 3)[0]
    input_tensor = vector_tables(subgraph, 2)[0]
    output_tensor = vector_tables(subgraph, 3)[0]
    normalization = subtable(vector_tables(input_tensor, 4)[0], 1)
    label_file = vector_tables(output_tensor, 6)[0]
    type_offset = field(label_file, 2)
    return {
        "labels": labels,
        "info": info,
        "metadata": {
            "name": string(top, 0),
            "min_parser_version": string(top, 7),
            "input_name": string(input_tensor, 0),
            "input_mean": vector_floats(normalization, 0),
            "input_std": vector_floats(normalization, 1),
            "output_name": string(output_tensor, 0),
            "output_label_file": string(label_file, 0),
            "output_label_type": int(np.frombuffer(buffer[label_file.Pos + type_offset : label_file.Pos + type_offset + 1], np.int8)[0]) if type_offset else 0,
        },
    }


# ----------------------------------------------------------------------------- ONNX
def _fused_onnx(bundle: Bundle) -> tuple[bytes, str]:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

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
    weights, bias, mean = _folded_head(head)
    initializers = [
        numpy_helper.from_array(np.array(spec.scale, np.float32), "edgeadapt_fused_pixel_scale"),
        numpy_helper.from_array(np.array(spec.offset, np.float32), "edgeadapt_fused_pixel_offset"),
        numpy_helper.from_array(weights, "edgeadapt_head_weights"),
        numpy_helper.from_array(bias, "edgeadapt_head_bias"),
    ]
    front = [
        helper.make_node("Cast", [INPUT_NAME], ["edgeadapt_pixels_float"], to=TensorProto.FLOAT, name="edgeadapt_cast"),
        helper.make_node("Mul", ["edgeadapt_pixels_float", "edgeadapt_fused_pixel_scale"], ["edgeadapt_pixels_scaled"],
                         name="edgeadapt_scale"),
        helper.make_node("Add", ["edgeadapt_pixels_scaled", "edgeadapt_fused_pixel_offset"], [normalized],
                         name="edgeadapt_offset"),
    ]
    back = []
    features = embedding
    if head.l2_normalize:
        if mean is not None:
            initializers.append(numpy_helper.from_array(mean, "edgeadapt_feature_mean"))
            back.append(helper.make_node("Sub", [features, "edgeadapt_feature_mean"], ["edgeadapt_centered"],
                                         name="edgeadapt_center"))
            features = "edgeadapt_centered"
        back.append(helper.make_node("LpNormalization", [features], ["edgeadapt_l2_normalized"], axis=-1, p=2,
                                     name="edgeadapt_l2_normalize"))
        features = "edgeadapt_l2_normalized"
    back += [
        helper.make_node("Gemm", [features, "edgeadapt_head_weights", "edgeadapt_head_bias"], ["edgeadapt_logits"],
                         name="edgeadapt_head"),
        helper.make_node("Softmax", ["edgeadapt_logits"], [OUTPUT_NAME], axis=-1, name="edgeadapt_softmax"),
    ]
    nodes = front + list(graph.node) + back
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(initializers)
    graph.input.remove(backbone_input)
    graph.input.insert(0, helper.make_tensor_value_info(
        INPUT_NAME, TensorProto.UINT8, ["batch", spec.height, spec.width, spec.channels]))
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", head.num_classes]))
    graph.name = "edgeadapt_fused_classifier"
    quantization = str(entry.get("quantization", "float32"))
    info = fused_info(bundle, "onnx", quantization)
    del model.metadata_props[:]
    for key, value in (
        ("edgeadapt.format_version", str(FUSED_FORMAT_VERSION)),
        ("edgeadapt.labels", json.dumps(info["labels"])),
        ("edgeadapt.input", json.dumps(info["input"])),
        ("edgeadapt.output", json.dumps(info["output"])),
        ("edgeadapt.bundle", json.dumps(info["bundle"])),
    ):
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    model.doc_string = (f"edgeadapt fused classifier: uint8 NHWC {spec.color_order} image -> softmax probabilities "
                        f"over {head.num_classes} classes; labels in metadata_props['edgeadapt.labels']")
    model.producer_name = "edgeadapt"
    try:
        onnx.checker.check_model(model)
    except Exception as error:
        raise ConversionError(f"the fused ONNX model is invalid: {error}") from error
    return model.SerializeToString(), quantization


def read_onnx_fused_metadata(content: bytes) -> dict[str, Any]:
    """The ``edgeadapt.*`` metadata_props of a fused ONNX file, JSON values decoded."""
    import onnx

    model = onnx.load_from_string(bytes(content))
    props = {entry.key: entry.value for entry in model.metadata_props}
    result: dict[str, Any] = {}
    for key in ONNX_METADATA_KEYS:
        if key in props:
            result[key] = props[key] if key == "edgeadapt.format_version" else json.loads(props[key])
    return result


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
