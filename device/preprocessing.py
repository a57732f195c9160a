"""Image decoding and preprocessing shared by the host and the device.

The host trains on images prepared by :func:`prepare_image`, and the device runtime
prepares incoming frames with the same function, so both see identical pixels.
Only numpy and Pillow are used; Pillow is imported lazily (arrays of the right
size never touch it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

import numpy as np

from edgeadapt.device.errors import InputError
from edgeadapt.device.manifest import InputSpec

ImageSource = Union[str, Path, np.ndarray, Any]  # Any: a PIL.Image.Image
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
_ACCEPTED_PIL_MODES = {"RGB", "RGBA", "L", "LA", "P", "CMYK", "YCbCr", "1"}


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def list_image_files(folder: str | Path, recursive: bool = False) -> list[Path]:
    """The image files in ``folder``, sorted; hidden files (and, recursively, hidden folders) skipped.

    Image files are regular files whose suffix is one of :data:`IMAGE_SUFFIXES` (any case).
    Names starting with "." (``.DS_Store``, ``._photo.jpg``, editors' temporary files) are
    never images of the data set.

    Args:
        folder: The folder to list (must exist; callers check and word their own errors).
        recursive: Also list the images of every non-hidden sub-folder.

    Returns:
        The image paths, sorted (possibly empty).
    """
    root = Path(folder)
    candidates = root.rglob("*") if recursive else root.iterdir()
    return sorted(path for path in candidates
                  if path.suffix.lower() in IMAGE_SUFFIXES and not _hidden(path, root) and path.is_file())


def list_class_folders(root: str | Path) -> list[Path]:
    """The non-hidden sub-folders of ``root`` (one per class in ``root/<class>/<image>``), sorted.

    Args:
        root: The data set folder (must exist).

    Returns:
        The sub-folder paths, sorted by name.
    """
    return sorted(path for path in Path(root).iterdir() if path.is_dir() and not path.name.startswith("."))


def _pil_image_module():
    from PIL import Image  # local import: keeps the array hot path free of Pillow

    return Image


def _is_pil_image(source: Any) -> bool:
    module = type(source).__module__
    return module.startswith("PIL.") and hasattr(source, "mode") and hasattr(source, "size")


def _pil_to_array(image: Any, description: str) -> np.ndarray:
    mode = image.mode
    if mode not in _ACCEPTED_PIL_MODES:
        raise InputError(
            f"{description} has image mode {mode!r}; edgeadapt reads 8-bit images "
            "(RGB, RGBA, L, P, CMYK): convert it, e.g. image.convert('RGB')"
        )
    width, height = image.size
    if width < 1 or height < 1:
        raise InputError(f"{description} is empty ({width}x{height} pixels); give an image with pixels")
    if mode in ("L", "1", "LA"):
        return np.asarray(image.convert("L"), dtype=np.uint8)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def load_image(source: ImageSource) -> np.ndarray:
    """Return ``source`` as a uint8 array, (H, W) for grayscale or (H, W, 3) for colour.

    ``source`` is a path to a JPEG/PNG/BMP file, a PIL image, or a uint8 array of shape
    (H, W), (H, W, 1), (H, W, 3) or (H, W, 4). Raises :class:`InputError` otherwise.
    """
    if isinstance(source, np.ndarray):
        return _check_array(source)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise InputError(f"image file {str(path)!r} does not exist")
        Image = _pil_image_module()
        try:
            with Image.open(path) as image:
                image.load()
                return _pil_to_array(image, f"image {str(path)!r}")
        except InputError:
            raise
        except Exception as error:  # Pillow raises many types for undecodable data
            raise InputError(
                f"{str(path)!r} is not a readable image ({type(error).__name__}: {error}); "
                "give a JPEG, PNG or BMP file"
            ) from error
    if _is_pil_image(source):
        return _pil_to_array(source, "PIL image")
    raise InputError(
        f"cannot read an image from a {type(source).__name__}; give a file path, a PIL image "
        "or a uint8 numpy array of shape (H, W[, C])"
    )


def _check_array(array: np.ndarray) -> np.ndarray:
    if array.dtype != np.uint8:
        raise InputError(
            f"image array has dtype {array.dtype}, expected uint8 pixels 0..255; "
            "convert with np.clip(x, 0, 255).astype(np.uint8)"
        )
    if array.ndim in (2, 3) and (array.shape[0] < 1 or array.shape[1] < 1):
        raise InputError(f"image array has shape {array.shape}: the image is empty; give an image with pixels")
    if array.ndim == 2:
        return array
    if array.ndim == 3 and array.shape[2] in (1, 3, 4):
        if array.shape[2] == 1:
            return array[:, :, 0]
        if array.shape[2] == 4:
            return array[:, :, :3]
        return array
    raise InputError(
        f"image array has shape {array.shape}; expected (H, W) grayscale or (H, W, C) with C in 1, 3, 4"
    )


def _convert_channels(array: np.ndarray, channels: int, color_order: str) -> np.ndarray:
    if channels == 1:
        if array.ndim == 2:
            return array[:, :, None]
        # ITU-R 601-2 luma, the same transform as PIL's convert("L")
        gray = array[:, :, 0] * 0.299 + array[:, :, 1] * 0.587 + array[:, :, 2] * 0.114
        return np.clip(np.rint(gray), 0, 255).astype(np.uint8)[:, :, None]
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if color_order == "BGR":
        array = array[:, :, ::-1]
    return array


def _resize(array: np.ndarray, height: int, width: int, policy: str, resample: str = "bilinear") -> np.ndarray:
    source_height, source_width = array.shape[:2]
    if (source_height, source_width) == (height, width):
        return array
    Image = _pil_image_module()
    squeeze = array.ndim == 3 and array.shape[2] == 1
    image = Image.fromarray(array[:, :, 0] if squeeze else array)
    if policy == "center_crop":
        target_ratio = width / height
        source_ratio = source_width / source_height
        if source_ratio > target_ratio:
            new_width = max(1, round(source_height * target_ratio))
            left = (source_width - new_width) // 2
            image = image.crop((left, 0, left + new_width, source_height))
        elif source_ratio < target_ratio:
            new_height = max(1, round(source_width / target_ratio))
            top = (source_height - new_height) // 2
            image = image.crop((0, top, source_width, top + new_height))
    filters = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS, "nearest": Image.NEAREST}
    resized = np.asarray(image.resize((width, height), filters[resample]), dtype=np.uint8)
    return resized[:, :, None] if squeeze else resized


def prepare_image(source: ImageSource, spec: InputSpec) -> np.ndarray:
    """Decode ``source`` and return a (H, W, C) uint8 array exactly as ``spec`` asks.

    Channels are converted first (gray <-> RGB, BGR order), then the image is resized
    with ``spec.resize`` ("stretch" or "center_crop") and the ``spec.resample`` filter.
    """
    array = load_image(source)
    # Resize before channel conversion when reducing to gray would lose nothing either way;
    # converting first keeps the resize on the smallest array for gray targets.
    array = _convert_channels(array, spec.channels, spec.color_order)
    return _resize(array, spec.height, spec.width, spec.resize, spec.resample)


def prepare_batch(sources: Any, spec: InputSpec) -> np.ndarray:
    """Prepare one image or many into a (N, H, W, C) uint8 batch.

    A single image (path, PIL image, 2-D or 3-D array) gives N = 1; a list/tuple of
    images or a 4-D uint8 array gives one row per image.
    """
    if isinstance(sources, np.ndarray) and sources.dtype == np.uint8 and sources.shape == spec.shape:
        return sources[None]  # hot path: a frame that is already the right size
    if isinstance(sources, np.ndarray) and sources.ndim == 4:
        if sources.dtype != np.uint8:
            raise InputError(
                f"image batch has dtype {sources.dtype}, expected uint8 pixels 0..255"
            )
        if sources.shape[0] < 1:
            raise InputError(f"image batch has shape {sources.shape}: it holds no image; give at least one image")
        if sources.shape[1:] == spec.shape:
            return sources
        return np.stack([prepare_image(image, spec) for image in sources])
    if is_single_image(sources):
        return prepare_image(sources, spec)[None]
    if isinstance(sources, (list, tuple)):
        if not sources:
            raise InputError("empty list of images; give at least one image")
        return np.stack([prepare_image(image, spec) for image in sources])
    raise InputError(
        f"cannot read images from a {type(sources).__name__}; give a path, PIL image, array, or a list of them"
    )


def is_single_image(source: Any) -> bool:
    """True when ``source`` is one image rather than a batch."""
    if isinstance(source, (str, Path)) or _is_pil_image(source):
        return True
    return isinstance(source, np.ndarray) and source.ndim in (2, 3)


def pixel_values(spec: InputSpec) -> np.ndarray:
    """The pixel rule: the 256 float64 values ``pixel * spec.scale + spec.offset`` of pixels 0..255.

    Every numpy path that turns uint8 pixels into backbone inputs (the device runtime,
    calibration, the converters' reference runs) derives its table from this one rule.

    Args:
        spec: The input spec (pixel scale and offset).

    Returns:
        A (256,) float64 array.
    """
    return np.arange(256, dtype=np.float64) * spec.scale + spec.offset


def pixel_table(spec: InputSpec) -> np.ndarray:
    """The 256-entry float32 lookup table of :func:`pixel_values`: ``pixel_table(spec)[images]``.

    Args:
        spec: The input spec (pixel scale and offset).

    Returns:
        A (256,) float32 array; indexing it with uint8 images gives the float model input.
    """
    return pixel_values(spec).astype(np.float32)


class InputQuantizer:
    """Maps prepared uint8 pixels to the backbone's input tensor in one table lookup.

    Normalisation (``pixel * scale + offset``) and input quantization
    (``round(x / q_scale) + q_zero_point``) are both elementwise functions of a byte, so a
    256-entry table computes them exactly and fast.
    """

    def __init__(self, spec: InputSpec, dtype: str, quant_scale: float = 0.0, quant_zero_point: int = 0):
        normalized = pixel_values(spec)
        if dtype == "float32":
            table = normalized.astype(np.float32)
        elif dtype in ("int8", "uint8"):
            if quant_scale <= 0:
                raise InputError(f"quantized {dtype} input needs a positive scale, got {quant_scale}")
            info = np.iinfo(np.dtype(dtype))
            quantized = np.rint(normalized / quant_scale) + quant_zero_point
            table = np.clip(quantized, info.min, info.max).astype(np.dtype(dtype))
        else:
            raise InputError(f"unsupported backbone input dtype {dtype!r}")
        self.dtype = np.dtype(table.dtype)
        self.table = table
        # An identity table (uint8 in, pixel values unchanged) needs no lookup at all.
        pixels_as_bytes = np.arange(256, dtype=np.uint8)
        self.is_identity = dtype == "uint8" and bool(np.array_equal(table, pixels_as_bytes))
        # int8 input with q = pixel - 128 (the usual full-range calibration): flipping the top
        # bit of the byte and reading it as int8 is exact and cheaper than a table lookup.
        self.is_offset_128 = dtype == "int8" and bool(
            np.array_equal(table, (pixels_as_bytes ^ 0x80).view(np.int8)))

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if self.is_identity:
            return batch
        if self.is_offset_128:
            return (batch ^ np.uint8(0x80)).view(np.int8)
        return np.take(self.table, batch)
