"""Export a Keras backbone to TFLite: float32, or full-integer int8 with a float embedding.

The backbone is written as a SavedModel with one ``serving_default`` signature
(input ``"input"``: float32 (batch, H, W, C) with a dynamic batch; output
``"embedding"``: float32 (batch, D)) and converted with TFLite builtin operators only.
Models that would need Flex (select-TF) or custom operators are refused with a
:class:`ConversionError`, because device runtimes cannot run them.

TensorFlow is imported lazily, so importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from edgeadapt.converters.calibration import check_image_batch, normalized_batches, select_calibration_images
from edgeadapt.converters.model_info import (
    ExportedModel,
    check_tflite_runs,
    inspect_tflite,
    tflite_interpreter,
    tflite_custom_operator_names,
    tflite_operator_names,
)
from edgeadapt.device.errors import ConversionError, InputError
from edgeadapt.device.manifest import InputSpec

if TYPE_CHECKING:  # pragma: no cover
    import keras

logger = logging.getLogger(__name__)

TFLITE_INPUT_TYPES = ("int8", "uint8", "float32")


@dataclass(frozen=True)
class TFLiteExportOptions:
    """How :func:`export_tflite` converts a backbone.

    quantize: full-integer int8 quantization of weights and activations, calibrated on
        real images; False exports a float32 model.
    input_type: input tensor type of a quantized model ("int8", "uint8" or "float32").
        A float export always has a float32 input.
    calibration_samples: how many calibration images to use at most.
    """

    quantize: bool = True
    input_type: str = "int8"
    calibration_samples: int = 200

    def __post_init__(self) -> None:
        if self.input_type not in TFLITE_INPUT_TYPES:
            raise InputError(f"input_type must be one of {TFLITE_INPUT_TYPES}, got {self.input_type!r}")
        if self.calibration_samples < 1:
            raise InputError(f"calibration_samples must be at least 1, got {self.calibration_samples}")


# -- helpers shared with the ONNX exporter ----------------------------------------------

def import_tensorflow() -> tuple[Any, Any]:
    """Import and return ``(tensorflow, keras)``; quiets TensorFlow's C++ info logs.

    ``TF_CPP_MIN_LOG_LEVEL`` is only set (to "2", warnings and errors hidden below ERROR)
    when TensorFlow is not imported yet and the caller did not choose a level.
    """
    if "tensorflow" not in sys.modules:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import tensorflow as tf
        import keras
    except ImportError as error:
        raise ConversionError(
            "exporting a backbone needs TensorFlow and Keras: pip install 'edgeadapt[host]'"
        ) from error
    return tf, keras


def check_backbone(backbone: "keras.Model", spec: InputSpec) -> int:
    """Check that ``backbone`` maps a float32 (N, H, W, C) batch to (N, D) float32; return D."""
    tf, keras = import_tensorflow()
    if keras.backend.backend() != "tensorflow":
        raise ConversionError(
            f"Keras runs on the {keras.backend.backend()!r} backend; exporting needs the TensorFlow backend: "
            "set KERAS_BACKEND=tensorflow before importing keras"
        )
    if not isinstance(backbone, keras.Model):
        raise ConversionError(
            f"the backbone is a {type(backbone).__name__}, expected a keras.Model mapping images to embeddings"
        )
    try:
        input_shape = backbone.input_shape
    except (AttributeError, ValueError, TypeError):  # subclassed models may not know it
        input_shape = None
    if isinstance(input_shape, list):
        if len(input_shape) != 1:
            raise ConversionError(
                f"the backbone has {len(input_shape)} inputs; a backbone takes exactly one image batch"
            )
        input_shape = input_shape[0]
    if input_shape is not None:
        input_shape = tuple(input_shape)
        if len(input_shape) != 4 or any(
            known is not None and known != wanted for known, wanted in zip(input_shape[1:], spec.shape)
        ):
            raise ConversionError(
                f"the backbone's input shape is {input_shape} but the input spec says (None, {spec.height}, "
                f"{spec.width}, {spec.channels}); adapt the backbone or the spec so that they agree"
            )
    probe = np.zeros((2, *spec.shape), dtype=np.float32)
    try:
        output = backbone(probe, training=False)
    except Exception as error:
        raise ConversionError(
            f"the backbone fails on a (2, {spec.height}, {spec.width}, {spec.channels}) float32 batch: {error}"
        ) from error
    if isinstance(output, (list, tuple, dict)):
        raise ConversionError("the backbone returns several outputs; it must return one (N, D) embedding tensor")
    shape = tuple(output.shape)
    if len(shape) != 2 or shape[0] != 2:
        raise ConversionError(
            f"the backbone returns shape {shape} for a batch of 2; it must return (N, D) embeddings: "
            "end it with pooling/flatten, not a spatial map"
        )
    dtype = np.dtype(keras.backend.standardize_dtype(output.dtype))
    if dtype != np.float32:
        raise ConversionError(
            f"the backbone returns {dtype} embeddings; export needs float32 (use the float32 dtype policy)"
        )
    return int(shape[1])


class NativeOutput:
    """Text written to the process's stdout/stderr file descriptors while capturing."""

    def __init__(self) -> None:
        self.text = ""


