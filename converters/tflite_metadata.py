"""TFLite Support metadata: the ``TFLITE_METADATA`` flatbuffer and the associated files appended to a model.

Fused classifiers (:mod:`edgeadapt.converters.fused_export`) and rewritten detectors
(:mod:`edgeadapt.detection.rewrite`) embed their labels the way the TFLite Support library's
MetadataPopulator does: a ``ModelMetadata`` flatbuffer (metadata_schema.fbs, file identifier
"M001") in the model's metadata, and a zip of the associated files appended to the model.
This module writes both (:class:`FlatBufferWriter`, :func:`append_associated_files`,
:func:`tflite_metadata_flatbuffer`) and reads a fused classifier's back
(:func:`read_tflite_fused_metadata`).
"""

from __future__ import annotations

import io
import json
import zipfile
from typing import Any

import numpy as np

from edgeadapt.converters.fused_format import INFO_FILE, INPUT_NAME, LABELS_FILE, OUTPUT_NAME
from edgeadapt.converters.tflite_graph import read_tflite_model
from edgeadapt.device.bundle import Bundle
from edgeadapt.device.errors import ConversionError


def append_associated_files(model_content: bytes, files: dict[str, bytes]) -> bytes:
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


class FlatBufferWriter:
    """Builds a flatbuffer from tables of (slot -> (kind, value)), strings and vectors."""

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
    writer = FlatBufferWriter()
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
