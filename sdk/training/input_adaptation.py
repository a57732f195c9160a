"""Change a trained model's input size or channel count and keep its weights.

:func:`adapt_input` rebuilds a Keras model for a new input shape and copies every
weight whose shape allows it:

- **resolution** (height/width): convolution, BatchNorm and Dense weights do not depend
  on the image size in a fully convolutional network that ends in global pooling, so
  every weight is reused unchanged;
- **1 -> 3 channels**: the first convolution's kernel ``w`` (trained on grayscale) is
  spread over red, green and blue, ``w/3`` each (``spread="equal"``) or ``w * luma``
  (``spread="luma"``, 0.299/0.587/0.114). Either way a grayscale image replicated to RGB
  gives exactly the old output; with "luma" a colour image gives the old model's output
  on its luma image, i.e. what the device fed the grayscale model;
- **3 -> 1 channels**: the kernel is summed over the three channels, exact for gray
  images (an RGB image whose three channels are equal).

Channel changes are checked numerically before the model is returned. A Dense layer
whose input size depends on the image size (Flatten -> Dense) cannot be reused at a new
size: :class:`IncompatibleModelError` names it and offers ``replace_flatten=True``,
which swaps the Flatten for global average pooling (the Dense is then initialised from
the spatial sum of its old kernel and must be retrained). The input model is never
modified.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from edgeadapt.device.errors import IncompatibleModelError, InputError
from edgeadapt.device.manifest import InputSpec

if TYPE_CHECKING:  # pragma: no cover
    import keras

logger = logging.getLogger(__name__)

#: RGB weights of the ITU-R 601-2 luma transform (the device's RGB -> gray conversion).
LUMA_WEIGHTS = (0.299, 0.587, 0.114)
SPREAD_RULES = ("equal", "luma")
_CONVOLUTION_CLASSES = ("Conv1D", "Conv2D", "Conv3D", "DepthwiseConv2D", "SeparableConv2D", "Conv2DTranspose",
                        "DepthwiseConv1D", "SeparableConv1D", "Conv1DTranspose", "Conv3DTranspose")


@dataclass
class AdaptationReport:
    """What :func:`adapt_input` did, layer by layer (also logged at INFO level)."""

    old_shape: tuple[int, int, int]
    new_shape: tuple[int, int, int]
    reused_layers: list[str] = field(default_factory=list)
    channel_adapted_layers: list[str] = field(default_factory=list)
    replaced_flatten_layers: list[str] = field(default_factory=list)
    reinitialised_layers: list[str] = field(default_factory=list)
    max_channel_error: float | None = None

    def summary(self) -> str:
        lines = [f"input {self.old_shape} -> {self.new_shape}",
                 f"layers with weights reused unchanged: {len(self.reused_layers)}"]
        if self.channel_adapted_layers:
            error = "" if self.max_channel_error is None else f" (checked: max output difference {self.max_channel_error:.2e})"
            lines.append(f"first-layer kernels adapted to {self.new_shape[2]} channel(s): "
                         f"{', '.join(self.channel_adapted_layers)}{error}")
        if self.replaced_flatten_layers:
            lines.append(f"Flatten replaced by global average pooling: {', '.join(self.replaced_flatten_layers)}")
        if self.reinitialised_layers:
            lines.append(f"re-initialised, retrain them: {', '.join(self.reinitialised_layers)}")
        return "\n".join(lines)


def _load(model_or_path: Any) -> "keras.Model":
    from edgeadapt.training.model_split import load_keras_model

    return load_keras_model(model_or_path)


def _leaf_layers(model, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(path, layer) for every non-model layer, depth first, nested models included."""
    import keras

    for layer in model.layers:
        path = f"{prefix}{layer.name}"
        if isinstance(layer, keras.Model):
            yield from _leaf_layers(layer, prefix=f"{path}/")
        else:
            yield path, layer


def _image_input_shape(model) -> tuple[int, int, int]:
    if len(model.inputs) != 1:
        raise IncompatibleModelError(
            f"{model.name} has {len(model.inputs)} inputs; input adaptation needs a model with one image input"
        )
    shape = tuple(model.inputs[0].shape)
    if len(shape) != 4 or any(value is None for value in shape[1:]):
        raise IncompatibleModelError(
            f"{model.name} takes input of shape {shape}; input adaptation needs a fixed (N, height, width, channels) image input"
        )
    return int(shape[1]), int(shape[2]), int(shape[3])