@contextlib.contextmanager
def captured_native_output() -> Iterator[NativeOutput]:
    """Capture what native code (the MLIR converter, TF C++ logging) writes to fds 1 and 2.

    The text is logged at DEBUG level and kept in the yielded object for error messages.
    Python-level writes to sys.stdout/sys.stderr objects that are not the real file
    descriptors (e.g. under pytest) are not affected.
    """
    captured = NativeOutput()
    try:
        saved = (os.dup(1), os.dup(2))
    except OSError:  # no usable stdout/stderr descriptors: nothing to capture
        yield captured
        return
    with tempfile.TemporaryFile() as sink:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            sink.seek(0)
            captured.text = sink.read().decode("utf-8", "replace")
            if captured.text.strip():
                logger.debug("converter output:\n%s", captured.text)


# -- conversion -------------------------------------------------------------------------

_SELECT_OPS = re.compile(r"TF Select ops:\s*([^\n]+)")
_TF_OP = re.compile(r"'tf\.(\w+)' op is neither a custom op nor a flex op")


def _unsupported_tf_ops(message: str) -> list[str]:
    names: set[str] = set()
    for line in _SELECT_OPS.findall(message):
        names.update(name.strip() for name in line.split(",") if name.strip())
    names.update(_TF_OP.findall(message))
    return sorted(names)


def _error_summary(error: BaseException, native_text: str, limit: int = 8) -> str:
    """The useful lines of a converter failure: the exception first, then native errors."""
    message_lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    lines = [line for line in message_lines if "error" in line.lower()] or message_lines[:3]
    lines += [line.strip() for line in native_text.splitlines() if "error:" in line.lower()]
    summary = "; ".join(list(dict.fromkeys(lines))[:limit])
    return summary[:2000] if summary else type(error).__name__


def _save_backbone(backbone: "keras.Model", spec: InputSpec, directory: str) -> None:
    tf, keras = import_tensorflow()
    signature = tf.TensorSpec((None, *spec.shape), tf.float32, name="input")

    def serve(images: Any) -> dict[str, Any]:
        return {"embedding": backbone(images, training=False)}

    archive = keras.export.ExportArchive()
    archive.track(backbone)
    archive.add_endpoint(name="serving_default", fn=serve, input_signature=[signature])
    archive.write_out(directory, verbose=False)


def _float_operators(content: bytes) -> list[str]:
    """Names of compute ops of a quantized model that still produce float (or complex) tensors."""
    interpreter = tflite_interpreter(content)
    tensor_types = {details["index"]: np.dtype(details["dtype"]) for details in interpreter.get_tensor_details()}
    names = set()
    for details in interpreter._get_ops_details():
        if details["op_name"] in ("QUANTIZE", "DEQUANTIZE"):
            continue
        outputs = [tensor_types.get(int(index)) for index in details["outputs"] if index >= 0]
        if any(dtype is not None and dtype.kind in "fc" for dtype in outputs):
            names.add(details["op_name"])
    return sorted(names)


def _smoke_test(model: ExportedModel, embedding_size: int) -> None:
    """Run the converted model once on a batch of 2 to prove it loads, resizes and runs."""
    with captured_native_output():  # the runtime announces its CPU delegate on stderr
        check_tflite_runs(model.content, embedding_size, "converted TFLite model")


def export_tflite(
    backbone: "keras.Model",
    spec: InputSpec,
    calibration_images: np.ndarray | None,
    options: TFLiteExportOptions = TFLiteExportOptions(),
) -> ExportedModel:
    """Convert ``backbone`` to a .tflite model that uses TFLite builtin operators only.

    ``calibration_images``: real uint8 images (N, H, W, C) matching ``spec``; needed
    when ``options.quantize`` (at most ``options.calibration_samples`` are used).
    The embedding output stays float32; a quantized model's input is int8/uint8 with the
    scale and zero point recorded in the result. Raises :class:`ConversionError` when
    the model cannot be converted or would need Flex/custom operators.

    Args:
        backbone: The Keras backbone (image -> embedding).
        spec: The input spec.
        calibration_images: Real uint8 images for int8 calibration (None for float export).
        options: Quantization, input type, calibration sample size.

    Returns:
        The ``.tflite`` bytes with their operators and quantization.

    Raises:
        ConversionError: When the model cannot be converted (see above).
    """
    embedding_size = check_backbone(backbone, spec)
    representative = _representative_images(calibration_images, spec, options) if options.quantize else None
    kind = "int8" if options.quantize else "float32"
    logger.info("converting backbone to %s TFLite (input %s)", kind, spec.shape)
    content = _convert(backbone, spec, representative, options)
    exported = _checked_model(content, kind, options, embedding_size)
    logger.info(
        "exported %s TFLite backbone: %d bytes, operators %s",
        kind,
        exported.size,
        ", ".join(tflite_operator_names(content)),
    )
    return exported


