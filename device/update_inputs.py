"""Checks of a device update's inputs, before the lock is taken: example lists, embeddings, class names.

Every :class:`~edgeadapt.device.updater.HeadUpdater` method validates all of its inputs with
these (names against the current manifest, every image or embedding) before it writes anything,
so a refused update leaves the bundle exactly as it was.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from edgeadapt.device.errors import InputError
from edgeadapt.device.manifest import Manifest
from edgeadapt.device.naming import check_class_name
from edgeadapt.device.preprocessing import _is_pil_image, prepare_image
from edgeadapt.device.unknown import UNKNOWN_LABEL


def as_example_list(examples: Any) -> list:
    """One image or a collection of images as a list; :class:`InputError` when there are none."""
    if examples is None:
        raise InputError("no examples given; give a list of image paths, PIL images or uint8 arrays")
    if isinstance(examples, (str, Path)) or _is_pil_image(examples):
        return [examples]
    if isinstance(examples, np.ndarray):
        items = [examples] if examples.ndim in (2, 3) else list(examples) if examples.ndim == 4 else None
        if items is None:
            raise InputError(f"an image array must be (H, W[, C]) or a (N, H, W, C) batch, got shape {examples.shape}")
    elif isinstance(examples, (list, tuple)):
        items = list(examples)
    elif isinstance(examples, Iterable) and not isinstance(examples, (bytes, dict)):
        items = list(examples)
    else:
        raise InputError(
            f"examples must be image paths, PIL images or uint8 arrays (or a list of them), got {type(examples).__name__}"
        )
    if not items:
        raise InputError("the example list is empty; give at least one image of the class")
    return items


def _describe_example(example: Any) -> str:
    if isinstance(example, (str, Path)):
        return repr(str(example))
    if isinstance(example, np.ndarray):
        return f"array {example.dtype} {example.shape}"
    return type(example).__name__


def distinct_examples(embeddings: np.ndarray) -> np.ndarray:
    """``embeddings`` (n, D) without exact duplicate rows, in first-seen order.

    The same photo given several times is one example: it gives bit-identical embeddings, and
    counting it n times would make the head math trust a mean "estimated" from n examples.
    So duplicates learn exactly like the single example (different photos never collide).
    """
    if embeddings.shape[0] < 2:
        return embeddings
    _, first = np.unique(np.ascontiguousarray(embeddings), axis=0, return_index=True)
    if first.size == embeddings.shape[0]:
        return embeddings
    return embeddings[np.sort(first)]


def finite_embeddings(embeddings: np.ndarray, what: str) -> np.ndarray:
    if not np.all(np.isfinite(embeddings)):
        raise InputError(f"the backbone produced NaN or infinite embeddings for {what}; nothing was changed")
    return embeddings


def check_new_names(names: list) -> None:
    """Refuse an empty list of new class names, an invalid name or a name given twice.

    Raises:
        InputError: When ``names`` is empty, holds an invalid name or a duplicate.
    """
    if not names:
        raise InputError("no classes given; give at least one class name with its examples")
    for name in names:
        check_class_name(name)
    if len(set(names)) != len(names):
        raise InputError(f"duplicate class names in {names}")


def check_name_free(name: str, manifest: Manifest, exclude: str | None = None) -> None:
    """Refuse ``name`` for a new (or renamed) class when the bundle has it already or it is the unknown label.

    Raises:
        InputError: When ``name`` is taken (``exclude``: a name that does not count, the class being renamed).
    """
    existing = [entry for entry in manifest.class_names if entry != exclude]
    if name in existing:
        raise InputError(f"class {name!r} already exists in the bundle; use add_examples to strengthen it "
                         "or choose another name; nothing was changed")
    if name == UNKNOWN_LABEL and manifest.data["head"].get("unknown"):
        raise InputError(f"{name!r} is the label unknown rejection reports; choose another class name")


def existing_index(name: Any, manifest: Manifest) -> int:
    """The index of the existing class ``name`` in ``manifest``.

    Raises:
        InputError: When ``name`` is not a valid class name or not in the bundle.
    """
    check_class_name(name)
    names = manifest.class_names
    if name not in names:
        raise InputError(f"class {name!r} is not in the bundle (classes: {names[:20]}"
                         f"{' ...' if len(names) > 20 else ''}); nothing was changed")
    return names.index(name)


def prepare_examples(examples: Any, spec: Any, what: str) -> np.ndarray:
    """``examples`` (:func:`as_example_list`) prepared for the backbone as one batch.

    Args:
        examples: One image or a collection of images (paths, PIL images, uint8 arrays).
        spec: The runtime's input spec.
        what: What the examples are for, in error messages (e.g. ``"class 'mug'"``).

    Returns:
        The prepared batch (N, H, W, C).

    Raises:
        InputError: When there are no examples or one of them is unusable (the message says which).
    """
    items = as_example_list(examples)
    prepared = []
    for number, item in enumerate(items, start=1):
        try:
            prepared.append(prepare_image(item, spec))
        except InputError as error:
            raise InputError(
                f"example {number} of {len(items)} for {what} ({_describe_example(item)}) is unusable: {error}; "
                "the whole update was refused and nothing was changed"
            ) from error
    return np.stack(prepared)


def check_embeddings(embeddings: Any, size: int, what: str) -> np.ndarray:
    """Embeddings given for ``what`` as finite float32 (N >= 1, ``size``); one vector is one row.

    Raises:
        InputError: When they have another shape, are not floats, or are not finite.
    """
    array = np.asarray(embeddings)
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2 or array.shape[1] != size or array.shape[0] == 0:
        raise InputError(f"embeddings for {what} must be (N >= 1, {size}), got {array.shape}")
    if not np.issubdtype(array.dtype, np.floating):
        raise InputError(f"embeddings for {what} must be floats, got {array.dtype}")
    return finite_embeddings(array.astype(np.float32), what)


def reference_labels(labels: Sequence[str | int], count: int, manifest: Manifest) -> np.ndarray:
    """The class indices (int64) of ``count`` reference embeddings' ``labels`` (class names or indices).

    Raises:
        InputError: When the counts differ or a label is not a class of ``manifest``.
    """
    names = manifest.class_names
    labels_list = list(labels)
    if len(labels_list) != count:
        raise InputError(f"{count} embeddings but {len(labels_list)} labels")
    labels_array = np.array([existing_index(label, manifest) if isinstance(label, str) else int(label)
                             for label in labels_list], dtype=np.int64)
    if labels_array.size and (labels_array.min() < 0 or labels_array.max() >= len(names)):
        raise InputError(f"reference labels must be class indices in 0..{len(names) - 1}")
    return labels_array
