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
from typing import Any, Sequence

import numpy as np

from edgeadapt.converters.model_info import ExportedModel, check_tflite_runs, inspect_tflite, tflite_interpreter
from edgeadapt.device.errors import ConversionError, IncompatibleModelError, InputError
from edgeadapt.device.head import Head
from edgeadapt.device.manifest import InputSpec
from edgeadapt.device.preprocessing import InputQuantizer

logger = logging.getLogger(__name__)

#: The name of the backbone's input and output tensors (and its signature keys).
INPUT_NAME = "input"
EMBEDDING_NAME = "embedding"
SIGNATURE_KEY = "serving_default"
#: Default normalisation assumed for float models when none is given: pixel/127.5 - 1.
DEFAULT_FLOAT_SCALE = 1.0 / 127.5
DEFAULT_FLOAT_OFFSET = -1.0

# Operators that may follow the classifier's linear layer (they do not change the top-1).
_TAIL_OPERATORS = ("RESHAPE", "SQUEEZE", "QUANTIZE", "DEQUANTIZE", "SOFTMAX", "LOG_SOFTMAX")
_CONTROL_FLOW_OPERATORS = ("IF", "WHILE", "CALL_ONCE", "CALL")


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


# ----------------------------------------------------------------------------- flatbuffer access
def tflite_schema() -> Any:
    """The generated TFLite schema module (object API), from ai-edge-litert or TensorFlow."""
    try:
        from ai_edge_litert import schema_py_generated as schema
    except ImportError:
        try:
            from tensorflow.lite.python import schema_py_generated as schema
        except ImportError as error:
            raise ConversionError(
                "editing .tflite files needs ai-edge-litert (or TensorFlow): pip install 'edgeadapt[host]'"
            ) from error
    return schema


def builtin_operator_names() -> dict[int, str]:
    schema = tflite_schema()
    return {value: name for name, value in vars(schema.BuiltinOperator).items() if not name.startswith("_")}


def tensor_type_names() -> dict[int, str]:
    schema = tflite_schema()
    return {value: name for name, value in vars(schema.TensorType).items() if not name.startswith("_")}


_NUMPY_TYPES = {
    "FLOAT32": np.float32, "FLOAT16": np.float16, "INT32": np.int32, "UINT8": np.uint8, "INT64": np.int64,
    "INT16": np.int16, "INT8": np.int8, "FLOAT64": np.float64, "UINT32": np.uint32, "UINT16": np.uint16,
    "BOOL": np.bool_,
}


def read_tflite_model(content: bytes) -> Any:
    """Parse a ``.tflite`` flatbuffer into a mutable ``ModelT``.

    The file is first loaded by the LiteRT interpreter (which verifies the flatbuffer), so a
    truncated or corrupted file gives a :class:`ConversionError` rather than garbage.
    """
    content = bytes(content)
    if len(content) < 8 or content[4:8] != b"TFL3":
        raise ConversionError(
            "the file is not a TFLite model (no 'TFL3' flatbuffer identifier): it is truncated or another format"
        )
    tflite_interpreter(content)  # raises ConversionError for truncated/corrupted files
    schema = tflite_schema()
    try:
        model = schema.ModelT.InitFromPackedBuf(bytearray(content), 0)
    except Exception as error:  # flatbuffers raises struct/index errors on bad data
        raise ConversionError(f"cannot parse the TFLite flatbuffer ({error}); the file is corrupted") from error
    for buffer in model.buffers or []:
        if buffer.offset and buffer.offset > 1:  # models > 2 GB keep buffers after the flatbuffer
            buffer.data = np.frombuffer(content[buffer.offset : buffer.offset + buffer.size], dtype=np.uint8)
            buffer.offset = 0
            buffer.size = 0
    return model


def write_tflite_model(model: Any) -> bytes:
    """Serialise a ``ModelT``; constant buffers are 16-byte aligned like the TFLite converter does."""
    import flatbuffers

    schema = tflite_schema()

    class AlignedBuffer(schema.BufferT):
        def Pack(self, builder: Any) -> int:  # noqa: N802 (flatbuffers API name)
            data_offset = None
            if self.data is not None and len(self.data):
                payload = np.ascontiguousarray(self.data, dtype=np.uint8).tobytes()
                builder.StartVector(1, len(payload), 16)
                builder.head = builder.head - len(payload)
                builder.Bytes[builder.head : builder.head + len(payload)] = payload
                builder.vectorNumElems = len(payload)
                data_offset = builder.EndVector()
            schema.BufferStart(builder)
            if data_offset is not None:
                schema.BufferAddData(builder, data_offset)
            return schema.BufferEnd(builder)

    originals = model.buffers
    model.buffers = []
    for buffer in originals or []:
        aligned = AlignedBuffer()
        aligned.data = buffer.data
        model.buffers.append(aligned)
    try:
        builder = flatbuffers.Builder(1024)
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        content = bytes(builder.Output())
    finally:
        model.buffers = originals
    if len(content) >= 2**31:
        raise ConversionError("the rewritten TFLite model is larger than 2 GB; edgeadapt does not write such files")
    return content