def _representative_images(calibration_images: np.ndarray | None, spec: InputSpec,
                           options: TFLiteExportOptions) -> np.ndarray:
    """The calibration subset for int8 conversion (checked, at most ``options.calibration_samples``)."""
    if calibration_images is None:
        raise ConversionError(
            "int8 export needs real calibration images to measure activation ranges; "
            "pass calibration_images (uint8, shape (N, H, W, C)) or set quantize=False"
        )
    images = check_image_batch(calibration_images, spec)
    representative = select_calibration_images(images, count=options.calibration_samples, seed=0)
    if representative.shape[0] < 20:
        logger.warning(
            "calibrating on only %d images; int8 accuracy may suffer (100-500 are typical)",
            representative.shape[0],
        )
    return representative


def _convert(backbone: "keras.Model", spec: InputSpec, representative: np.ndarray | None,
             options: TFLiteExportOptions) -> bytes:
    """Trace ``backbone`` into a SavedModel and run the TFLite converter on it (int8 when ``representative``)."""
    tf, _ = import_tensorflow()
    kind = "int8" if options.quantize else "float32"
    with tempfile.TemporaryDirectory(prefix="edgeadapt-tflite-") as directory:
        try:
            with captured_native_output():
                _save_backbone(backbone, spec, directory)
        except Exception as error:
            raise ConversionError(f"could not trace the backbone into a SavedModel: {error}") from error
        converter = tf.lite.TFLiteConverter.from_saved_model(directory, signature_keys=["serving_default"])
        if options.quantize:

            def representative_dataset() -> Iterator[list[np.ndarray]]:
                for batch in normalized_batches(representative, spec, batch_size=1):
                    yield [batch]

            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.representative_dataset = representative_dataset
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            converter.inference_input_type = {"int8": tf.int8, "uint8": tf.uint8, "float32": tf.float32}[
                options.input_type
            ]
            converter.inference_output_type = tf.float32
        else:
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        native = NativeOutput()
        try:
            with captured_native_output() as native:
                return converter.convert()
        except Exception as error:
            message = f"{error}\n{native.text}"
            unsupported = _unsupported_tf_ops(message)
            if unsupported:
                raise ConversionError(
                    f"the backbone uses TensorFlow ops that TFLite builtins do not include: {', '.join(unsupported)}. "
                    "edgeadapt does not export Flex (select-TF) ops because device runtimes cannot run them; "
                    "replace the layers that use them with builtin-friendly ones"
                ) from error
            raise ConversionError(
                f"TFLite {kind} conversion failed: {_error_summary(error, native.text)}"
            ) from error


def _checked_model(content: bytes, kind: str, options: TFLiteExportOptions, embedding_size: int) -> ExportedModel:
    """Describe the converted model and check it: builtin operators only, expected dtypes, runs once."""
    custom = tflite_custom_operator_names(content)
    if custom:
        raise ConversionError(
            f"the converted model needs Flex/custom operators {', '.join(custom)} that device runtimes cannot run; "
            "replace the layers that use them with builtin-friendly ones"
        )
    described = inspect_tflite(content)
    exported = ExportedModel(
        content=bytes(content),
        format="tflite",
        quantization=kind,
        input=described.input,
        output=described.output,
        input_name=described.input_name,
        output_name=described.output_name,
    )
    expected_input = options.input_type if options.quantize else "float32"
    if exported.input.dtype != expected_input or exported.output.dtype != "float32":
        raise ConversionError(
            f"the converted model has a {exported.input.dtype} input and {exported.output.dtype} output, "
            f"expected {expected_input} in and float32 out"
        )
    _smoke_test(exported, embedding_size)
    if options.quantize:
        float_ops = _float_operators(content)
        if float_ops:
            logger.warning(
                "these operators of the int8 model still run in float32 (no int8 kernel): %s; "
                "integer-only accelerators will not run this model",
                ", ".join(float_ops),
            )
    return exported
