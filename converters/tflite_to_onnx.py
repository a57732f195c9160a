"""Convert a TFLite backbone to ONNX (tf2onnx reads TFLite), so imported bundles carry both formats.

``tf2onnx.convert.from_tflite`` turns a quantized TFLite graph into an ONNX QDQ graph
(QuantizeLinear/DequantizeLinear around float operators, int8/uint8 weights kept). The
result is then shaped like the backbones edgeadapt exports itself:

- input ``"input"``: float32 (batch, H, W, C), the normalised pixels ``pixel * scale + offset``;
  a quantized TFLite input becomes a QuantizeLinear with the same scale and zero point, so the
  integer that reaches the first layer is exactly the one the TFLite model gets;
- output ``"embedding"``: float32 (batch, D);
- a symbolic batch dimension (``"batch"``), checked by running a batch of 2.

:func:`measure_backbone_parity` compares the two files on the same images with the device
interpreters. TensorFlow and tf2onnx are imported lazily (tf2onnx needs TensorFlow).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeadapt.converters.model_info import ExportedModel, inspect_onnx, inspect_tflite
from edgeadapt.device.errors import ConversionError
from edgeadapt.device.head import Head
from edgeadapt.device.manifest import InputSpec

logger = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "embedding"
BATCH_DIMENSION = "batch"
_ONNX_INTEGER_TYPES = {2: np.uint8, 3: np.int8}


@dataclass
class BackboneParity:
    """Agreement of a converted backbone with its source on the same images."""

    format: str
    reference: str
    samples: int
    top1_agreement: float
    embedding_cosine: float
    embedding_max_abs_difference: float
    embedding_scale: float

    def to_dict(self) -> dict[str, Any]:
        return {key: (round(value, 6) if isinstance(value, float) else value) for key, value in asdict(self).items()}


def tflite_to_onnx(content: bytes, opset: int = 17) -> ExportedModel:
    """Convert a TFLite backbone (one image input, one float embedding output) to ONNX.

    Args:
        content: The ``.tflite`` backbone's bytes.
        opset: The ONNX opset to write.

    Returns:
        The ``.onnx`` bytes with their operators and quantization.

    Raises:
        ConversionError: When tf2onnx cannot convert the model.
    """
    from edgeadapt.converters.tflite_export import captured_native_output, import_tensorflow

    described = inspect_tflite(content)
    import_tensorflow()  # quiets TensorFlow's logs before tf2onnx imports it
    try:
        import onnx
        import tf2onnx
    except ImportError as error:
        raise ConversionError("TFLite -> ONNX needs tf2onnx and onnx: pip install 'edgeadapt[host]'") from error
    with tempfile.TemporaryDirectory(prefix="edgeadapt-tflite2onnx-") as directory:
        path = Path(directory) / "backbone.tflite"
        path.write_bytes(content)
        native = None
        try:
            with captured_native_output() as native:
                model_proto, _ = tf2onnx.convert.from_tflite(str(path), opset=opset)
        except Exception as error:
            details = str(error)
            if native is not None and native.text.strip():
                details += " | " + " ".join(native.text.strip().splitlines()[-3:])
            raise ConversionError(f"tf2onnx cannot convert the TFLite backbone to ONNX: {details}") from error
    _normalise_interface(model_proto, described)
    try:
        onnx.checker.check_model(model_proto)
    except Exception as error:
        raise ConversionError(f"the converted ONNX backbone is invalid: {error}") from error
    onnx_content = model_proto.SerializeToString()
    _check_runs(onnx_content, described.input.dtype)
    result = inspect_onnx(onnx_content)
    result.quantization = described.quantization
    logger.info("converted TFLite backbone to ONNX opset %d (%d bytes)", opset, len(onnx_content))
    return result


def _normalise_interface(model_proto: Any, described: ExportedModel) -> None:
    """Float32 input "input" (+ QuantizeLinear for quantized inputs), output "embedding", symbolic batch."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model_proto.graph
    initializers = {initializer.name for initializer in graph.initializer}
    inputs = [value for value in graph.input if value.name not in initializers]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise ConversionError(f"the converted ONNX graph has {len(inputs)} inputs and {len(graph.output)} outputs")
    old_input = inputs[0]
    element_type = old_input.type.tensor_type.elem_type
    dimensions = [d.dim_value if d.HasField("dim_value") else -1 for d in old_input.type.tensor_type.shape.dim]
    if element_type in _ONNX_INTEGER_TYPES:
        if not described.input.scale > 0:
            raise ConversionError("the quantized TFLite input has no scale; cannot build a float ONNX input")
        quantized_name = old_input.name + "_quantized"
        for node in graph.node:
            node.input[:] = [quantized_name if name == old_input.name else name for name in node.input]
        scale_name, zero_name = "edgeadapt_input_scale", "edgeadapt_input_zero_point"
        graph.initializer.extend([
            numpy_helper.from_array(np.array(described.input.scale, np.float32), scale_name),
            numpy_helper.from_array(np.array(described.input.zero_point, _ONNX_INTEGER_TYPES[element_type]), zero_name),
        ])
        graph.node.insert(0, helper.make_node("QuantizeLinear", [INPUT_NAME, scale_name, zero_name], [quantized_name],
                                              name="edgeadapt_quantize_input"))
        graph.input.remove(old_input)
        graph.input.insert(0, helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [BATCH_DIMENSION, *dimensions[1:]]))
    elif element_type == TensorProto.FLOAT:
        if old_input.name != INPUT_NAME:
            for node in graph.node:
                node.input[:] = [INPUT_NAME if name == old_input.name else name for name in node.input]
            old_input.name = INPUT_NAME
        old_input.type.tensor_type.shape.dim[0].Clear()
        old_input.type.tensor_type.shape.dim[0].dim_param = BATCH_DIMENSION
    else:
        raise ConversionError(f"the converted ONNX input has element type {element_type}; expected float or uint8/int8")
    output = graph.output[0]
    if output.name != OUTPUT_NAME:
        for node in graph.node:
            node.output[:] = [OUTPUT_NAME if name == output.name else name for name in node.output]
            node.input[:] = [OUTPUT_NAME if name == output.name else name for name in node.input]
        output.name = OUTPUT_NAME
    if output.type.tensor_type.elem_type != TensorProto.FLOAT:
        raise ConversionError("the converted ONNX backbone does not output float32 embeddings")
    output_dimensions = output.type.tensor_type.shape.dim
    if len(output_dimensions) > 0:
        output_dimensions[0].Clear()
        output_dimensions[0].dim_param = BATCH_DIMENSION
    # fixed intermediate shapes recorded for batch 1 would contradict a larger batch
    del graph.value_info[:]


