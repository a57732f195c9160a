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
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Union

import numpy as np

from edgeadapt.device.errors import BundleError, IncompatibleModelError
from edgeadapt.device.head import ClassStats, Head
from edgeadapt.device.ridge import BASIS_ARRAYS, RidgeBasis
from edgeadapt.device.manifest import Manifest, check_relative_path

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
PACKED_SUFFIX = ".zip"
FileContent = Union[bytes, np.ndarray, Path]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


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


def fsync_directory(path: Path) -> None:
    """Flush a directory entry (rename durability) where the platform supports it."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def write_file_durably(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file, fsync and rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    fsync_directory(path.parent)


# ----------------------------------------------------------------------------- head files
def head_file_names(version: int) -> dict[str, str]:
    base = f"heads/v{version}"
    return {
        "weights": f"{base}/weights.npy",
        "bias": f"{base}/bias.npy",
        "feature_mean": f"{base}/feature_mean.npy",
        "class_sums": f"{base}/class_sums.npy",
        "class_counts": f"{base}/class_counts.npy",
        "gram": f"{base}/gram.npy",
        "reference_embeddings": f"{base}/reference_embeddings.npy",
        "reference_labels": f"{base}/reference_labels.npy",
        "background": f"{base}/background.npy",
        **{name: f"{base}/{name}.npy" for name in BASIS_ARRAYS},
    }


@dataclass
class ReferenceEmbeddings:
    """A few raw embeddings per class, kept in the bundle for the device update gate.

    Before the device commits a head update it checks that the updated head still
    predicts these old-class embeddings as before (see docs/DEVICE_UPDATES.md).
    ``embeddings`` is (K, D) float16 or float32 (float16 halves the size and is plenty for
    the gate), ``labels`` is (K,) int64 class indices into the head.
    """

    embeddings: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        embeddings = np.asarray(self.embeddings)
        if embeddings.dtype not in (np.float16, np.float32):
            embeddings = embeddings.astype(np.float32)
        self.embeddings = np.ascontiguousarray(embeddings)
        self.labels = np.ascontiguousarray(np.asarray(self.labels, dtype=np.int64).reshape(-1))
        if self.embeddings.ndim != 2 or self.embeddings.shape[0] != self.labels.shape[0]:
            raise IncompatibleModelError(
                f"reference embeddings {self.embeddings.shape} and labels {self.labels.shape} do not match"
            )
        if not np.all(np.isfinite(self.embeddings)):
            raise IncompatibleModelError("reference embeddings contain NaN or infinite values")
        if self.labels.size and self.labels.min() < 0:
            raise IncompatibleModelError("reference labels must be non-negative class indices")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def as_float32(self) -> np.ndarray:
        """The embeddings as float32 (converted once and cached: float16 conversion is slow in numpy)."""
        cached = self.__dict__.get("_float32")
        if cached is None:
            cached = np.asarray(self.embeddings, dtype=np.float32)
            self.__dict__["_float32"] = cached
        return cached

    @classmethod
    def select(
        cls, embeddings: np.ndarray, labels: np.ndarray, per_class: int = 5, seed: int = 0, dtype: str = "float16"
    ) -> "ReferenceEmbeddings":
        """Pick at most ``per_class`` embeddings of each class (deterministic in ``seed``)."""
        embeddings = np.asarray(embeddings)
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if embeddings.ndim != 2 or embeddings.shape[0] != labels.shape[0]:
            raise IncompatibleModelError(f"embeddings {embeddings.shape} and labels {labels.shape} do not match")
        if per_class < 1:
            raise IncompatibleModelError(f"per_class must be at least 1, got {per_class}")
        chosen = []
        for label in np.unique(labels):
            members = np.flatnonzero(labels == label)
            if len(members) > per_class:
                members = np.sort(np.random.default_rng([int(seed), int(label)]).choice(members, per_class, replace=False))
            chosen.append(members)
        indices = np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)
        return cls(embeddings[indices].astype(np.dtype(dtype)), labels[indices])

    def per_class_count(self) -> int:
        """The largest number of references held for one class (0 when empty)."""
        return int(np.bincount(self.labels).max()) if self.labels.size else 0


def head_payload(
    head: Head,
    stats: ClassStats | None,
    version: int,
    backbone_fingerprint: str,
    reference_embeddings: ReferenceEmbeddings | None = None,
    background: np.ndarray | None = None,
) -> tuple[dict, dict[str, np.ndarray]]:
    """Manifest ``head`` section and the files that hold ``head``, ``stats``, the references and the background.

    ``background``: optional (N, D) raw embeddings of ordinary, unlabelled photos (float16 or
    float32). Few-shot methods calibrate a new class against them so that it claims only what
    is its own (see :mod:`edgeadapt.device.fewshot`).
    """
    names = head_file_names(version)
    files: dict[str, np.ndarray] = {names["weights"]: head.weights, names["bias"]: head.bias}
    section: dict = {
        "version": version,
        "format": "npy",
        "weights": names["weights"],
        "bias": names["bias"],
        "feature_mean": None,
        "l2_normalize": bool(head.l2_normalize),
        "temperature": float(head.temperature),
        "backbone_fingerprint": backbone_fingerprint,
        "statistics": None,
    }
    if head.feature_mean is not None:
        files[names["feature_mean"]] = head.feature_mean
        section["feature_mean"] = names["feature_mean"]
    if stats is not None:
        if stats.num_classes != head.num_classes or stats.embedding_size != head.embedding_size:
            raise IncompatibleModelError(
                f"class statistics ({stats.num_classes} classes x {stats.embedding_size}) do not match the head "
                f"({head.num_classes} classes x {head.embedding_size})"
            )
        files[names["class_sums"]] = stats.sums
        files[names["class_counts"]] = stats.counts
        statistics = {
            "class_sums": names["class_sums"],
            "class_counts": names["class_counts"],
            "gram": None,
            "bytes_per_class": stats.nbytes_per_class(),
            "bytes_shared": stats.nbytes_shared(),
            "examples": int(stats.counts.sum()),
        }
        if stats.gram is not None:
            files[names["gram"]] = stats.gram
            statistics["gram"] = names["gram"]
        basis = stats.ridge_basis
        if isinstance(basis, RidgeBasis) and basis.embedding_size == head.embedding_size:
            paths = {}
            for name, array in basis.arrays().items():
                files[names[name]] = array
                paths[name] = names[name]
            statistics["ridge_basis"] = {**basis.metadata(), "files": paths,
                                         "bytes": sum(int(array.nbytes) for array in basis.arrays().values())}
        section["statistics"] = statistics
    if reference_embeddings is not None and len(reference_embeddings):
        references = reference_embeddings
        if references.embeddings.shape[1] != head.embedding_size:
            raise IncompatibleModelError(
                f"reference embeddings are {references.embeddings.shape[1]}-d but the head takes "
                f"{head.embedding_size}-d embeddings"
            )
        if references.labels.max() >= head.num_classes:
            raise IncompatibleModelError(
                f"reference labels go up to {int(references.labels.max())} but the head has {head.num_classes} classes"
            )
        files[names["reference_embeddings"]] = references.embeddings
        files[names["reference_labels"]] = references.labels
        section["references"] = {
            "embeddings": names["reference_embeddings"],
            "labels": names["reference_labels"],
            "count": len(references),
            "per_class": references.per_class_count(),
            "dtype": references.embeddings.dtype.name,
        }
    if background is not None and len(background):
        background = np.asarray(background)
        if background.ndim != 2 or background.shape[1] != head.embedding_size:
            raise IncompatibleModelError(
                f"background embeddings have shape {background.shape}, expected (N, {head.embedding_size})"
            )
        if background.dtype not in (np.float16, np.float32):
            background = background.astype(np.float32)
        files[names["background"]] = background
        section["background"] = {"embeddings": names["background"], "count": int(background.shape[0]),
                                 "dtype": background.dtype.name}
    return section, files


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
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        for relative_path, content in files.items():
            check_relative_path(relative_path)
            data = _content_bytes(content)
            destination = staging / relative_path
            destination.parent.mkdir(parents=True, exist_ok=True)
            with open(destination, "wb") as handle:
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
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("wrote bundle %s (%d files)", target, len(table))
    return target


# ----------------------------------------------------------------------------- reading
@dataclass
class Bundle:
    """A verified bundle directory and its manifest."""

    path: Path
    manifest: Manifest

    @classmethod
    def open(cls, path: str | Path, verify: bool = True) -> "Bundle":
        """Open a bundle directory (or a packed ``.zip``, unpacked to a temporary folder).

        With ``verify`` every listed file is checked for presence, size and sha256.
        Raises :class:`BundleError` naming the first problem.
        """
        location = Path(path)
        if location.is_file() and zipfile.is_zipfile(location):
            location = unpack_bundle(location, Path(tempfile.mkdtemp(prefix="edgeadapt-bundle-")) / location.stem)
        if not location.is_dir():
            raise BundleError(f"bundle {str(path)!r} does not exist or is not a bundle directory or packed bundle")
        manifest_path = location / MANIFEST_NAME
        if not manifest_path.is_file():
            raise BundleError(f"{location} has no {MANIFEST_NAME}; it is not a bundle (or it is incomplete)")
        manifest = Manifest.from_json(manifest_path.read_text(encoding="utf-8"), str(manifest_path))
        bundle = cls(location, manifest)
        if verify:
            bundle.verify()
        bundle._check_head_binding()
        return bundle

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
            file_path = self.path / relative_path
            if not file_path.is_file():
                raise BundleError(
                    f"bundle file {relative_path!r} is missing from {self.path}; re-copy or re-export the bundle"
                )
            size = file_path.stat().st_size
            if size != entry.get("size"):
                raise BundleError(
                    f"bundle file {relative_path!r} has {size} bytes, the manifest says {entry.get('size')}: "
                    "the file is truncated or was replaced; re-copy or re-export the bundle"
                )
            if sha256_file(file_path) != entry.get("sha256"):
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
        for key in ("weights", "bias"):
            if head.get(key) not in self.manifest.files:
                raise BundleError(f"head file {head.get(key)!r} is not listed in the manifest's files")

    def file_path(self, relative_path: str) -> Path:
        check_relative_path(relative_path)
        if relative_path not in self.manifest.files:
            raise BundleError(f"{relative_path!r} is not listed in the bundle manifest")
        return self.path / relative_path

    def _load_array(self, relative_path: str) -> np.ndarray:
        try:
            return np.load(self.file_path(relative_path), allow_pickle=False)
        except (ValueError, OSError) as error:
            raise BundleError(f"cannot read {relative_path!r} from {self.path}: {error}") from error

    def load_head(self) -> Head:
        """The head of the current version."""
        section = self.manifest.data["head"]
        mean = self._load_array(section["feature_mean"]) if section.get("feature_mean") else None
        head = Head(
            weights=self._load_array(section["weights"]),
            bias=self._load_array(section["bias"]),
            feature_mean=mean,
            l2_normalize=bool(section.get("l2_normalize", False)),
            temperature=float(section.get("temperature", 1.0)),
        )
        if head.num_classes != len(self.manifest.data["classes"]):
            raise BundleError(
                f"head has {head.num_classes} classes but the manifest lists {len(self.manifest.data['classes'])}"
            )
        if head.embedding_size != self.manifest.embedding_size:
            raise BundleError(
                f"head expects {head.embedding_size}-d embeddings but the manifest says {self.manifest.embedding_size}"
            )
        return head

    def load_class_stats(self) -> ClassStats | None:
        """The class statistics of the current version, or None if the bundle has none."""
        statistics = self.manifest.data["head"].get("statistics")
        if not statistics:
            return None
        gram = self._load_array(statistics["gram"]) if statistics.get("gram") else None
        basis = None
        section = statistics.get("ridge_basis")
        if isinstance(section, dict) and isinstance(section.get("files"), dict):
            arrays = {name: self._load_array(path) for name, path in section["files"].items() if name in BASIS_ARRAYS}
            basis = RidgeBasis.from_parts(section, arrays)
        return ClassStats(
            sums=self._load_array(statistics["class_sums"]),
            counts=self._load_array(statistics["class_counts"]),
            gram=gram,
            ridge_basis=basis,
        )

    def load_reference_embeddings(self) -> ReferenceEmbeddings | None:
        """The update-gate reference embeddings of the current version, or None if the bundle has none."""
        section = self.manifest.data["head"].get("references")
        if not section:
            return None
        return ReferenceEmbeddings(
            embeddings=self._load_array(section["embeddings"]), labels=self._load_array(section["labels"])
        )

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


# ----------------------------------------------------------------------------- packing
def pack_bundle(bundle_path: str | Path, output: str | Path) -> Path:
    """Pack a verified bundle directory into one ``.zip`` file (manifest first)."""
    bundle = Bundle.open(bundle_path)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    try:
        with zipfile.ZipFile(temporary, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.write(bundle.path / MANIFEST_NAME, MANIFEST_NAME)
            for relative_path in sorted(bundle.manifest.files):
                archive.write(bundle.path / relative_path, relative_path)
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, output)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return output


def unpack_bundle(packed: str | Path, output_dir: str | Path) -> Path:
    """Unpack a packed bundle, refusing any member path that escapes ``output_dir``."""
    packed = Path(packed)
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise BundleError(f"{output_dir} exists and is not empty; unpack into a new directory")
    try:
        archive = zipfile.ZipFile(packed)
    except (zipfile.BadZipFile, OSError) as error:
        raise BundleError(f"{packed} is not a packed bundle (zip): {error}") from error
    with archive:
        members = archive.infolist()
        for member in members:
            check_relative_path(member.filename)
            if member.is_dir():
                continue
            mode = (member.external_attr >> 16) & 0o170000
            if mode == 0o120000:
                raise BundleError(f"packed bundle member {member.filename!r} is a symbolic link; refusing it")
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
        try:
            root = staging.resolve()
            for member in members:
                destination = (staging / member.filename).resolve()
                if root not in destination.parents and destination != root:
                    raise BundleError(f"packed bundle member {member.filename!r} escapes the bundle directory")
                if member.is_dir():
                    destination.mkdir(parents=True, exist_ok=True)
                    continue
                destination.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(member) as source, open(destination, "wb") as sink:
                    shutil.copyfileobj(source, sink)
            Bundle.open(staging)  # verify before the bundle becomes visible
            if output_dir.exists():
                output_dir.rmdir()
            os.replace(staging, output_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return output_dir
