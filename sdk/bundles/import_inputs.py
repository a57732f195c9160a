"""What an import reads besides the model: its labels and images of its existing classes.

Owns reading a labels file (one class name per line), making duplicate labels unique, and
loading ``root/<class name>/*`` images prepared for the model's input spec (the class
statistics of :func:`edgeadapt.bundles.importing.import_classifier`, and Keras int8 calibration).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from edgeadapt.device.errors import DatasetError, InputError
from edgeadapt.device.manifest import InputSpec
from edgeadapt.device.preprocessing import IMAGE_SUFFIXES, list_class_folders, list_image_files, prepare_image


def read_labels(source: str | Path | Sequence[str]) -> list[str]:
    """Class names from a labels file (one per line; trailing blank lines ignored) or a list."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise InputError(f"labels file {str(path)!r} does not exist")
        names = path.read_text(encoding="utf-8").splitlines()
        while names and not names[-1].strip():
            names.pop()
    else:
        names = list(source)
    names = [name.strip() for name in names]
    if not names:
        raise InputError("the labels file is empty; give one class name per line")
    blank = [index for index, name in enumerate(names) if not name]
    if blank:
        raise InputError(f"the labels file has blank lines at {blank[:5]} (0-based); every class needs a name")
    return names


def unique_labels(names: Sequence[str]) -> tuple[list[str], dict[int, str]]:
    """Make duplicate names unique ("crane", "crane (2)"); returns the names and the renamed indices."""
    seen: dict[str, int] = {}
    result, renamed = [], {}
    taken = set(names)
    for index, name in enumerate(names):
        if name in seen:
            count = seen[name] + 1
            candidate = f"{name} ({count})"
            while candidate in taken:
                count += 1
                candidate = f"{name} ({count})"
            seen[name] = count
            taken.add(candidate)
            renamed[index] = candidate
            result.append(candidate)
        else:
            seen[name] = 1
            result.append(name)
    return result, renamed


def load_class_images(root: str | Path, class_names: Sequence[str], spec: InputSpec) -> tuple[np.ndarray, np.ndarray]:
    """Images of ``root/<class name>/*`` prepared for ``spec`` and their label indices in ``class_names``.

    Every sub-folder must be named like one of the classes; any number of images (>= 1) per folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"data folder {str(root)!r} does not exist or is not a folder")
    index = {name: position for position, name in enumerate(class_names)}
    folders = list_class_folders(root)
    if not folders:
        raise DatasetError(f"data folder {str(root)!r} has no class sub-folders (root/<label>/*.jpg)")
    unknown = [folder.name for folder in folders if folder.name not in index]
    if unknown:
        raise DatasetError(
            f"data sub-folders {unknown[:5]} are not class names of the model; folder names must equal labels "
            "exactly (e.g. 'tiger cat')"
        )
    images, labels = [], []
    for folder in folders:
        files = list_image_files(folder)
        if not files:
            raise DatasetError(f"class folder {str(folder)!r} has no images ({'/'.join(IMAGE_SUFFIXES)})")
        for path in files:
            images.append(prepare_image(path, spec))
            labels.append(index[folder.name])
    return np.stack(images), np.asarray(labels, np.int64)
