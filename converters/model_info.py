"""What an exported backbone file is: format, quantization, input and output tensors.

:class:`ExportedModel` is what the exporters return and what the bundle writer records
in the manifest. :func:`inspect_model` rebuilds it from an existing ``.tflite`` or
``.onnx`` file (e.g. one exported earlier or by a third party). Needs ai-edge-litert
for TFLite files and onnx for ONNX files; both are imported lazily.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeadapt.device.errors import ConversionError
from edgeadapt.device.safefs import durable_write

logger = logging.getLogger(__name__)

FORMATS = ("tflite", "onnx")
QUANTIZATION_MODES = ("float32", "int8")
_TENSOR_DTYPES = ("float32", "int8", "uint8")


@dataclass
class TensorQuantization:
    """Element type of a model tensor and, for integer tensors, its affine quantization.

    The real value of an integer element ``q`` is ``(q - zero_point) * scale``.
    ``scale`` is 0.0 and ``zero_point`` 0 for float tensors.
    """

    dtype: str
    scale: float = 0.0
    zero_point: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "scale": float(self.scale), "zero_point": int(self.zero_point)}


@dataclass
class ExportedModel:
    """An exported backbone: the file content plus what a runtime needs to feed it."""

    content: bytes
    format: str
    quantization: str
    input: TensorQuantization
    output: TensorQuantization
    input_name: str
    output_name: str

    @property
    def size(self) -> int:
        """Size of the model file in bytes."""
        return len(self.content)

    @property
    def suffix(self) -> str:
        """File suffix for this format: ".tflite" or ".onnx"."""
        return "." + self.format

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model file to ``path`` atomically (temp file, fsync, rename); return the path."""
        path = durable_write(path, self.content)
        logger.info("wrote %s model (%s, %d bytes) to %s", self.format, self.quantization, self.size, path)
        return path

    def describe(self) -> dict[str, Any]:
        """A JSON-ready summary (no file content)."""
        return {
            "format": self.format,
            "quantization": self.quantization,
            "input": self.input.to_dict(),
            "output": self.output.to_dict(),
            "input_name": self.input_name,
            "output_name": self.output_name,
            "size": self.size,
        }


# -- TFLite -----------------------------------------------------------------------------

