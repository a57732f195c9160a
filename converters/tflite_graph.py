"""Read, edit and write ``.tflite`` flatbuffers: the object API and :class:`TFLiteGraph`.

The layer under the TFLite importers (:mod:`edgeadapt.converters.tflite_import`,
:mod:`edgeadapt.converters.tflite_extractor`), the fused export and the detector tools. The
schema comes from ``ai_edge_litert.schema_py_generated`` (or TensorFlow's copy); TensorFlow
is not imported by this module. Host side only.
"""

from __future__ import annotations

from typing import Any, Collection, Sequence

import numpy as np

from edgeadapt.converters.model_info import tflite_interpreter
from edgeadapt.device.errors import ConversionError, IncompatibleModelError

#: The signature key of the models edgeadapt writes.
SIGNATURE_KEY = "serving_default"
_CONTROL_FLOW_OPERATORS = ("IF", "WHILE", "CALL_ONCE", "CALL")


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

    def producer_behind(self, tensor: int, skipped: Collection[str], limit: int = 32
                        ) -> tuple[int | None, str | None, list[str]]:
        """The operator that computes ``tensor`` behind a tail of ``skipped`` operators.

        Args:
            tensor: The tensor to start from (usually the graph output).
            skipped: Operator names walked through (e.g. RESHAPE, SOFTMAX), input 0 each.
            limit: The most operators walked.

        Returns:
            (position, name, tail): the operator's position and name, and the skipped operators'
            names in graph order (from that operator to ``tensor``). ``position`` is None when a
            graph input is reached (``name`` None) or the tail is longer than ``limit`` (``name`` "").
        """
        producers = self.producers()
        tail: list[str] = []
        current = tensor
        for _ in range(limit):
            position = producers.get(current)
            if position is None:
                return None, None, list(reversed(tail))
            operator = self.subgraph.operators[position]
            name = self.operator_name(operator)
            if name not in skipped:
                return position, name, list(reversed(tail))
            tail.append(name)
            current = int(operator.inputs[0])
        return None, "", list(reversed(tail))

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
        kept_operators, needed = self._needed_operators()
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
        new_buffers, kept_metadata = self._keep_buffers(tensors, keep_metadata)
        new_codes = self._keep_operator_codes(kept_operators)
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

    def _needed_operators(self) -> tuple[list[Any], set[int]]:
        """(operators the outputs depend on, in graph order; indices of every tensor they and the inputs use).

        Raises IncompatibleModelError for control flow, or a model input the outputs do not use.
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
        return kept_operators, needed

    def _keep_buffers(self, tensors: list[Any], keep_metadata: Sequence[str]) -> tuple[list[Any], list[Any]]:
        """(the buffers ``tensors`` and the kept metadata use, renumbered in place; the kept metadata entries).

        Buffer 0 stays the empty sentinel; then tensor buffers, then kept metadata buffers.
        """
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
        return new_buffers, kept_metadata

    def _keep_operator_codes(self, kept_operators: list[Any]) -> list[Any]:
        """The operator codes ``kept_operators`` use, renumbered in place."""
        code_map: dict[int, int] = {}
        new_codes = []
        for operator in kept_operators:
            if operator.opcodeIndex not in code_map:
                code_map[operator.opcodeIndex] = len(new_codes)
                new_codes.append(self.model.operatorCodes[operator.opcodeIndex])
            operator.opcodeIndex = code_map[operator.opcodeIndex]
        return new_codes

    def find_tensor(self, name: str) -> int | None:
        for index, tensor in enumerate(self.subgraph.tensors):
            if _name(tensor.name) == name:
                return index
        return None
