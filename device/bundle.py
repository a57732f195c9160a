"""Reading, verifying, writing and packing bundles (``NAME.eab/`` directories).

The device owns the format; the host writes bundles through the same functions.

Layout::

    NAME.eab/
      manifest.json                 the current version (written last, atomically)
      backbone.int8.tflite          backbone files: image -> embedding
      backbone.int8.onnx
      heads/v1/weights.npy          head v1: D x C float32
      heads/v1/bias.npy             C float32
      heads/v1/feature_mean.npy     D float32 (only when the head centers features)
      heads/v1/class_sums.npy       C x D float64
      heads/v1/class_counts.npy     C int64
      heads/v1/gram.npy             D x D float64 (optional)
      heads/v1/reference_embeddings.npy  K x D float16/float32 (optional, update gate)
      heads/v1/reference_labels.npy      K int64 class indices (optional, update gate)
      heads/v1/ridge_*.npy          ridge solver state (optional, derived from the statistics:
                                    two float32 inverses, D x D and (D+1) x (D+1), and
                                    a 2 x (D+2) calibration; see edgeadapt.device.ridge)

      heads/v7/part_*.npy           classes appended (or columns replaced) by version 7 on top
                                    of shared base files: ``head.parts``, assembled by the
                                    ``load_*`` readers (see edgeadapt.device.head_parts)
      heads/v2/tables.json          class and file tables of device versions, shared by later
                                    ones: ``manifest.tables``, assembled by :func:`read_manifest`
                                    (see edgeadapt.device.manifest_tables)

Every file is listed in the manifest with its sha256 and size; readers verify them
before use. Writers build the new directory next to the target, fsync it and rename.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Union

import numpy as np

from edgeadapt.device.errors import BundleError, IncompatibleModelError
from edgeadapt.device.head import ClassStats, Head
from edgeadapt.device.head_parts import assemble, load_parts
from edgeadapt.device.manifest import MAX_MANIFEST_BYTES, Manifest, check_relative_path
from edgeadapt.device.manifest_tables import folder_reader
from edgeadapt.device.npyio import read_npy
from edgeadapt.device.reference_embeddings import ReferenceEmbeddings
from edgeadapt.device.stats_extras import EXTRA_KEY, is_extra_array_name, load_statistics_extra
from edgeadapt.device.packing import UnpackedCopy
from edgeadapt.device.safefs import (
    check_tree,
    create_exclusive,
    durable_write,
    fsync_directory,
    inside,
    open_regular,
    read_regular,
    sha256_and_size,
    storage_error,
)

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
PACKED_SUFFIX = ".zip"
FileContent = Union[bytes, np.ndarray, Path]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    """sha256 of the regular file ``path`` (never through a symlink)."""
    return sha256_and_size(path, chunk_size)[0]


def npy_bytes(array: np.ndarray) -> bytes:
    """Serialise an array as a standard ``.npy`` file (no pickle)."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def _content_bytes(content: FileContent) -> bytes:
    if isinstance(content, np.ndarray):
        return npy_bytes(content)
    if isinstance(content, Path):
        return content.read_bytes()
    if isinstance(content, (bytes, bytearray, memoryview)):
        return bytes(content)
    raise TypeError(f"cannot write a {type(content).__name__} into a bundle")