def _convolution_layers(model) -> list[tuple[str, Any]]:
    return [(path, layer) for path, layer in _leaf_layers(model) if type(layer).__name__ in _CONVOLUTION_CLASSES]


def _spatial_shape(tensor) -> tuple[int, int] | None:
    shape = getattr(tensor, "shape", None)
    if shape is None or len(shape) != 4 or shape[1] is None or shape[2] is None:
        return None
    return int(shape[1]), int(shape[2])


def _downsampling(model) -> tuple[float, float]:
    """Largest ratio of the model's input size to any 4-D feature map inside it (its total stride)."""
    import keras

    input_size = _spatial_shape(model.inputs[0])
    if input_size is None:
        return 1.0, 1.0
    factor_h = factor_w = 1.0
    for layer in model.layers:
        try:
            outputs = layer.output
        except (AttributeError, ValueError):  # a layer used more than once has no single output
            continue
        size = _spatial_shape(outputs)
        if size is None:
            continue
        ratio_h, ratio_w = input_size[0] / max(size[0], 1), input_size[1] / max(size[1], 1)
        if isinstance(layer, keras.Model):
            inner_h, inner_w = _downsampling(layer)
            inner_input = _spatial_shape(layer.inputs[0]) or size
            ratio_h = max(ratio_h, input_size[0] / inner_input[0] * inner_h)
            ratio_w = max(ratio_w, input_size[1] / inner_input[1] * inner_w)
        factor_h, factor_w = max(factor_h, ratio_h), max(factor_w, ratio_w)
    return factor_h, factor_w


def minimum_input_size(model: Any) -> tuple[int, int]:
    """Smallest (height, width) the model is meant to see: its total downsampling factor.

    Below it the deepest feature maps would be smaller than one pixel of the original
    design (strided layers would only see padding). The built-in backbone built for
    64x64 or more downsamples 16x, so its minimum is 16x16.
    """
    model = _load(model)
    _image_input_shape(model)
    factor_h, factor_w = _downsampling(model)
    return max(1, math.ceil(factor_h - 1e-6)), max(1, math.ceil(factor_w - 1e-6))


def input_spec_for_model(model: Any, base: InputSpec | None = None) -> InputSpec:
    """The input spec of ``model``: height, width and channels from its input, the rest from ``base``.

    ``base`` (default: :class:`InputSpec` defaults, pixels scaled to -1..1) gives the
    normalisation, resize policy and colour order. Use it when exporting a bundle from an
    adapted model: the manifest then tells the device runtime to resize and convert
    incoming images to the new shape.
    """
    height, width, channels = _image_input_shape(_load(model))
    if channels not in (1, 3):
        raise IncompatibleModelError(f"the model takes {channels}-channel input; bundles hold 1- or 3-channel models")
    base = base or InputSpec(height=height, width=width, channels=channels,
                             color_order="GRAY" if channels == 1 else "RGB")
    if channels == 1:
        color_order = "GRAY"
    else:
        color_order = base.color_order if base.color_order != "GRAY" else "RGB"
    return dataclasses.replace(base, height=height, width=width, channels=channels, color_order=color_order)


# ----------------------------------------------------------------------------- rebuilding
def _rewrite_config(node: Any, old_shape: tuple, new_shape: tuple, flatten_names: set[str]) -> Any:
    """Copy of a serialized model config with the image input shape changed (and Flatten swapped)."""
    if isinstance(node, list):
        return [_rewrite_config(item, old_shape, new_shape, flatten_names) for item in node]
    if not isinstance(node, dict):
        return node
    result = {}
    for key, value in node.items():
        if key == "build_config":  # layers are rebuilt when called on the new input
            continue
        if key in ("build_input_shape", "batch_input_shape", "batch_shape") and isinstance(value, (list, tuple)):
            if len(value) == 4 and tuple(value[1:]) == old_shape:
                value = [value[0], *new_shape]
        result[key] = _rewrite_config(value, old_shape, new_shape, flatten_names)
    if result.get("class_name") == "Flatten" and isinstance(result.get("config"), dict):
        name = result["config"].get("name")
        if name in flatten_names:
            layer_config = {key: result["config"][key] for key in ("name", "trainable", "dtype") if key in result["config"]}
            layer_config.update(data_format=result["config"].get("data_format", "channels_last"), keepdims=False)
            result.update(module="keras.layers", class_name="GlobalAveragePooling2D", config=layer_config,
                          registered_name=None)
    return result