def tflite_interpreter(content: bytes) -> Any:
    """An ai_edge_litert Interpreter for ``content``; ConversionError when it cannot load."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as error:
        raise ConversionError(
            "reading a .tflite model needs ai-edge-litert: pip install 'edgeadapt[host]'"
        ) from error
    try:
        return Interpreter(model_content=bytes(content))
    except Exception as error:  # the runtime raises ValueError/RuntimeError for bad files
        raise ConversionError(f"the TFLite model cannot be loaded ({error}); re-export it") from error


def check_tflite_runs(content: bytes, embedding_size: int, description: str = "TFLite model") -> None:
    """Run a .tflite backbone once on a batch of 2 zero images: it must resize, run and give (2, D).

    Raises :class:`ConversionError` naming ``description`` otherwise.
    """
    interpreter = tflite_interpreter(content)
    details = interpreter.get_input_details()[0]
    shape = [2, *details["shape"][1:]]
    try:
        interpreter.resize_tensor_input(details["index"], shape)
        interpreter.allocate_tensors()
        interpreter.set_tensor(details["index"], np.zeros(shape, dtype=details["dtype"]))
        interpreter.invoke()
        output = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    except Exception as error:  # the interpreters raise RuntimeError/ValueError with their own text
        raise ConversionError(f"the {description} does not run on a batch of 2 ({error}); report this model") from error
    if output.shape != (2, embedding_size):
        raise ConversionError(
            f"the {description} returns shape {output.shape} for a batch of 2, expected (2, {embedding_size})"
        )


def _tflite_operator_codes(content: bytes) -> set[tuple[str, bool]]:
    """(name, is_custom) for every operator code of a .tflite model."""
    try:
        from ai_edge_litert import schema_py_generated as schema
    except ImportError:  # older runtimes: ask the interpreter instead
        schema = None
    if schema is not None:
        try:
            model = schema.Model.GetRootAs(bytes(content), 0)
            builtin_names = {
                value: name for name, value in vars(schema.BuiltinOperator).items() if not name.startswith("_")
            }
            codes = set()
            for index in range(model.OperatorCodesLength()):
                code = model.OperatorCodes(index)
                builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
                if builtin == schema.BuiltinOperator.CUSTOM:
                    custom = code.CustomCode()
                    codes.add((custom.decode("utf-8", "replace") if custom else "CUSTOM", True))
                else:
                    codes.add((builtin_names.get(builtin, f"BUILTIN_{builtin}"), False))
            return codes
        except Exception as error:  # fall back to the interpreter on a schema mismatch
            logger.debug("could not read operator codes from the flatbuffer: %s", error)
    interpreter = tflite_interpreter(content)
    names = {details["op_name"] for details in interpreter._get_ops_details()}
    return {(name, name.startswith("Flex") or not name.isupper()) for name in names}


def tflite_operator_names(content: bytes) -> list[str]:
    """Sorted names of the operators a .tflite model uses.

    Builtin operators are named as in the TFLite schema ("CONV_2D"); custom operators by
    their custom code, so select-TF ops appear as "Flex..." names.
    """
    return sorted({name for name, _ in _tflite_operator_codes(content)})


def tflite_custom_operator_names(content: bytes) -> list[str]:
    """Sorted names of the Flex (select-TF) and custom operators of a .tflite model.

    A stock TFLite/LiteRT runtime cannot run a model for which this list is not empty.
    """
    return sorted({name for name, custom in _tflite_operator_codes(content) if custom})


def _tensor_quantization(details: dict[str, Any], what: str) -> TensorQuantization:
    dtype = np.dtype(details["dtype"]).name
    if dtype not in _TENSOR_DTYPES:
        raise ConversionError(f"the model's {what} tensor has type {dtype}; edgeadapt supports float32, int8 and uint8")
    if dtype == "float32":
        return TensorQuantization("float32", 0.0, 0)
    scale, zero_point = details["quantization"]
    parameters = details.get("quantization_parameters") or {}
    scales = np.asarray(parameters.get("scales", []))
    if scales.size > 1:
        raise ConversionError(f"the model's {what} tensor is quantized per channel; edgeadapt needs one scale for it")
    return TensorQuantization(dtype, float(scale), int(zero_point))


def inspect_tflite(content: bytes) -> ExportedModel:
    """Describe a .tflite backbone with one input and one output."""
    interpreter = tflite_interpreter(content)
    inputs = interpreter.get_input_details()
    outputs = interpreter.get_output_details()
    if len(inputs) != 1 or len(outputs) != 1:
        raise ConversionError(
            f"the TFLite model has {len(inputs)} inputs and {len(outputs)} outputs; "
            "a backbone needs one image input and one embedding output"
        )
    input_quantization = _tensor_quantization(inputs[0], "input")
    output_quantization = _tensor_quantization(outputs[0], "output")
    integer_tensors = any(
        np.dtype(details["dtype"]) in (np.int8, np.uint8) for details in interpreter.get_tensor_details()
    )
    return ExportedModel(
        content=bytes(content),
        format="tflite",
        quantization="int8" if integer_tensors else "float32",
        input=input_quantization,
        output=output_quantization,
        input_name=str(inputs[0]["name"]),
        output_name=str(outputs[0]["name"]),
    )


# -- ONNX -------------------------------------------------------------------------------

_ONNX_DTYPES = {1: "float32", 2: "uint8", 3: "int8"}
_ONNX_QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger"}


def onnx_operator_names(content: bytes) -> list[str]:
    """Sorted operator types used in the main graph of an ONNX model."""
    model = _load_onnx(content)
    return sorted({node.op_type for node in model.graph.node})


def _load_onnx(content: bytes) -> Any:
    try:
        import onnx
    except ImportError as error:
        raise ConversionError("reading an .onnx model needs onnx: pip install 'edgeadapt[host]'") from error
    try:
        return onnx.load_from_string(bytes(content))
    except Exception as error:
        raise ConversionError(f"the ONNX model cannot be parsed ({error}); re-export it") from error


def inspect_onnx(content: bytes) -> ExportedModel:
    """Describe an .onnx backbone with one input and one output."""
    model = _load_onnx(content)
    initializers = {initializer.name for initializer in model.graph.initializer}
    inputs = [value for value in model.graph.input if value.name not in initializers]
    outputs = list(model.graph.output)
    if len(inputs) != 1 or len(outputs) != 1:
        raise ConversionError(
            f"the ONNX model has {len(inputs)} inputs and {len(outputs)} outputs; "
            "a backbone needs one image input and one embedding output"
        )

    def quantization(value: Any, what: str) -> TensorQuantization:
        element_type = value.type.tensor_type.elem_type
        if element_type not in _ONNX_DTYPES:
            raise ConversionError(
                f"the ONNX model's {what} has element type {element_type}; edgeadapt supports float32, int8 and uint8"
            )
        # Integer graph inputs of an ONNX model carry no scale; the graph itself dequantizes.
        return TensorQuantization(_ONNX_DTYPES[element_type], 0.0, 0)

    quantized = any(node.op_type in _ONNX_QUANTIZED_OPS for node in model.graph.node)
    return ExportedModel(
        content=bytes(content),
        format="onnx",
        quantization="int8" if quantized else "float32",
        input=quantization(inputs[0], "input"),
        output=quantization(outputs[0], "output"),
        input_name=inputs[0].name,
        output_name=outputs[0].name,
    )


def inspect_model(path: str | os.PathLike) -> ExportedModel:
    """Read a ``.tflite`` or ``.onnx`` file and describe it as an :class:`ExportedModel`.

    Args:
        path: The model file.

    Returns:
        Its format, operators, input/output tensors and quantization.

    Raises:
        ConversionError: When the file cannot be read as TFLite or ONNX.
    """
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"model file {str(path)!r} does not exist")
    content = path.read_bytes()
    suffix = path.suffix.lower()
    if suffix == ".tflite":
        return inspect_tflite(content)
    if suffix == ".onnx":
        return inspect_onnx(content)
    raise ConversionError(f"{str(path)!r} is neither a .tflite nor an .onnx file; rename it or give the right file")