def write_file_durably(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file, fsync and rename (:func:`safefs.durable_write`)."""
    durable_write(path, data)


# ----------------------------------------------------------------------------- writing
def write_bundle(
    path: str | Path, manifest: Manifest, files: Mapping[str, FileContent], overwrite: bool = False
) -> Path:
    """Write a complete new bundle directory atomically.

    ``files`` maps paths inside the bundle to their content (bytes, arrays saved as
    ``.npy``, or paths of existing files). The manifest's ``files`` table is filled in
    here. The bundle is built in a temporary sibling directory and renamed into place;
    an existing bundle is replaced only when ``overwrite`` is true.
    """
    target = Path(path)
    if target.exists() and not overwrite:
        raise BundleError(f"{target} already exists; pass overwrite=True or choose another output path")
    manifest = manifest.copy()
    table: dict[str, dict] = {}
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    except OSError as error:
        raise storage_error(error, target.parent, f"write the bundle {target.name}") from error
    try:
        for relative_path, content in files.items():
            check_relative_path(relative_path)
            data = _content_bytes(content)
            destination = staging / relative_path
            destination.parent.mkdir(parents=True, exist_ok=True)
            with os.fdopen(create_exclusive(destination), "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            table[relative_path] = {"sha256": sha256_bytes(data), "size": len(data)}
        manifest.data["files"] = table
        manifest.validate(str(target / MANIFEST_NAME))
        write_file_durably(staging / MANIFEST_NAME, manifest.to_json().encode())
        for directory in sorted({(staging / name).parent for name in table}, reverse=True):
            fsync_directory(directory)
        if target.exists():
            retired = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, retired)
            os.replace(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, target)
        fsync_directory(target.parent)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, OSError):
            raise storage_error(error, target.parent, f"write the bundle {target.name}") from error
        raise
    logger.info("wrote bundle %s (%d files)", target, len(table))
    return target


# ----------------------------------------------------------------------------- reading
@dataclass
class Bundle:
    """A verified bundle directory and its manifest.

    A bundle opened from a packed ``.zip`` runs from a temporary unpacked copy that
    :meth:`close` (or ``with Bundle.open(...)``, or interpreter exit) removes.
    """

    path: Path
    manifest: Manifest
    unpacked: UnpackedCopy | None = field(default=None, repr=False, compare=False)
    #: set by :meth:`open` when trusted keys were checked (``edgeadapt.device.signing.SignatureStatus``)
    signature: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def open(cls, path: str | Path, verify: bool = True, trusted_keys: Any = None) -> "Bundle":
        """Open a bundle directory (or a packed ``.zip``, unpacked to a temporary folder).

        The folder may hold no symlink or special file anywhere; the manifest is parsed and
        checked against the schema; with trusted keys its signature is checked next, before
        any listed file is read; with ``verify`` (always, when keys are configured) every
        listed file is checked for presence, size and sha256 (a packed bundle is always
        verified while unpacking).

        Args:
            path: Bundle directory (``NAME.eab``) or packed bundle (``.zip``).
            verify: Check every listed file's size and sha256.
            trusted_keys: Public key files, loaded keys or a ``edgeadapt.device.trust.TrustedKeys``
                the bundle must be signed by (docs/SIGNING.md); None: the folder in
                ``$EDGEADAPT_TRUST_DIR`` if set, else no signature check; False: no signature
                check whatever the environment says.

        Returns:
            The opened bundle; ``signature`` holds the verified signature status (None
            without keys).

        Raises:
            BundleError: naming the first problem (a ``SignatureError`` subclass for a failed
                signature check).
            IncompatibleModelError: the head is bound to another backbone.
        """
        location = Path(path)
        if location.is_file():
            return cls._open_packed(location, trusted_keys)
        if not location.is_dir():
            raise BundleError(f"bundle {str(path)!r} does not exist or is not a bundle directory or packed bundle")
        return cls._open_folder(location, verify, trusted_keys)

    @classmethod
    def _open_folder(cls, location: Path, verify: bool, trusted_keys: Any, files_checked: bool = False,
                     check_signature: bool = True) -> "Bundle":
        """Open a folder; ``files_checked``: the caller already checked every file's size and sha256."""
        check_tree(location)
        bundle = cls(location, read_manifest(location))
        if check_signature:  # the signature covers the manifest: checked before any listed file is read
            from edgeadapt.device.signing import check_bundle_signature

            bundle.signature = check_bundle_signature(bundle, trusted_keys, files_verified=True)
        if verify or (bundle.signature is not None and not files_checked):
            bundle.verify()
        bundle._check_head_binding()
        return bundle

    @classmethod
    def _open_packed(cls, location: Path, trusted_keys: Any = None) -> "Bundle":
        try:
            copy = UnpackedCopy(Path(tempfile.mkdtemp(prefix="edgeadapt-bundle-")))
        except OSError as error:
            raise storage_error(error, Path(tempfile.gettempdir()), "unpack the packed bundle") from error
        try:
            stem = location.stem if location.stem and not location.stem.startswith(".") else "bundle"
            folder = unpack_bundle(location, copy.path / stem[:200])
            # unpack_bundle checked every file's size and sha256
            bundle = cls._open_folder(folder, verify=False, trusted_keys=trusted_keys, files_checked=True)
        except BaseException:
            copy.close()
            raise
        bundle.unpacked = copy
        return bundle

    def close(self) -> None:
        """Remove the temporary unpacked copy of a packed bundle (nothing for a directory)."""
        if self.unpacked is not None:
            self.unpacked.close()

    def __enter__(self) -> "Bundle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def verify(self, only: Iterable[str] | None = None) -> None:
        """Check every file listed in the manifest (or just ``only``): present, right size, right sha256."""
        files = self.manifest.files
        if only is not None:
            wanted = list(only)
            for relative_path in wanted:
                if relative_path not in files:
                    raise BundleError(f"{relative_path!r} is not listed in the bundle manifest of {self.path}")
            files = {relative_path: files[relative_path] for relative_path in wanted}
        for relative_path, entry in files.items():
            file_path = self.file_path(relative_path)
            try:
                size = os.lstat(file_path).st_size  # lstat: a link is never followed
            except FileNotFoundError:
                raise BundleError(
                    f"bundle file {relative_path!r} is missing from {self.path}; re-copy or re-export the bundle"
                ) from None
            except OSError as error:
                raise BundleError(f"cannot read bundle file {relative_path!r}: {error.strerror or error}") from error
            if size != entry.get("size"):
                raise BundleError(
                    f"bundle file {relative_path!r} has {size} bytes, the manifest says {entry.get('size')}: "
                    "the file is truncated or was replaced; re-copy or re-export the bundle"
                )
            digest, size = sha256_and_size(file_path, what=f"bundle file {relative_path!r} in")
            if size != entry.get("size") or digest != entry.get("sha256"):
                raise BundleError(
                    f"bundle file {relative_path!r} fails its sha256 check: it is corrupted or was edited; "
                    "re-copy or re-export the bundle"
                )

    def _check_head_binding(self) -> None:
        head = self.manifest.data["head"]
        bound = head.get("backbone_fingerprint")
        if bound != self.manifest.backbone_fingerprint:
            raise IncompatibleModelError(
                f"the head in {self.path} is bound to backbone {bound}, but the bundle's backbone is "
                f"{self.manifest.backbone_fingerprint}; retrain or re-export the head for this backbone"
            )

    def file_path(self, relative_path: str) -> Path:
        """The path of a listed file, checked after resolution to stay inside the bundle."""
        if relative_path not in self.manifest.data["files"]:
            check_relative_path(relative_path)
            raise BundleError(f"{relative_path!r} is not listed in the bundle manifest")
        check_relative_path(relative_path)
        folder = relative_path.rpartition("/")[0]
        checked = self.__dict__.setdefault("_checked_folders", set())
        if folder and folder not in checked:  # folders resolved once per opened bundle (a link -> refused)
            inside(self.path, relative_path)
            checked.add(folder)
        return self.path / relative_path

    def _array_checks(self) -> dict:
        cached = self.__dict__.get("_checks")
        if cached is None or cached[0] is not self.manifest.data:
            cached = (self.manifest.data, self.manifest.head_files.arrays)
            self.__dict__["_checks"] = cached
        return cached[1]

    def _load_array(self, relative_path: str) -> np.ndarray:
        """A listed ``.npy`` file, header checked (dtype, the shape the manifest implies, size) before
        anything is allocated, values checked finite."""
        shape, kinds = self._array_checks().get(relative_path, (None, "biuf"))
        path = self.file_path(relative_path)
        descriptor = open_regular(path, f"bundle file {relative_path!r} in")
        try:
            with os.fdopen(descriptor, "rb", closefd=False) as handle:
                return read_npy(handle, os.fstat(descriptor).st_size, f"bundle file {relative_path!r}",
                                shape=shape, kinds=kinds)
        except OSError as error:
            raise BundleError(f"cannot read {relative_path!r} from {self.path}: {error.strerror or error}") from error
        finally:
            os.close(descriptor)

    def _parts(self) -> list:
        """The loaded parts of the current version (:mod:`edgeadapt.device.head_parts`), cached per manifest."""
        cached = self.__dict__.get("_loaded_parts")
        if cached is None or cached[0] is not self.manifest.data:
            cached = (self.manifest.data, load_parts(self.manifest.data["head"], self._load_array))
            self.__dict__["_loaded_parts"] = cached
        return cached[1]

    def _assembled(self, base: dict[str, np.ndarray | None]) -> dict[str, np.ndarray | None]:
        """``base`` arrays with the current version's parts applied (``base`` itself without parts)."""
        if not self.manifest.data["head"].get("parts"):
            return base
        try:
            return assemble(base, self._parts())
        except (ValueError, IndexError) as error:
            raise BundleError(f"the head parts in {self.path} do not fit their base files ({error}); the bundle is "
                              "corrupted: roll back or re-export it") from error

    def load_head(self) -> Head:
        """The head of the current version (base files and parts assembled)."""
        section = self.manifest.head_files
        mean = self._load_array(section.feature_mean) if section.feature_mean else None
        arrays = self._assembled({"weights": self._load_array(section.weights), "bias": self._load_array(section.bias)})
        try:
            return Head(weights=arrays["weights"], bias=arrays["bias"],
                        feature_mean=mean, l2_normalize=section.l2_normalize, temperature=section.temperature)
        except IncompatibleModelError as error:
            raise BundleError(f"the head in {self.path} is inconsistent: {error}") from error

    def load_device_examples(self) -> ReferenceEmbeddings | None:
        """The examples learned on devices (float32 (N, D) and class indices), base and parts; None when none."""
        section = self.manifest.data["head"].get("device_examples")
        base: dict[str, np.ndarray | None] = {"examples": None, "labels": None}
        if section:
            base["examples"] = self._load_array(section["embeddings"])
            base["labels"] = self._load_array(section["labels"])
        base = self._assembled(base)
        if base["examples"] is None:
            return None
        return self._load_pair_arrays(base["examples"], base["labels"], "device examples")

    def load_class_stats(self) -> ClassStats | None:
        """The class statistics of the current version, or None if the bundle has none."""
        statistics = self.manifest.data["head"].get("statistics")
        if not statistics:
            return None
        gram = self._load_array(statistics["gram"]) if statistics.get("gram") else None
        basis = None
        section = statistics.get(EXTRA_KEY)
        if isinstance(section, dict) and isinstance(section.get("files"), dict):
            arrays = {name: self._load_array(path) for name, path in section["files"].items()
                      if isinstance(name, str) and is_extra_array_name(name)}
            try:
                basis = load_statistics_extra(EXTRA_KEY, section, arrays)
            except (KeyError, TypeError, ValueError, IndexError, OverflowError) as error:
                raise BundleError(f"the ridge solver state in {self.path} is malformed ({error}); re-export the bundle") \
                    from error
        counts = self._load_array(statistics["class_counts"])
        if counts.size and counts.min() < 0:
            raise BundleError(f"class_counts in {self.path} holds negative counts; the bundle is corrupted")
        sums = self._load_array(statistics["class_sums"])
        if self.manifest.data["head"].get("parts"):
            arrays = self._assembled({"class_sums": sums, "class_counts": counts, "gram": gram})
            sums, counts, gram = arrays["class_sums"], arrays["class_counts"], arrays["gram"]
            if counts.size and counts.min() < 0:
                raise BundleError(f"the class count parts in {self.path} hold negative counts; the bundle is corrupted")
        try:
            return ClassStats(sums=sums, counts=counts, gram=gram, ridge_basis=basis)
        except IncompatibleModelError as error:
            raise BundleError(f"the class statistics in {self.path} are inconsistent: {error}") from error

    def load_reference_embeddings(self) -> ReferenceEmbeddings | None:
        """The update-gate reference embeddings of the current version, or None if the bundle has none."""
        section = self.manifest.data["head"].get("references")
        if not section:
            return None
        return self._load_pair(section, "references")

    def _load_pair(self, section: dict, what: str) -> ReferenceEmbeddings:
        return self._load_pair_arrays(self._load_array(section["embeddings"]), self._load_array(section["labels"]),
                                      what)

    def _load_pair_arrays(self, embeddings: np.ndarray, labels: np.ndarray, what: str) -> ReferenceEmbeddings:
        count = len(self.manifest.data["classes"])
        if labels.shape[0] != embeddings.shape[0] or (labels.size and (labels.min() < 0 or labels.max() >= count)):
            raise BundleError(f"the {what} in {self.path} do not match (labels must be class indices 0..{count - 1}, "
                              "one per embedding); the bundle is corrupted")
        try:
            return ReferenceEmbeddings(embeddings=embeddings, labels=labels)
        except IncompatibleModelError as error:
            raise BundleError(f"the {what} in {self.path} are inconsistent: {error}") from error

    def load_background(self) -> np.ndarray | None:
        """The background embeddings of the current version ((N, D) float16 or float32 as stored), or None."""
        section = self.manifest.data["head"].get("background")
        if not section:
            return None
        background = self._load_array(section["embeddings"])
        if background.ndim != 2 or background.shape[1] != self.manifest.embedding_size \
                or background.dtype not in (np.float16, np.float32):
            raise BundleError(f"background embeddings are {background.dtype} {background.shape}, expected float16 or "
                              f"float32 (N, {self.manifest.embedding_size}); the bundle is damaged, re-export it")
        return background

    def model_entry(self, model_format: str) -> dict | None:
        """The manifest entry of the backbone file in ``model_format`` ("tflite"/"onnx")."""
        for entry in self.manifest.models:
            if entry.get("format") == model_format:
                return entry
        return None

    def total_size(self) -> int:
        """Bytes of every file in the bundle, manifest included."""
        sizes = sum(int(entry["size"]) for entry in self.manifest.files.values())
        return sizes + (self.path / MANIFEST_NAME).stat().st_size


def read_manifest(folder: Path) -> Manifest:
    """Read and validate ``folder/manifest.json`` (a regular file, never through a symlink)."""
    manifest_path = folder / MANIFEST_NAME
    if not os.path.lexists(manifest_path):
        raise BundleError(f"{folder} has no {MANIFEST_NAME}; it is not a bundle (or it is incomplete)")
    raw = read_regular(manifest_path, MAX_MANIFEST_BYTES, "bundle manifest")
    return Manifest.from_json(raw, str(manifest_path), folder_reader(folder))


# ----------------------------------------------------------------------------- packing
def pack_bundle(bundle_path: str | Path, output: str | Path) -> Path:
    """Pack a verified bundle directory into one ``.zip`` file (manifest first).

    Raises:
        BundleError: the bundle is invalid.
        StorageError: the output cannot be written (disk full, read-only); nothing is left behind.
    """
    from edgeadapt.device.packing import write_packed

    with Bundle.open(bundle_path, trusted_keys=False) as bundle:  # signatures travel unchecked, as when copied
        return write_packed(bundle, Path(output))


def unpack_bundle(packed: str | Path, output_dir: str | Path) -> Path:
    """Unpack a packed bundle into the new folder ``output_dir``, every member checked before it is inflated.

    Raises:
        BundleError: the archive is damaged, holds unlisted or oversized members, links, etc.
        StorageError: the folder cannot be written; nothing is left behind.
    """
    from edgeadapt.device.packing import extract_packed

    return extract_packed(Path(packed), Path(output_dir))
