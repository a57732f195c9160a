"""Run a detector with extra outputs (feature maps, box encodings, raw scores) in LiteRT."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
from edgeadapt.detection.structure import SSDStructure
from edgeadapt.device.detector import pixels_to_input
from edgeadapt.device.errors import ConversionError

__all__ = ["TensorRunner", "box_scales", "decode_boxes", "model_with_outputs", "pixels_to_input"]


def model_with_outputs(structure: SSDStructure, tensors: Sequence[int]) -> bytes:
    """A copy of the detector that outputs ``tensors`` only (operators they do not need are dropped).

    Raises:
        ConversionError: the copy cannot be written.
    """
    from edgeadapt.converters.tflite_import import TFLiteGraph, write_tflite_model

    graph = TFLiteGraph(copy.deepcopy(structure.graph.model))
    graph.subgraph.outputs = np.asarray(list(tensors), dtype=np.int32)
    graph.model.signatureDefs = None
    graph.prune()
    return write_tflite_model(graph.model)


class TensorRunner:
    """Runs a ``.tflite`` (bytes) and returns its outputs, dequantized to float32 unless ``raw``."""

    def __init__(self, content: bytes, num_threads: int | None = None):
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError as error:
            raise ConversionError("running detectors on the host needs ai-edge-litert: pip install 'edgeadapt[host]'") from error
        try:
            self.interpreter = Interpreter(model_content=bytes(content), num_threads=num_threads)
            self.interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as error:
            raise ConversionError(f"LiteRT cannot load the detector: {error}") from error
        self.input = self.interpreter.get_input_details()[0]
        self.outputs = self.interpreter.get_output_details()

    def run(self, batch: np.ndarray, raw: bool = False) -> list[np.ndarray]:
        """Outputs for one input of the model's dtype and shape ``(1, H, W, C)``."""
        self.interpreter.set_tensor(self.input["index"], batch)
        self.interpreter.invoke()
        results = []
        for detail in self.outputs:
            value = self.interpreter.get_tensor(detail["index"])
            scale, zero_point = detail["quantization"]
            if not raw and value.dtype in (np.uint8, np.int8) and scale:
                value = (value.astype(np.float32) - np.float32(zero_point)) * np.float32(scale)
            results.append(np.array(value))
        return results


def decode_boxes(encodings: np.ndarray, anchors: np.ndarray, scales: tuple[float, float, float, float]) -> np.ndarray:
    """SSD box decoding as ``TFLite_Detection_PostProcess`` does it: (N, 4) ymin, xmin, ymax, xmax.

    Args:
        encodings: (N, 4) ty, tx, th, tw.
        anchors: (N, 4) ycenter, xcenter, height, width.
        scales: y_scale, x_scale, h_scale, w_scale.
    """
    y_scale, x_scale, h_scale, w_scale = scales
    ycenter = encodings[:, 0] / y_scale * anchors[:, 2] + anchors[:, 0]
    xcenter = encodings[:, 1] / x_scale * anchors[:, 3] + anchors[:, 1]
    half_h = 0.5 * np.exp(encodings[:, 2] / h_scale) * anchors[:, 2]
    half_w = 0.5 * np.exp(encodings[:, 3] / w_scale) * anchors[:, 3]
    return np.stack([ycenter - half_h, xcenter - half_w, ycenter + half_h, xcenter + half_w], axis=1).astype(np.float32)


def box_scales(structure: SSDStructure) -> tuple[float, float, float, float]:
    options = structure.options
    return options.y_scale, options.x_scale, options.h_scale, options.w_scale


def describe_outputs(runner: Any) -> list[tuple[str, tuple[int, ...]]]:
    return [(detail["name"], tuple(int(v) for v in detail["shape"])) for detail in runner.outputs]
