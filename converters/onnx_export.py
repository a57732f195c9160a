"""Export a Keras backbone to ONNX: float32, or int8 QDQ with per-channel weights.

The graph has one float32 input ``"input"`` (batch, H, W, C) and one float32 output
``"embedding"`` (batch, D); the batch dimension is symbolic (``"batch"``). Quantization
uses onnxruntime.quantization (shape pre-processing, then static QDQ quantization
calibrated on real images); the input and output stay float32, so the graph quantizes
its input itself and a runtime feeds it normalized float pixels.

The backbone is traced as an inference-mode ``tf.function`` and converted with
``tf2onnx.convert.from_function`` (``from_keras`` fails on some Keras 3 models).
TensorFlow, tf2onnx, onnx and onnxruntime are imported lazily.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeadapt.converters.calibration import check_image_batch, normalized_batches, select_calibration_images
from edgeadapt.converters.model_info import ExportedModel, TensorQuantization
from edgeadapt.converters.tflite_export import captured_native_output, check_backbone, import_tensorflow
from edgeadapt.device.errors import ConversionError, InputError
from edgeadapt.device.manifest import InputSpec

if TYPE_CHECKING:  # pragma: no cover
    import keras

logger = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "embedding"
BATCH_DIMENSION = "batch"


@dataclass(frozen=True)
class OnnxExportOptions:
    """How :func:`export_onnx` converts a backbone.

    quantize: int8 QDQ quantization (weights and activations) calibrated on real images;
        False exports a float32 model.
    opset: ONNX opset of the exported graph (13 or newer).
    calibration_samples: how many calibration images to use at most.
    per_channel: quantize convolution/matmul weights per output channel.
    reduce_range: quantize weights to 7 bits. onnxruntime's x86-64 int8 kernels on CPUs
        without VNNI can saturate their 16-bit intermediate sums with full 8-bit weights
        (measured on this project's CI machine: embedding cosine 0.93 and top-1 0.86 of the
        float model, against 0.9997 and 1.0 with 7-bit weights); keep it on unless every
        device that runs the model has VNNI or ARM dot-product kernels.
    """

    quantize: bool = True
    opset: int = 17
    calibration_samples: int = 200
    per_channel: bool = True
    reduce_range: bool = True

    def __post_init__(self) -> None:
        if self.opset < 13:
            raise InputError(f"opset must be 13 or newer (QDQ per-channel quantization needs it), got {self.opset}")
        if self.calibration_samples < 1:
            raise InputError(f"calibration_samples must be at least 1, got {self.calibration_samples}")


def _convert_to_onnx(backbone: "keras.Model", spec: InputSpec, opset: int) -> Any:
    tf, _ = import_tensorflow()
    try:
        import tf2onnx
    except ImportError as error:
        raise ConversionError("ONNX export needs tf2onnx and onnx: pip install 'edgeadapt[host]'") from error
    signature = [tf.TensorSpec((None, *spec.shape), tf.float32, name=INPUT_NAME)]
    # tf2onnx.convert.from_keras fails on Keras 3 models built by calling them (e.g. a
    # Sequential without an Input); tracing our own inference-mode function works for all.
    serve = tf.function(lambda images: backbone(images, training=False), input_signature=signature)
    native = None
    try:
        with captured_native_output() as native:
            model_proto, _ = tf2onnx.convert.from_function(serve, input_signature=signature, opset=opset)
    except Exception as error:
        details = f"{error}"
        if native is not None and native.text.strip():
            details += " | " + " ".join(native.text.strip().splitlines()[-5:])
        raise ConversionError(
            f"tf2onnx could not convert the backbone to ONNX opset {opset}: {details}; "
            "replace layers that ONNX does not support or try another opset"
        ) from error
    return model_proto


def _name_graph(model_proto: Any) -> None:
    """Rename the output to "embedding" and make the batch dimension symbolic ("batch")."""
    graph = model_proto.graph
    initializers = {initializer.name for initializer in graph.initializer}
    inputs = [value for value in graph.input if value.name not in initializers]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise ConversionError(
            f"the ONNX graph has {len(inputs)} inputs and {len(graph.output)} outputs; "
            "a backbone needs one image input and one embedding output"
        )
    old_name = graph.output[0].name
    if old_name != OUTPUT_NAME:
        used = {name for node in graph.node for name in (*node.input, *node.output)} | initializers
        if OUTPUT_NAME in used:
            raise ConversionError(
                f"the ONNX graph already has a tensor named {OUTPUT_NAME!r}; rename that layer of the backbone"
            )
        for node in graph.node:
            node.output[:] = [OUTPUT_NAME if name == old_name else name for name in node.output]
            node.input[:] = [OUTPUT_NAME if name == old_name else name for name in node.input]
        for value in graph.value_info:
            if value.name == old_name:
                value.name = OUTPUT_NAME
        graph.output[0].name = OUTPUT_NAME
    for value in (inputs[0], graph.output[0]):
        dimensions = value.type.tensor_type.shape.dim
        if len(dimensions) > 0:
            dimensions[0].Clear()
            dimensions[0].dim_param = BATCH_DIMENSION


def _quantize(float_model: Any, images: np.ndarray, spec: InputSpec, options: OnnxExportOptions) -> bytes:
    import onnx

    try:
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as error:
        raise ConversionError("int8 ONNX export needs onnxruntime: pip install 'edgeadapt[host]'") from error

    class ImageReader(CalibrationDataReader):
        """Feeds normalized calibration batches to onnxruntime's calibrator."""

        def __init__(self) -> None:
            self._batches = normalized_batches(images, spec, batch_size=8)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._batches, None)
            return None if batch is None else {INPUT_NAME: batch}

    with tempfile.TemporaryDirectory(prefix="edgeadapt-onnx-") as directory:
        float_path = Path(directory) / "float.onnx"
        prepared_path = Path(directory) / "prepared.onnx"
        quantized_path = Path(directory) / "int8.onnx"
        onnx.save_model(float_model, str(float_path))
        # When symbolic shape inference is incomplete, onnxruntime saves
        # "sym_shape_infer_temp.onnx" into the working directory: run it inside the
        # temporary directory so that nothing is left behind (process-wide while it runs).
        with contextlib.chdir(directory):
            try:
                quant_pre_process(str(float_path), str(prepared_path))
            except Exception as error:
                logger.warning(
                    "symbolic shape inference failed (%s); pre-processing without it", error
                )
                try:
                    quant_pre_process(str(float_path), str(prepared_path), skip_symbolic_shape=True)
                except Exception as second_error:
                    raise ConversionError(
                        f"onnxruntime could not pre-process the model for quantization: {second_error}"
                    ) from second_error
        try:
            quantize_static(
                str(prepared_path),
                str(quantized_path),
                ImageReader(),
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                per_channel=options.per_channel,
                reduce_range=options.reduce_range,
                calibrate_method=CalibrationMethod.MinMax,
            )
        except Exception as error:
            raise ConversionError(f"onnxruntime int8 quantization failed: {error}") from error
        return quantized_path.read_bytes()