def _rebuild(model, new_shape: tuple[int, int, int], flatten_names: set[str] = frozenset()) -> "keras.Model":
    """A new, freshly initialised model of the same architecture taking ``new_shape`` images."""
    import keras

    old_shape = _image_input_shape(model)
    try:
        config = keras.saving.serialize_keras_object(model)
    except Exception as error:  # subclassed models without get_config
        raise IncompatibleModelError(
            f"cannot serialise {model.name} ({type(model).__name__}) to rebuild it: {error}; "
            "input adaptation works on Functional and Sequential Keras models"
        ) from error
    config = _rewrite_config(copy.deepcopy(config), old_shape, tuple(new_shape), set(flatten_names))
    try:
        rebuilt = keras.saving.deserialize_keras_object(config)
    except Exception as error:  # shape errors from layers that cannot take the new size
        raise IncompatibleModelError(
            f"{model.name} cannot be rebuilt for input {tuple(new_shape)}: {error}"
        ) from error
    if _image_input_shape(rebuilt) != tuple(new_shape):
        raise IncompatibleModelError(
            f"{model.name} could not be given input {tuple(new_shape)} (its config still says "
            f"{_image_input_shape(rebuilt)}); input adaptation needs a model whose first layer is its image input"
        )
    return rebuilt


def _channel_kernel(kernel: np.ndarray, old_channels: int, new_channels: int, spread: str) -> np.ndarray:
    """The first convolution's kernel (kh, kw, C, F) moved from ``old_channels`` to ``new_channels``."""
    if old_channels == 1 and new_channels == 3:
        if spread == "luma":
            weights = np.asarray(LUMA_WEIGHTS, dtype=np.float64).reshape(1, 1, 3, 1)
        else:
            weights = np.full((1, 1, 3, 1), 1.0 / 3.0)
        return (kernel.astype(np.float64) * weights).astype(kernel.dtype)
    if old_channels == 3 and new_channels == 1:
        return kernel.astype(np.float64).sum(axis=2, keepdims=True).astype(kernel.dtype)
    raise IncompatibleModelError(f"no rule to move a kernel from {old_channels} to {new_channels} channels")