def _name(value: Any) -> str:
    if value is None:
        return ""
    return value.decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else str(value)


class TFLiteGraph:
    """Read and edit the main subgraph of a ``ModelT`` (tensors, buffers, operators)."""

    def __init__(self, model: Any, subgraph_index: int = 0):
        if not model.subgraphs:
            raise IncompatibleModelError("the TFLite model has no subgraph")
        self.model = model
        self.schema = tflite_schema()
        self.subgraph = model.subgraphs[subgraph_index]
        self.subgraph.tensors = list(self.subgraph.tensors or [])
        self.subgraph.operators = list(self.subgraph.operators or [])
        self.model.buffers = list(self.model.buffers or [])
        self.model.operatorCodes = list(self.model.operatorCodes or [])
        self._builtin_names = builtin_operator_names()
        self._type_names = tensor_type_names()

    # -- reading --------------------------------------------------------------------
    @property
    def inputs(self) -> list[int]:
        return [int(index) for index in (self.subgraph.inputs if self.subgraph.inputs is not None else [])]

    @property
    def outputs(self) -> list[int]:
        return [int(index) for index in (self.subgraph.outputs if self.subgraph.outputs is not None else [])]

    def tensor(self, index: int) -> Any:
        return self.subgraph.tensors[index]

    def tensor_name(self, index: int) -> str:
        return _name(self.tensor(index).name)

    def tensor_shape(self, index: int) -> list[int]:
        shape = self.tensor(index).shape
        return [] if shape is None else [int(value) for value in shape]

    def tensor_type(self, index: int) -> str:
        return self._type_names.get(self.tensor(index).type, f"TYPE_{self.tensor(index).type}")

    def tensor_dtype(self, index: int) -> str:
        return {"FLOAT32": "float32", "INT8": "int8", "UINT8": "uint8", "INT16": "int16"}.get(
            self.tensor_type(index), self.tensor_type(index).lower()
        )

    def quantization(self, index: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(scales, zero_points, quantized_dimension) of a tensor; empty arrays when not quantized."""
        quantization = self.tensor(index).quantization
        if quantization is None or quantization.scale is None or len(quantization.scale) == 0:
            return np.zeros(0, np.float32), np.zeros(0, np.int64), 0
        scales = np.asarray(quantization.scale, dtype=np.float64).reshape(-1)
        zero_points = np.asarray(
            quantization.zeroPoint if quantization.zeroPoint is not None else np.zeros(scales.size), dtype=np.int64
        ).reshape(-1)
        if zero_points.size == 0:
            zero_points = np.zeros(scales.size, np.int64)
        return scales, zero_points, int(quantization.quantizedDimension or 0)

    def operator_name(self, operator: Any) -> str:
        code = self.model.operatorCodes[operator.opcodeIndex]
        builtin = max(int(code.builtinCode), int(code.deprecatedBuiltinCode))
        if builtin == self.schema.BuiltinOperator.CUSTOM:
            return _name(code.customCode) or "CUSTOM"
        return self._builtin_names.get(builtin, f"BUILTIN_{builtin}")

    def is_custom(self, operator: Any) -> bool:
        code = self.model.operatorCodes[operator.opcodeIndex]
        return max(int(code.builtinCode), int(code.deprecatedBuiltinCode)) == self.schema.BuiltinOperator.CUSTOM

    def producers(self) -> dict[int, int]:
        """tensor index -> index of the operator that writes it."""
        result = {}
        for position, operator in enumerate(self.subgraph.operators):
            for index in operator.outputs if operator.outputs is not None else []:
                result[int(index)] = position
        return result

    def consumers(self) -> dict[int, list[int]]:
        result: dict[int, list[int]] = {}
        for position, operator in enumerate(self.subgraph.operators):
            for index in operator.inputs if operator.inputs is not None else []:
                if index >= 0:
                    result.setdefault(int(index), []).append(position)
        return result

    def buffer_data(self, index: int) -> np.ndarray | None:
        buffer_index = int(self.tensor(index).buffer)
        if buffer_index <= 0 or buffer_index >= len(self.model.buffers):
            return None
        data = self.model.buffers[buffer_index].data
        if data is None or len(data) == 0:
            return None
        return np.asarray(data, dtype=np.uint8)

    def constant(self, index: int, dequantize: bool = True) -> np.ndarray:
        """The value of a constant tensor (through DEQUANTIZE of a constant), as float32 when dequantized."""
        data = self.buffer_data(index)
        if data is None:
            producer = self.producers().get(index)
            if producer is not None:
                operator = self.subgraph.operators[producer]
                if self.operator_name(operator) == "DEQUANTIZE":
                    return self.constant(int(operator.inputs[0]), dequantize=True)
            raise IncompatibleModelError(
                f"tensor {self.tensor_name(index)!r} is computed at run time, not stored in the file; "
                "the classifier weights must be constants"
            )
        type_name = self.tensor_type(index)
        if type_name not in _NUMPY_TYPES:
            raise IncompatibleModelError(f"constant tensor {self.tensor_name(index)!r} has unsupported type {type_name}")
        values = np.frombuffer(data.tobytes(), dtype=np.dtype(_NUMPY_TYPES[type_name]).newbyteorder("<"))
        shape = self.tensor_shape(index)
        values = values.reshape(shape) if shape else values
        if not dequantize:
            return values
        scales, zero_points, axis = self.quantization(index)
        if scales.size and values.dtype.kind in "iu":
            if scales.size == 1:
                return ((values.astype(np.float64) - zero_points[0]) * scales[0]).astype(np.float32)
            broadcast = [1] * values.ndim
            broadcast[axis] = scales.size
            return (
                (values.astype(np.float64) - zero_points.reshape(broadcast)) * scales.reshape(broadcast)
            ).astype(np.float32)
        return values.astype(np.float32)

    # -- editing --------------------------------------------------------------------
    def add_buffer(self, payload: bytes | None = None) -> int:
        buffer = self.schema.BufferT()
        buffer.data = None if not payload else np.frombuffer(bytes(payload), dtype=np.uint8).copy()
        self.model.buffers.append(buffer)
        return len(self.model.buffers) - 1

    def add_tensor(
        self,
        name: str,
        shape: Sequence[int],
        type_name: str,
        *,
        data: np.ndarray | None = None,
        scale: float | Sequence[float] | None = None,
        zero_point: int | Sequence[int] | None = None,
        quantized_dimension: int = 0,
        shape_signature: Sequence[int] | None = None,
    ) -> int:
        """Append a tensor (a constant when ``data`` is given) and return its index."""
        tensor = self.schema.TensorT()
        tensor.name = name
        tensor.shape = np.asarray(list(shape), dtype=np.int32)
        if shape_signature is not None:
            tensor.shapeSignature = np.asarray(list(shape_signature), dtype=np.int32)
        tensor.type = getattr(self.schema.TensorType, type_name)
        if data is not None:
            dtype = np.dtype(_NUMPY_TYPES[type_name]).newbyteorder("<")
            tensor.buffer = self.add_buffer(np.ascontiguousarray(data, dtype=dtype).tobytes())
        else:
            tensor.buffer = self.add_buffer(None)
        if scale is not None:
            quantization = self.schema.QuantizationParametersT()
            quantization.scale = np.atleast_1d(np.asarray(scale, dtype=np.float32))
            points = np.zeros(quantization.scale.size, np.int64) if zero_point is None else zero_point
            quantization.zeroPoint = np.atleast_1d(np.asarray(points, dtype=np.int64))
            quantization.quantizedDimension = int(quantized_dimension)
            tensor.quantization = quantization
        self.subgraph.tensors.append(tensor)
        return len(self.subgraph.tensors) - 1

    def opcode_index(self, operator_name: str, version: int = 1) -> int:
        builtin = getattr(self.schema.BuiltinOperator, operator_name)
        for position, code in enumerate(self.model.operatorCodes):
            if max(int(code.builtinCode), int(code.deprecatedBuiltinCode)) == builtin and code.customCode is None:
                code.version = max(int(code.version), version)
                return position
        code = self.schema.OperatorCodeT()
        code.builtinCode = builtin
        code.deprecatedBuiltinCode = min(builtin, 127)
        code.version = version
        self.model.operatorCodes.append(code)
        return len(self.model.operatorCodes) - 1

    def add_operator(
        self,
        operator_name: str,
        inputs: Sequence[int],
        outputs: Sequence[int],
        options: Any = None,
        options_type: str | None = None,
        version: int = 1,
    ) -> None:
        operator = self.schema.OperatorT()
        operator.opcodeIndex = self.opcode_index(operator_name, version)
        operator.inputs = np.asarray(list(inputs), dtype=np.int32)
        operator.outputs = np.asarray(list(outputs), dtype=np.int32)
        if options is not None:
            operator.builtinOptionsType = getattr(self.schema.BuiltinOptions, options_type)
            operator.builtinOptions = options
        self.subgraph.operators.append(operator)

    def set_io(self, inputs: Sequence[int], outputs: Sequence[int], input_names: Sequence[str],
               output_names: Sequence[str]) -> None:
        """Set the subgraph's inputs/outputs and a matching ``serving_default`` signature."""
        self.subgraph.inputs = np.asarray(list(inputs), dtype=np.int32)
        self.subgraph.outputs = np.asarray(list(outputs), dtype=np.int32)
        signature = self.schema.SignatureDefT()
        signature.signatureKey = SIGNATURE_KEY
        signature.subgraphIndex = 0

        def tensor_map(name: str, index: int) -> Any:
            entry = self.schema.TensorMapT()
            entry.name = name
            entry.tensorIndex = int(index)
            return entry

        signature.inputs = [tensor_map(name, index) for name, index in zip(input_names, inputs)]
        signature.outputs = [tensor_map(name, index) for name, index in zip(output_names, outputs)]
        self.model.signatureDefs = [signature]

    def prune(self, keep_metadata: Sequence[str] = ("min_runtime_version",)) -> dict[str, int]:
        """Drop every operator, tensor, buffer, operator code and subgraph the outputs do not need.

        Keeps the model metadata entries named in ``keep_metadata`` (their buffers too).
        Returns counts of what was dropped.
        """
        operators = self.subgraph.operators
        needed = set(self.outputs)
        kept_positions = []
        for position in range(len(operators) - 1, -1, -1):
            operator = operators[position]
            outputs = [int(index) for index in (operator.outputs if operator.outputs is not None else [])]
            if not needed.intersection(outputs):
                continue
            kept_positions.append(position)
            for index in operator.inputs if operator.inputs is not None else []:
                if index >= 0:
                    needed.add(int(index))
            for index in operator.intermediates if operator.intermediates is not None else []:
                needed.add(int(index))
            needed.update(outputs)
        kept_positions.reverse()
        kept_operators = [operators[position] for position in kept_positions]
        for operator in kept_operators:
            if self.operator_name(operator) in _CONTROL_FLOW_OPERATORS:
                raise IncompatibleModelError(
                    f"the backbone uses control flow ({self.operator_name(operator)}); edgeadapt cannot cut such models"
                )
        unused_inputs = [index for index in self.inputs if index not in needed]
        if unused_inputs:
            raise IncompatibleModelError(
                f"the embedding does not depend on the model input {self.tensor_name(unused_inputs[0])!r}; "
                "this is not an image classifier edgeadapt can cut"
            )
        needed.update(self.inputs)
        tensor_order = sorted(needed)
        tensor_map = {old: new for new, old in enumerate(tensor_order)}

        def remap(indices: Any) -> Any:
            if indices is None:
                return None
            return np.asarray([tensor_map[int(i)] if i >= 0 else -1 for i in indices], dtype=np.int32)

        for operator in kept_operators:
            operator.inputs = remap(operator.inputs)
            operator.outputs = remap(operator.outputs)
            if operator.intermediates is not None:
                operator.intermediates = remap(operator.intermediates)
        tensors = [self.subgraph.tensors[old] for old in tensor_order]
        # buffers: 0 stays the empty sentinel; then tensor buffers, then kept metadata buffers
        buffer_map: dict[int, int] = {0: 0}
        new_buffers = [self.model.buffers[0] if self.model.buffers else self.schema.BufferT()]

        def keep_buffer(old: int) -> int:
            if old not in buffer_map:
                buffer_map[old] = len(new_buffers)
                new_buffers.append(self.model.buffers[old])
            return buffer_map[old]

        for tensor in tensors:
            tensor.buffer = keep_buffer(int(tensor.buffer)) if tensor.buffer else 0
        kept_metadata = []
        for entry in self.model.metadata or []:
            if _name(entry.name) in keep_metadata:
                entry.buffer = keep_buffer(int(entry.buffer))
                kept_metadata.append(entry)
        # operator codes
        code_map: dict[int, int] = {}
        new_codes = []
        for operator in kept_operators:
            if operator.opcodeIndex not in code_map:
                code_map[operator.opcodeIndex] = len(new_codes)
                new_codes.append(self.model.operatorCodes[operator.opcodeIndex])
            operator.opcodeIndex = code_map[operator.opcodeIndex]
        dropped = {
            "operators": len(operators) - len(kept_operators),
            "tensors": len(self.subgraph.tensors) - len(tensors),
            "buffers": len(self.model.buffers) - len(new_buffers),
            "subgraphs": len(self.model.subgraphs) - 1,
            "metadata": len(self.model.metadata or []) - len(kept_metadata),
        }
        old_inputs, old_outputs = self.inputs, self.outputs
        self.subgraph.operators = kept_operators
        self.subgraph.tensors = tensors
        self.subgraph.inputs = remap(old_inputs)
        self.subgraph.outputs = remap(old_outputs)
        self.model.buffers = new_buffers
        self.model.operatorCodes = new_codes
        self.model.metadata = kept_metadata or None
        self.model.subgraphs = [self.subgraph]
        if getattr(self.model, "signatureDefs", None):
            for signature in self.model.signatureDefs:
                for entry in list(signature.inputs or []) + list(signature.outputs or []):
                    entry.tensorIndex = tensor_map.get(int(entry.tensorIndex), 0)
        self.model.metadataBuffer = None
        return dropped

    def find_tensor(self, name: str) -> int | None:
        for index, tensor in enumerate(self.subgraph.tensors):
            if _name(tensor.name) == name:
                return index
        return None


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
    producers = graph.producers()
    tail: list[str] = []
    current = output
    for _ in range(32):
        position = producers.get(current)
        if position is None:
            raise IncompatibleModelError(
                f"no classifier head found: the output {graph.tensor_name(output)!r} is not computed by a "
                "FULLY_CONNECTED or 1x1 CONV_2D layer"
            )
        operator = graph.subgraph.operators[position]
        name = graph.operator_name(operator)
        if name in _TAIL_OPERATORS:
            tail.append(name)
            current = int(operator.inputs[0])
            continue
        if name == "LOGISTIC":
            raise IncompatibleModelError(
                "the classifier ends in LOGISTIC (sigmoid, multi-label scores); edgeadapt imports single-label "
                "classifiers whose linear layer feeds an optional SOFTMAX"
            )
        if name in ("FULLY_CONNECTED", "CONV_2D"):
            return _check_linear(graph, position, name, list(reversed(tail)))
        chain = " <- ".join([*tail, name]) if tail else name
        raise IncompatibleModelError(
            f"no classifier head found: the output {graph.tensor_name(output)!r} {shape} is produced by {chain}; "
            "edgeadapt looks for the last FULLY_CONNECTED, or a 1x1 CONV_2D on a pooled 1x1 map, followed only by "
            f"{'/'.join(_TAIL_OPERATORS)}. If the model is a feature extractor (its output is the embedding), import "
            "it without labels: `edgeadapt import MODEL.tflite --out B.eab` makes a bundle with zero classes"
        )
    raise IncompatibleModelError("no classifier head found: the output tail is longer than 32 operators")


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
    location = locate_head(graph)
    head = head_from_location(graph, location)
    input_dtype = graph.tensor_dtype(inputs[0])
    if input_dtype not in ("float32", "uint8", "int8"):
        raise IncompatibleModelError(f"the model input has type {input_dtype}; edgeadapt supports float32, uint8, int8")
    scales, zero_points, _ = graph.quantization(inputs[0])
    height, width, channels = input_shape[1:]
    if options.input_size is not None and tuple(options.input_size) != (height, width):
        logger.warning("ignoring input_size %s: the TFLite model's input is %dx%d", options.input_size, height, width)
    spec, source = input_spec_from_quantization(
        height, width, channels, input_dtype,
        float(scales[0]) if scales.size else 0.0, int(zero_points[0]) if scales.size else 0, options,
    )
    if options.channel_mean is not None:
        raise InputError("per-channel mean/std normalisation is supported for ONNX imports only")
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
    backbone_content = write_tflite_model(model)
    described = inspect_tflite(backbone_content)
    if described.output.dtype != "float32":
        raise ConversionError(f"the cut backbone has a {described.output.dtype} output; expected float32")
    _check_builtin_only(backbone_content)
    _smoke_test(backbone_content, head.embedding_size)
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
            "original_input": {"dtype": input_dtype, "scale": float(scales[0]) if scales.size else 0.0,
                               "zero_point": int(zero_points[0]) if scales.size else 0},
        },
    )


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
