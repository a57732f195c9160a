"""Interpreter backends: LiteRT (ai-edge-litert), tflite-runtime and ONNX Runtime.

Each backend runs the bundle's backbone file on a prepared input batch and returns
float32 embeddings. Backends are imported only when chosen.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeadapt.device.console import filtered_native_stderr
from edgeadapt.device.errors import BackendUnavailableError, BundleError

logger = logging.getLogger(__name__)

#: name -> (module to import, model format it runs, pip extra that installs it)
BACKENDS: dict[str, tuple[str, str, str]] = {
    "litert": ("ai_edge_litert.interpreter", "tflite", "edgeadapt[litert]"),
    "tflite-runtime": ("tflite_runtime.interpreter", "tflite", "edgeadapt[tflite]"),
    "onnxruntime": ("onnxruntime", "onnx", "edgeadapt[onnx]"),
}
AUTO_ORDER = ("litert", "tflite-runtime", "onnxruntime")


def _module_available(module_name: str) -> bool:
    try:
        return importlib.util.find_spec(module_name) is not None
    except (ImportError, ValueError):
        return False


def available_backends() -> list[str]:
    """Backends whose interpreter package is installed, in preference order."""
    return [name for name in AUTO_ORDER if _module_available(BACKENDS[name][0])]


@dataclass(frozen=True)
class TensorInfo:
    """dtype and quantization of a model input or output tensor."""

    dtype: str
    scale: float = 0.0
    zero_point: int = 0


class TFLiteBackend:
    """Runs a ``.tflite`` backbone with LiteRT or tflite-runtime."""

    def __init__(self, model_path: Path, name: str, num_threads: int | None = None):
        module = importlib.import_module(BACKENDS[name][0])
        self.name = name
        try:
            with filtered_native_stderr():  # the interpreter announces its CPU delegate on stderr
                self.interpreter = module.Interpreter(model_path=str(model_path), num_threads=num_threads)
                self.interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as error:
            raise BundleError(f"{name} cannot load {model_path.name}: {error}") from error
        input_detail = self.interpreter.get_input_details()[0]
        output_detail = self.interpreter.get_output_details()[0]
        self._input_index = input_detail["index"]
        self._output_index = output_detail["index"]
        self._batch_size = int(input_detail["shape"][0])
        self._input_shape = tuple(int(value) for value in input_detail["shape"][1:])
        in_scale, in_zero = input_detail["quantization"]
        out_scale, out_zero = output_detail["quantization"]
        self.input = TensorInfo(np.dtype(input_detail["dtype"]).name, float(in_scale), int(in_zero))
        self.output = TensorInfo(np.dtype(output_detail["dtype"]).name, float(out_scale), int(out_zero))
        #: the model's input shape without the batch dimension (None = any size)
        self.input_shape: tuple[int | None, ...] = tuple(
            int(value) if int(value) > 0 else None for value in input_detail.get("shape_signature", input_detail["shape"])[1:])

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Embeddings (N, D) float32 for a batch already in the model's input dtype."""
        count = batch.shape[0]
        if count != self._batch_size:
            self.interpreter.resize_tensor_input(self._input_index, (count, *self._input_shape))
            self.interpreter.allocate_tensors()
            self._batch_size = count
        self.interpreter.set_tensor(self._input_index, batch)
        self.interpreter.invoke()
        output = self.interpreter.get_tensor(self._output_index)
        return _dequantize(output, self.output).reshape(count, -1)


class OnnxBackend:
    """Runs an ``.onnx`` backbone with ONNX Runtime on the CPU."""

    name = "onnxruntime"

    def __init__(self, model_path: Path, num_threads: int | None = None):
        onnxruntime = importlib.import_module("onnxruntime")
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        if num_threads:
            options.intra_op_num_threads = num_threads
        try:
            self.session = onnxruntime.InferenceSession(
                str(model_path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as error:  # onnxruntime raises its own exception types
            raise BundleError(f"onnxruntime cannot load {model_path.name}: {error}") from error
        model_input = self.session.get_inputs()[0]
        self._input_name = model_input.name
        self._output_names = [self.session.get_outputs()[0].name]
        dtype = {"tensor(float)": "float32", "tensor(uint8)": "uint8", "tensor(int8)": "int8"}.get(model_input.type)
        if dtype is None:
            raise BundleError(f"unsupported ONNX input type {model_input.type} in {model_path.name}")
        self.input = TensorInfo(dtype)
        self.output = TensorInfo("float32")
        #: the model's input shape without the batch dimension (None = a dynamic size)
        self.input_shape: tuple[int | None, ...] = tuple(
            value if isinstance(value, int) and value > 0 else None for value in (model_input.shape or [None])[1:])

    def run(self, batch: np.ndarray) -> np.ndarray:
        output = self.session.run(self._output_names, {self._input_name: batch})[0]
        return np.asarray(output, dtype=np.float32).reshape(batch.shape[0], -1)


def _dequantize(values: np.ndarray, info: TensorInfo) -> np.ndarray:
    if info.dtype in ("int8", "uint8", "int16"):
        return (values.astype(np.float32) - np.float32(info.zero_point)) * np.float32(info.scale)
    return values.astype(np.float32, copy=False)


def create_backend(bundle: Any, backend: str = "auto", num_threads: int | None = None):
    """Open the bundle's backbone with ``backend`` ("auto", "litert", "tflite-runtime", "onnxruntime").

    "auto" takes the first installed backend (LiteRT, tflite-runtime, ONNX Runtime) whose
    model format the bundle holds.
    """
    if backend != "auto" and backend not in BACKENDS:
        raise BackendUnavailableError(
            f"unknown backend {backend!r}; choose one of auto, {', '.join(BACKENDS)}"
        )
    candidates = AUTO_ORDER if backend == "auto" else (backend,)
    formats = [entry.get("format") for entry in bundle.manifest.models]
    for name in candidates:
        module_name, model_format, extra = BACKENDS[name]
        entry = bundle.model_entry(model_format)
        if entry is None:
            if backend != "auto":
                raise BundleError(
                    f"backend {name} runs {model_format} models, but this bundle holds only {formats}; "
                    f"choose another backend"
                )
            continue
        if not _module_available(module_name):
            if backend != "auto":
                raise BackendUnavailableError(f"backend {name} is not installed: pip install '{extra}'")
            continue
        path = bundle.file_path(entry["file"])
        logger.debug("opening %s with %s", path, name)
        if model_format == "onnx":
            return OnnxBackend(path, num_threads=num_threads), entry
        return TFLiteBackend(path, name, num_threads=num_threads), entry
    raise BackendUnavailableError(
        f"no installed interpreter can run this bundle (it holds {formats}); install one of: "
        "pip install 'edgeadapt[litert]' (TFLite) or 'edgeadapt[onnx]' (ONNX)"
    )