def _transfer_weights(old_model, new_model, old_shape, new_shape, spread: str, report: AdaptationReport,
                      flatten_names: set[str]) -> None:
    old_layers = dict(_leaf_layers(old_model))
    for path, new_layer in _leaf_layers(new_model):
        new_weights = new_layer.get_weights()
        if not new_weights:
            continue
        old_layer = old_layers.get(path)
        if old_layer is None:
            raise IncompatibleModelError(f"layer {path!r} of the rebuilt model has no counterpart in {old_model.name}")
        old_weights = old_layer.get_weights()
        if [w.shape for w in old_weights] == [w.shape for w in new_weights]:
            new_layer.set_weights(old_weights)
            report.reused_layers.append(path)
            continue
        kind = type(new_layer).__name__
        if (kind == "Conv2D" and old_shape[2] != new_shape[2] and len(old_weights) == len(new_weights)
                and old_weights[0].shape[:2] == new_weights[0].shape[:2]
                and old_weights[0].shape[2] == old_shape[2] and new_weights[0].shape[2] == new_shape[2]
                and old_weights[0].shape[3] == new_weights[0].shape[3]
                and [w.shape for w in old_weights[1:]] == [w.shape for w in new_weights[1:]]):
            kernel = _channel_kernel(old_weights[0], old_shape[2], new_shape[2], spread)
            new_layer.set_weights([kernel, *old_weights[1:]])
            report.channel_adapted_layers.append(path)
            continue
        if kind == "Dense":
            old_in, new_in = old_weights[0].shape[0], new_weights[0].shape[0]
            if flatten_names and old_in % new_in == 0 and old_weights[0].shape[1:] == new_weights[0].shape[1:]:
                # Flatten -> Dense became GlobalAveragePooling -> Dense: sum the kernel over the old
                # spatial positions (exact when the feature map is spatially uniform), then retrain.
                kernel = old_weights[0].reshape(old_in // new_in, new_in, -1).sum(axis=0)
                new_layer.set_weights([kernel.astype(old_weights[0].dtype), *old_weights[1:]])
                report.reinitialised_layers.append(path)
                continue
            raise IncompatibleModelError(_flatten_message(old_model, path, old_in, new_in, old_shape, new_shape))
        if old_shape[2] != new_shape[2]:
            raise IncompatibleModelError(
                f"layer {path!r} ({kind}) sees the input's {old_shape[2]} channel(s) and holds per-channel weights "
                f"{[tuple(w.shape) for w in old_weights]}; edgeadapt can only adapt a plain Conv2D first layer "
                f"from {old_shape[2]} to {new_shape[2]} channels. Keep {old_shape[2]} channel(s) and let the device "
                "runtime convert images (the bundle's input spec does it), or retrain the model"
            )
        raise IncompatibleModelError(
            f"layer {path!r} ({kind}) has weights {[tuple(w.shape) for w in old_weights]} that become "
            f"{[tuple(w.shape) for w in new_weights]} at input {new_shape}; they cannot be reused"
        )


def _flatten_message(model, dense_path: str, old_in: int, new_in: int, old_shape, new_shape) -> str:
    flattens = [path for path, layer in _leaf_layers(model) if type(layer).__name__ in ("Flatten", "Reshape")]
    source = f" after {', '.join(repr(name) for name in flattens)}" if flattens else ""
    return (
        f"Dense layer {dense_path!r}{source} takes {old_in} inputs at image size {old_shape[0]}x{old_shape[1]} but "
        f"would take {new_in} at {new_shape[0]}x{new_shape[1]}: its weights depend on the spatial size and cannot be "
        "reused. Fix: replace the Flatten by global average pooling and retrain the head — "
        "adapt_input(..., replace_flatten=True) (CLI: --replace-flatten) does the swap, then train with "
        "strategy head_only (edgeadapt train --strategy head_only)"
    )


def _check_channels(model, old_channels: int, new_channels: int) -> None:
    if new_channels == old_channels:
        return
    first = _convolution_layers(model)[0][0]
    if new_channels not in (1, 3):
        raise InputError(
            f"cannot adapt {model.name} to {new_channels} channels: its first layer {first!r} was trained on "
            f"{old_channels}-channel images and edgeadapt has rules only for 1 (grayscale) <-> 3 (RGB) "
            "(bundles and the device runtime take 1 or 3 channels)"
        )
    if old_channels not in (1, 3):
        raise IncompatibleModelError(
            f"{model.name}'s first layer {first!r} takes {old_channels} channels; there is no rule to move it to "
            f"{new_channels} channels (only 1 <-> 3)"
        )


def _max_difference(reference, candidate) -> float:
    return float(np.max(np.abs(np.asarray(reference, np.float64) - np.asarray(candidate, np.float64))))


def _verify_channels(old_model, new_model, old_channels: int, new_channels: int, seed: int) -> float:
    """Feed gray images (replicated where RGB is expected) to both models; max output difference."""
    height, width, _ = _image_input_shape(old_model)
    rng = np.random.default_rng(seed)
    gray = rng.uniform(-1.0, 1.0, size=(2, height, width, 1)).astype(np.float32)
    as_old = gray if old_channels == 1 else np.repeat(gray, 3, axis=3)
    as_new = gray if new_channels == 1 else np.repeat(gray, 3, axis=3)
    reference = old_model(as_old, training=False)
    candidate = new_model(as_new, training=False)
    reference = reference if not isinstance(reference, (list, tuple)) else reference[0]
    candidate = candidate if not isinstance(candidate, (list, tuple)) else candidate[0]
    reference, candidate = np.asarray(reference), np.asarray(candidate)
    difference = _max_difference(reference, candidate)
    tolerance = 1e-4 * max(1.0, float(np.max(np.abs(reference))))
    if not difference <= tolerance:
        raise IncompatibleModelError(
            f"after adapting {old_model.name} from {old_channels} to {new_channels} channels, gray images give "
            f"outputs that differ by {difference:.3g} (tolerance {tolerance:.3g}); a layer between the input and the "
            "first convolution treats channels differently — keep the old channel count and let the device "
            "runtime convert images instead"
        )
    return difference


def adapt_input(
    model: Any,
    height: int | None = None,
    width: int | None = None,
    channels: int | None = None,
    replace_flatten: bool = False,
    spread: str = "equal",
) -> "keras.Model":
    """A new Keras model taking (height, width, channels) images, reusing ``model``'s weights.

    ``model`` is a Keras model or a ``.keras`` file; arguments left as None keep the old
    value. ``spread`` is how a grayscale first layer becomes RGB: "equal" (w/3 per channel)
    or "luma" (w * 0.299/0.587/0.114); both give the old output on replicated gray images.
    Raises :class:`IncompatibleModelError` (structure: no convolution, Flatten -> Dense at a
    new size without ``replace_flatten``, an unadaptable first layer, a non-Keras file) or
    :class:`InputError` (a size below the model's minimum, channels other than 1 or 3).
    ``model`` itself is never modified; see :func:`adapt_input_with_report` for details.

    Args:
        model: A Keras model or ``.keras`` file.
        height: New input height (None: unchanged).
        width: New input width (None: unchanged).
        channels: New channel count, 1 or 3 (None: unchanged).
        replace_flatten: Swap Flatten for global average pooling when a Dense layer depends on
            the input size.
        spread: Gray -> RGB rule for the first kernel: "equal" or "luma".

    Returns:
        The new Keras model.

    Raises:
        IncompatibleModelError: When the structure cannot follow the change (see above).
        InputError: When the size or channel count is invalid.
    """
    return adapt_input_with_report(model, height, width, channels, replace_flatten, spread)[0]


def adapt_input_with_report(
    model: Any,
    height: int | None = None,
    width: int | None = None,
    channels: int | None = None,
    replace_flatten: bool = False,
    spread: str = "equal",
) -> tuple["keras.Model", AdaptationReport]:
    """:func:`adapt_input` plus an :class:`AdaptationReport` of what was reused or changed."""
    source = _load(model)
    old_shape = _image_input_shape(source)
    new_shape = (int(height or old_shape[0]), int(width or old_shape[1]), int(channels or old_shape[2]))
    if spread not in SPREAD_RULES:
        raise InputError(f"spread must be one of {SPREAD_RULES}, got {spread!r}")
    if min(new_shape) < 1:
        raise InputError(f"height, width and channels must be positive, got {new_shape}")
    if not _convolution_layers(source):
        raise IncompatibleModelError(
            f"{source.name} has no convolution layer: its weights are tied to the exact input size and channel "
            "layout, so none can be reused at a new input shape; retrain it (or use a convolutional backbone)"
        )
    _check_channels(source, old_shape[2], new_shape[2])
    minimum = minimum_input_size(source)
    if new_shape[0] < minimum[0] or new_shape[1] < minimum[1]:
        raise InputError(
            f"{new_shape[0]}x{new_shape[1]} is smaller than the minimum input size of {source.name}: "
            f"{minimum[0]}x{minimum[1]} (it downsamples {minimum[0]}x{minimum[1]} times before global pooling); "
            f"use at least {minimum[0]}x{minimum[1]}"
        )
    flatten_names: set[str] = set()
    if replace_flatten:
        flatten_names = {layer.name for _, layer in _leaf_layers(source)
                         if type(layer).__name__ == "Flatten" and _spatial_shape(layer.input) is not None}
        if not flatten_names:
            logger.info("replace_flatten: %s has no Flatten on a spatial feature map; nothing to replace", source.name)

    report = AdaptationReport(old_shape=old_shape, new_shape=new_shape,
                              replaced_flatten_layers=sorted(flatten_names))
    current, current_shape = source, old_shape
    if new_shape[2] != old_shape[2]:
        # Channels first, at the old size, where the result can be checked against the old model.
        step_shape = (old_shape[0], old_shape[1], new_shape[2])
        stepped = _rebuild(source, step_shape)
        _transfer_weights(source, stepped, old_shape, step_shape, spread, report, set())
        report.max_channel_error = _verify_channels(source, stepped, old_shape[2], new_shape[2], seed=0)
        current, current_shape = stepped, step_shape
    if current_shape != new_shape or flatten_names:
        channel_layers = list(report.channel_adapted_layers)
        resized = _rebuild(current, new_shape, flatten_names)
        report.reused_layers.clear()
        _transfer_weights(current, resized, current_shape, new_shape, spread, report, flatten_names)
        report.channel_adapted_layers = channel_layers
        report.reused_layers = [name for name in report.reused_layers if name not in channel_layers]
        current = resized
    if current is source:  # same shape, nothing to replace: still hand back a copy
        current = _rebuild(source, new_shape)
        _transfer_weights(source, current, old_shape, new_shape, spread, report, set())
    for line in report.summary().splitlines():
        logger.info("adapt_input %s: %s", source.name, line)
    if report.reinitialised_layers:
        logger.warning("adapt_input: %s initialised from the spatial sum of the old kernel; retrain the head "
                       "(e.g. fine_tune(..., FineTuneOptions(strategy='head_only')))",
                       ", ".join(report.reinitialised_layers))
    return current, report