def _check_runs(content: bytes, original_input_dtype: str) -> None:
    import onnxruntime

    try:
        session = onnxruntime.InferenceSession(content, providers=["CPUExecutionProvider"])
        shape = [2 if not isinstance(d, int) else d for d in session.get_inputs()[0].shape]
        shape[0] = 2
        output = session.run(None, {INPUT_NAME: np.zeros(shape, np.float32)})[0]
    except Exception as error:
        raise ConversionError(
            f"the converted ONNX backbone does not run on a batch of 2 ({error}); the TFLite graph may fix the batch size"
        ) from error
    if output.ndim != 2 or output.shape[0] != 2:
        raise ConversionError(f"the converted ONNX backbone returns shape {output.shape}, expected (2, D)")


def measure_backbone_parity(
    reference_content: bytes,
    reference_format: str,
    candidate_content: bytes,
    candidate_format: str,
    spec: InputSpec,
    head: Head,
    images: np.ndarray,
) -> BackboneParity:
    """Embeddings and head top-1 of two backbone files on the same uint8 images (device interpreters)."""
    from edgeadapt.converters.parity import run_exported

    reference = run_exported(reference_content, reference_format, spec, images)
    candidate = run_exported(candidate_content, candidate_format, spec, images)
    numerator = np.einsum("ij,ij->i", reference, candidate)
    denominator = np.linalg.norm(reference, axis=1) * np.linalg.norm(candidate, axis=1)
    cosine = float(np.mean(numerator / np.maximum(denominator, 1e-12)))
    agreement = float(np.mean(head.logits(reference).argmax(1) == head.logits(candidate).argmax(1)))
    return BackboneParity(
        format=candidate_format,
        reference=f"{reference_format} backbone",
        samples=int(len(images)),
        top1_agreement=agreement,
        embedding_cosine=cosine,
        embedding_max_abs_difference=float(np.max(np.abs(reference - candidate))) if len(images) else 0.0,
        embedding_scale=float(np.max(np.abs(reference))) if len(images) else 0.0,
    )