def _verify(content: bytes, spec: InputSpec, embedding_size: int) -> None:
    """Load the model in onnxruntime (CPU) and run a batch of 2."""
    try:
        import onnxruntime
    except ImportError as error:
        raise ConversionError("checking the ONNX export needs onnxruntime: pip install 'edgeadapt[host]'") from error
    session_options = onnxruntime.SessionOptions()
    session_options.log_severity_level = 3
    try:
        session = onnxruntime.InferenceSession(content, session_options, providers=["CPUExecutionProvider"])
        (output,) = session.run([OUTPUT_NAME], {INPUT_NAME: np.zeros((2, *spec.shape), dtype=np.float32)})
    except Exception as error:
        raise ConversionError(f"the exported ONNX model does not run in onnxruntime: {error}") from error
    if output.shape != (2, embedding_size) or output.dtype != np.float32:
        raise ConversionError(
            f"the exported ONNX model returns {output.dtype} {output.shape} for a batch of 2, "
            f"expected float32 (2, {embedding_size})"
        )


def export_onnx(
    backbone: "keras.Model",
    spec: InputSpec,
    calibration_images: np.ndarray | None,
    options: OnnxExportOptions = OnnxExportOptions(),
) -> ExportedModel:
    """Convert ``backbone`` to ONNX (float32 or int8 QDQ), input "input", output "embedding".

    ``calibration_images``: real uint8 images (N, H, W, C) matching ``spec``; needed
    when ``options.quantize`` (at most ``options.calibration_samples`` are used).
    The model's input is the normalized float image (``pixel * scale + offset``) in both
    modes. Raises :class:`ConversionError` when conversion, quantization or the final
    onnxruntime check fails.

    Args:
        backbone: The Keras backbone (image -> embedding).
        spec: The input spec.
        calibration_images: Real uint8 images for int8 calibration (None for float export).
        options: Quantization, opset, calibration sample size.

    Returns:
        The ``.onnx`` bytes with their operators and quantization.

    Raises:
        ConversionError: When conversion, quantization or the onnxruntime check fails.
    """
    embedding_size = check_backbone(backbone, spec)
    images: np.ndarray | None = None
    if options.quantize:
        if calibration_images is None:
            raise ConversionError(
                "int8 export needs real calibration images to measure activation ranges; "
                "pass calibration_images (uint8, shape (N, H, W, C)) or set quantize=False"
            )
        images = select_calibration_images(
            check_image_batch(calibration_images, spec), count=options.calibration_samples, seed=0
        )
        if images.shape[0] < 20:
            logger.warning("calibrating on only %d images; int8 accuracy may suffer (100-500 are typical)", images.shape[0])

    kind = "int8" if options.quantize else "float32"
    logger.info("converting backbone to %s ONNX (opset %d, input %s)", kind, options.opset, spec.shape)
    model_proto = _convert_to_onnx(backbone, spec, options.opset)
    _name_graph(model_proto)
    import onnx

    try:
        onnx.checker.check_model(model_proto)
    except Exception as error:
        raise ConversionError(f"tf2onnx produced an invalid ONNX model: {error}") from error
    if images is not None:
        content = _quantize(model_proto, images, spec, options)
    else:
        content = model_proto.SerializeToString()
    _verify(content, spec, embedding_size)
    exported = ExportedModel(
        content=content,
        format="onnx",
        quantization=kind,
        input=TensorQuantization("float32", 0.0, 0),
        output=TensorQuantization("float32", 0.0, 0),
        input_name=INPUT_NAME,
        output_name=OUTPUT_NAME,
    )
    logger.info("exported %s ONNX backbone: %d bytes", kind, exported.size)
    return exported
