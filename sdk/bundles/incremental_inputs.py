"""The examples of host-side class additions: folders or mappings, embedded with the bundle's backbone.

Owns reading what :func:`edgeadapt.bundles.incremental.add_classes` and ``resolve`` are given (a
folder with one sub-folder per class, or a mapping ``name -> images | embeddings``),
embedding images with the bundle's own int8 backbone through the device
:class:`~edgeadapt.device.runtime.Runtime` (the embeddings the device will see), and
checking every class has finite examples before anything is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from edgeadapt.device.bundle import Bundle
from edgeadapt.device.errors import InputError


def folder_examples(folder: str | Path, classes: Sequence[str] | None = None) -> dict[str, list[Path]]:
    """``{class name: [image paths]}`` of a folder with one sub-folder per class (all images, no split)."""
    from edgeadapt.data.image_folders import scan_image_folder
    from edgeadapt.device.errors import DatasetError

    try:
        names, entries = scan_image_folder(folder, classes, min_images=1)  # one photo is enough to learn from
    except DatasetError as error:
        raise InputError(str(error)) from error
    examples: dict[str, list[Path]] = {name: [] for name in names}
    for entry in entries:
        examples[names[entry.label]].append(entry.path)
    return examples


def examples_mapping(data: Any, classes: Sequence[str] | None, what: str) -> dict[str, Any]:
    """``{class name: examples}`` from a folder (one sub-folder per class) or a mapping.

    Args:
        data: a folder, or a mapping name -> images or embeddings.
        classes: the classes to keep (None: all).
        what: what ``data`` is, for messages ("new data", "replay").

    Returns:
        The examples of each class, in ``classes`` order when given.

    Raises:
        InputError: ``data`` is neither, or lacks one of ``classes``.
    """
    if isinstance(data, (str, Path)):
        return folder_examples(data, classes)
    if isinstance(data, Mapping):
        mapping = dict(data)
        if classes is not None:
            missing = [name for name in classes if name not in mapping]
            if missing:
                raise InputError(f"{what} has no examples for {missing}")
            mapping = {name: mapping[name] for name in classes}
        return mapping
    raise InputError(f"{what} must be a folder (one sub-folder per class) or a mapping name -> images or embeddings")


class BundleEmbedder:
    """Embeds images with the bundle's backbone (opened on first use only)."""

    def __init__(self, bundle: Bundle, backend: str):
        self.bundle = bundle
        self.backend = backend
        self._runtime = None

    def __call__(self, name: str, examples: Any, size: int) -> np.ndarray:
        if isinstance(examples, np.ndarray) and examples.ndim == 2 and np.issubdtype(examples.dtype, np.floating):
            if examples.shape[1] != size:
                raise InputError(
                    f"class {name!r}: embeddings have {examples.shape[1]} values but this bundle's backbone gives {size}"
                )
            array = examples
        else:
            if isinstance(examples, np.ndarray) and examples.ndim == 4 and examples.shape[0] == 0:
                raise InputError(f"class {name!r} has zero images; give at least one example per class")
            if isinstance(examples, (list, tuple)) and not examples:
                raise InputError(f"class {name!r} has zero images; give at least one example per class")
            if self._runtime is None:
                from edgeadapt.device.runtime import Runtime

                self._runtime = Runtime(self.bundle, backend=self.backend)
            try:
                array = self._runtime.embed(examples)
            except InputError as error:
                raise InputError(f"class {name!r}: {error}; nothing was written") from error
        array = np.asarray(array)
        if array.ndim != 2 or array.shape[0] == 0:
            raise InputError(f"class {name!r} has zero examples; give at least one example per class")
        if not np.all(np.isfinite(array)):
            raise InputError(f"class {name!r}: embeddings contain NaN or infinite values; nothing was written")
        return array.astype(np.float32)


def replay_embeddings(
    replay: Any, class_names: list[str], embedder: BundleEmbedder, size: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """Embeddings and label indices of replay examples of the bundle's old classes.

    Args:
        replay: None, a folder or a mapping of examples of old classes.
        class_names: the bundle's class names.
        embedder: embeds images with the bundle's backbone.
        size: the embedding size.

    Returns:
        ``(embeddings, labels)``, or None without replay examples.

    Raises:
        InputError: replay names a class the bundle does not have, or bad examples.
    """
    if replay is None:
        return None
    mapping = examples_mapping(replay, None, "replay")
    unknown = [name for name in mapping if name not in class_names]
    if unknown:
        raise InputError(f"replay holds classes {unknown} that are not in the bundle; replay is for its old classes")
    parts, labels = [], []
    for name, examples in mapping.items():
        embeddings = embedder(name, examples, size)
        parts.append(embeddings)
        labels.append(np.full(embeddings.shape[0], class_names.index(name), dtype=np.int64))
    if not parts:
        return None
    return np.concatenate(parts), np.concatenate(labels)
