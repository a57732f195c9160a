"""Add classes to a bundle and merge heads on the host, as a NEW bundle version.

    >>> from edgeadapt.incremental import add_classes
    >>> result = add_classes("model.eab", "photos/", "model-v2.eab", classes=["mug", "cup"])
    >>> print(result.summary())

The head math is :mod:`edgeadapt.device.incremental` (numpy only; the on-device updater
calls the same functions). This module does the host part around it:

- reads the new classes' images (a folder with one sub-folder per class, or a mapping
  ``name -> images | embeddings``) and embeds them with the bundle's own int8 backbone
  through the device :class:`~edgeadapt.device.runtime.Runtime` — the embeddings the device
  will see;
- validates everything (names, examples, statistics, output path) before anything is written;
- writes a new bundle directory through :func:`edgeadapt.device.bundle.write_bundle`:
  ``version`` + 1, ``parent_version``, the backbone files copied unchanged, the new head and
  class statistics under ``heads/v{version}/``, and each new class's provenance
  (``origin: host-added``, ``added_at``, ``examples``, ``added_in_version``).

Nothing is written when anything fails: the parent bundle is never modified and the new
directory appears only complete (atomic rename).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from edgeadapt.device.bundle import Bundle, write_bundle
from edgeadapt.device.errors import BundleError, IncompatibleModelError, InputError
from edgeadapt.device.head import ClassStats, Head
from edgeadapt.device.incremental import (
    STATISTICS_METHODS,
    TRAINED_METHODS,
    AddClassOptions,
    resolve_all,
    with_ridge_basis,
)
from edgeadapt.device import incremental as head_math
from edgeadapt.device.manifest import utc_timestamp
from edgeadapt.device.naming import check_class_name
from edgeadapt.device.update_inputs import distinct_examples
from edgeadapt.device.version_builder import ChangeAction

logger = logging.getLogger(__name__)

#: References kept per new class for the device update gate when the parent bundle has none.
from edgeadapt.device.update_gate import DEFAULT_REFERENCES_PER_CLASS  # noqa: E402,F401 (one default)


@dataclass(frozen=True)
class NamedHead:
    """A head that is not (yet) in a bundle, e.g. a 2-class head trained on this backbone's embeddings.

    ``backbone_fingerprint``, when given, must equal the target bundle's.
    """

    head: Head
    class_names: Sequence[str]
    stats: ClassStats | None = None
    backbone_fingerprint: str | None = None
    source: str = "head"


@dataclass
class IncrementalResult:
    """What an add / merge / re-solve wrote."""

    output: Path
    version: int
    parent_version: int
    action: str
    method: str
    added: list[dict] = field(default_factory=list)
    old_rows_unchanged: bool = True
    resolved: str | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"wrote {self.output} (version {self.version}, parent version {self.parent_version}), "
                 f"method {self.method}, {self.seconds * 1000:.0f} ms of head math"]
        for entry in self.added:
            lines.append(f"  added {entry['name']:<24} {entry['examples']:>6} examples  (class index {entry['index']})")
        if self.resolved:
            lines.append(f"  ALL rows re-solved from {self.resolved}: old-class outputs CHANGED")
        else:
            lines.append(f"  old-class rows bit-identical to the parent: {'yes' if self.old_rows_unchanged else 'NO'}")
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "output": str(self.output), "version": self.version, "parent_version": self.parent_version,
            "action": self.action, "method": self.method, "added": self.added,
            "old_rows_unchanged": self.old_rows_unchanged, "resolved": self.resolved,
            "seconds": self.seconds, "notes": self.notes,
        }


# ============================================================================= inputs
def _open(bundle: str | Path | Bundle) -> Bundle:
    return bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)


def _check_output(output: str | Path, overwrite: bool, parents: Sequence[Bundle]) -> Path:
    output = Path(output)
    for parent in parents:
        if output.resolve() == parent.path.resolve():
            raise InputError(f"output {output} is the parent bundle; a new version goes to a new directory")
    if output.exists() and not overwrite:
        raise BundleError(f"{output} already exists; choose another output path or pass overwrite=True (--overwrite)")
    return output


def folder_examples(folder: str | Path, classes: Sequence[str] | None = None) -> dict[str, list[Path]]:
    """``{class name: [image paths]}`` of a folder with one sub-folder per class (all images, no split)."""
    from edgeadapt.data import scan_image_folder
    from edgeadapt.device.errors import DatasetError

    try:
        names, entries = scan_image_folder(folder, classes, min_images=1)  # one photo is enough to learn from
    except DatasetError as error:
        raise InputError(str(error)) from error
    examples: dict[str, list[Path]] = {name: [] for name in names}
    for entry in entries:
        examples[names[entry.label]].append(entry.path)
    return examples


def _as_mapping(data: Any, classes: Sequence[str] | None, what: str) -> dict[str, Any]:
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


class _Embedder:
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


def _replay_embeddings(
    replay: Any, class_names: list[str], embedder: _Embedder, size: int
) -> tuple[np.ndarray, np.ndarray] | None:
    if replay is None:
        return None
    mapping = _as_mapping(replay, None, "replay")
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


# ============================================================================= writing
#: ``write_version(references=KEEP_REFERENCES)`` keeps the parent's update-gate references unchanged.
KEEP_REFERENCES = object()


def _parent_references(parent: Bundle):
    loader = getattr(parent, "load_reference_embeddings", None)
    return None if loader is None else loader()


def _references_for_classes(references, old_names: list[str], new_names: list[str]):
    """Keep the references of classes that survive (matched by name), relabelled to the new indices."""
    if references is None:
        return None
    position = {name: index for index, name in enumerate(new_names)}
    mapping = np.array([position.get(name, -1) for name in old_names], dtype=np.int64)
    labels = mapping[references.labels]
    keep = labels >= 0
    if not keep.any():
        return None
    return type(references)(embeddings=references.embeddings[keep], labels=labels[keep])


def write_version(
    parent: Bundle,
    head: Head,
    stats: ClassStats | None,
    classes: list[dict],
    output: str | Path,
    change: dict,
    *,
    references: Any = KEEP_REFERENCES,
    overwrite: bool = False,
) -> Path:
    """Write ``parent`` + a new head as a new bundle version in a new directory.

    The backbone files (every file outside ``heads/``) are copied unchanged through
    :func:`write_bundle`, which checksums them into the new manifest. Head-section entries
    this module does not manage (e.g. another tool's files) are kept with their files.
    ``references``: the update-gate reference embeddings of the new head (default: the
    parent's, unchanged; None: none).
    """
    manifest = parent.manifest
    new_names = [entry["name"] for entry in classes]
    if references is KEEP_REFERENCES:
        references = _references_for_classes(_parent_references(parent), manifest.class_names, new_names)
    from edgeadapt.converters.bundle_export import created_by
    from edgeadapt.device.unknown import load_unknown
    from edgeadapt.device.version_builder import VersionPlan, build_version  # noqa: I001

    plan = VersionPlan(head=head, stats=with_ridge_basis(head, stats),  # merged statistics have none yet
                       classes=classes, change=change, references=references,
                       device_examples=_references_for_classes(parent.load_device_examples(), manifest.class_names,
                                                               new_names),
                       unknown=load_unknown(parent), background=parent.load_background())
    built = build_version(manifest, plan, manifest.version + 1, tool=f"edgeadapt {_version()}",
                          created_by=created_by())
    files: dict[str, Any] = {name: parent.path / name for name in built.manifest.files}
    files.update(built.new_files)
    return write_bundle(output, built.manifest, files, overwrite=overwrite)


def _version() -> str:
    from edgeadapt import __version__

    return __version__


def _new_references(parent: Bundle, arrays: list[np.ndarray], first_index: int):
    references = _parent_references(parent)
    if references is None:
        return None
    from edgeadapt.device.reference_embeddings import ReferenceEmbeddings

    per_class = max(1, references.per_class_count())
    embeddings, labels = [references.embeddings], [references.labels]
    for offset, array in enumerate(arrays):
        chosen = array[:per_class].astype(references.embeddings.dtype)
        embeddings.append(chosen)
        labels.append(np.full(chosen.shape[0], first_index + offset, dtype=np.int64))
    return ReferenceEmbeddings(np.concatenate(embeddings), np.concatenate(labels))


def _old_rows_unchanged(before: Head, after: Head) -> bool:
    count = before.num_classes
    same_normalisation = (
        before.l2_normalize == after.l2_normalize
        and before.temperature == after.temperature
        and ((before.feature_mean is None and after.feature_mean is None)
             or (before.feature_mean is not None and after.feature_mean is not None
                 and np.array_equal(before.feature_mean, after.feature_mean)))
    )
    return bool(
        same_normalisation
        and np.array_equal(after.weights[:, :count], before.weights)
        and np.array_equal(after.bias[:count], before.bias)
    )


# ============================================================================= operations
def add_classes(
    bundle: str | Path | Bundle,
    new_data: Any,
    output: str | Path,
    *,
    classes: Sequence[str] | None = None,
    options: AddClassOptions | None = None,
    replay: Any = None,
    resolve: bool = False,
    backend: str = "auto",
    overwrite: bool = False,
) -> IncrementalResult:
    """Add classes to ``bundle`` and write the result as a new version at ``output``.

    ``new_data``: a folder with one sub-folder of images per class, or a mapping
    ``{name: images}`` (image paths, PIL images, a uint8 (N, H, W, C) batch) or
    ``{name: embeddings}`` (float (N, D) computed with this bundle's backbone).
    ``classes``: which classes of ``new_data`` to add (default: all of them).
    ``options``: the head math (method and knobs, :class:`AddClassOptions`); None: the method
    :func:`edgeadapt.device.incremental.choose_method` picks for what the bundle carries (the
    default method with class statistics, else the statistics-free one). A chosen method the
    bundle cannot support is refused before any image is embedded.
    ``replay``: optional examples of the bundle's OLD classes (same forms as ``new_data``).
    They supply class statistics when the bundle has none, act as negatives for the trained
    methods, and give the joint re-fit of ``resolve`` real data.
    ``resolve``: re-fit ALL rows jointly (softmax on ``replay`` + new examples when replay is
    given, else the closed form from the statistics). Upper-bound quality, but old-class
    outputs CHANGE; recorded as such in the manifest.

    Old-class rows are bit-identical to the parent's unless ``resolve``. Raises
    :class:`InputError` (names, examples), :class:`IncompatibleModelError` (missing
    statistics, unsupported head) or :class:`BundleError`; nothing is written on error.

    Args:
        bundle: The parent bundle (path or opened :class:`Bundle`).
        new_data: The new classes' examples (see above).
        output: The directory of the new bundle version.
        classes: The classes of ``new_data`` to add (default: all).
        options: The head math (:class:`AddClassOptions`).
        replay: Optional examples of the old classes.
        resolve: Re-fit all rows jointly (old-class outputs change).
        backend: Interpreter that embeds images: auto, litert, tflite-runtime or onnxruntime.
        overwrite: Replace ``output`` if it exists.

    Returns:
        The new version's path, classes, per-class figures and whether old rows stayed identical.

    Raises:
        InputError: Bad class names or examples.
        IncompatibleModelError: Missing statistics or an unsupported head.
        BundleError: The parent cannot be read or ``output`` exists.
    """
    parent = _open(bundle)
    output = _check_output(output, overwrite, [parent])
    if options is not None and not isinstance(options, AddClassOptions):
        raise InputError(f"options must be an AddClassOptions or None, got {type(options).__name__}")
    manifest = parent.manifest
    old_names = manifest.class_names
    mapping = _as_mapping(new_data, classes, "new data")
    names = [check_class_name(name) for name in mapping]
    if not names:
        raise InputError("no new classes given; name at least one class to add")
    if len(set(names)) != len(names):
        raise InputError(f"duplicate new class names in {names}")
    clashes = [name for name in names if name in old_names]
    if clashes:
        raise InputError(
            f"class(es) {clashes} already exist in {parent.path}; choose other names (to strengthen an existing "
            "class use the device updater's add_examples); nothing was written"
        )
    head = parent.load_head()
    stats = parent.load_class_stats()
    calibration = calibration_embeddings(parent)
    if options is not None and (replay is None or options.method not in STATISTICS_METHODS):
        # replay can supply missing statistics; otherwise the method must fit the bundle as it is
        head_math.choose_method(stats, calibration is not None, options.method)
    if options is not None and options.method == "center_l2" and (head.feature_mean is None or not head.l2_normalize):
        raise IncompatibleModelError(
            "method 'center_l2' needs a head trained on centred, L2-normalised features (feature_mean set and "
            "l2_normalize true), and this head is not; leave the method out for the automatic choice, or use "
            "imprint_calibrated, weight_align or imprint; nothing was written"
        )
    size = head.embedding_size
    embedder = _Embedder(parent, backend)
    given = [embedder(name, mapping[name], size) for name in names]
    arrays = [distinct_examples(array) for array in given]  # the same photo twice is one example
    replay_data = _replay_embeddings(replay, old_names, embedder, size)
    notes: list[str] = []
    duplicates = {name: int(a.shape[0] - b.shape[0]) for name, a, b in zip(names, given, arrays) if a.shape != b.shape}
    if duplicates:
        notes.append(f"identical examples counted once: {duplicates} duplicate(s) ignored")
    if stats is None and replay_data is not None:
        missing = sorted(set(range(len(old_names))) - set(np.unique(replay_data[1]).tolist()))
        if not missing:
            stats = ClassStats.from_embeddings(replay_data[0], replay_data[1], len(old_names))
            notes.append(f"class statistics computed from {replay_data[0].shape[0]} replay examples")
        elif options is not None and options.method in STATISTICS_METHODS:
            raise IncompatibleModelError(
                f"the bundle has no class statistics and the replay lacks the old classes "
                f"{[old_names[index] for index in missing]}; give examples of every old class"
            )
    method = head_math.choose_method(stats, calibration is not None, None if options is None else options.method)
    if options is None:
        options = AddClassOptions(method=method)
        notes.append(f"method {method} chosen automatically for what the bundle carries")

    start = time.perf_counter()
    trained_replay = replay_data if options.method in TRAINED_METHODS else None
    new_head, new_stats = head_math.add_classes(head, stats, arrays, options, replay=trained_replay,
                                                calibration=calibration)
    resolved = None
    if resolve:
        new_head, resolved = _resolve(new_head, new_stats, arrays, replay_data, len(old_names), options)
    seconds = time.perf_counter() - start
    unchanged = _old_rows_unchanged(head, new_head)

    version = manifest.version + 1
    stamp = utc_timestamp()
    class_entries = [dict(entry) for entry in manifest.data["classes"]]
    added = []
    for offset, (name, array) in enumerate(zip(names, arrays)):
        index = len(old_names) + offset
        class_entries.append({"name": name, "index": index, "origin": "host-added", "added_at": stamp,
                              "examples": int(array.shape[0]), "added_in_version": version})
        added.append({"name": name, "index": index, "examples": int(array.shape[0])})
    change = {
        "action": ChangeAction.HOST_ADD_CLASSES, "classes": names, "examples": int(sum(array.shape[0] for array in arrays)),
        "method": options.method, "old_rows_unchanged": unchanged, "resolved": resolved,
    }
    references = _new_references(parent, arrays, len(old_names))
    write_version(parent, new_head, new_stats, class_entries, output, change, references=references,
                  overwrite=overwrite)
    return IncrementalResult(output=output, version=version, parent_version=manifest.version,
                             action="add-classes", method=options.method, added=added, old_rows_unchanged=unchanged,
                             resolved=resolved, seconds=seconds, notes=notes)


def calibration_embeddings(parent: Bundle) -> np.ndarray | None:
    """The parent's background and reference embeddings, float32 (N, D), for methods that calibrate with them."""
    parts = []
    loader = getattr(parent, "load_background", None)
    background = None if loader is None else loader()
    if background is not None and len(background):
        parts.append(np.asarray(background, dtype=np.float32))
    references = _parent_references(parent)
    if references is not None and len(references):
        parts.append(references.as_float32())
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _resolve(
    head: Head, stats: ClassStats | None, arrays: list[np.ndarray], replay: tuple[np.ndarray, np.ndarray] | None,
    old_count: int, options: AddClassOptions,
) -> tuple[Head, str]:
    """Joint re-fit of every column: softmax on replay + new examples, else the closed form from statistics."""
    if replay is not None and set(np.unique(replay[1]).tolist()) == set(range(old_count)):
        from edgeadapt.head_training import HeadTrainingOptions, train_head

        embeddings = np.concatenate([replay[0]] + arrays)
        labels = np.concatenate([replay[1]] + [np.full(array.shape[0], old_count + offset, np.int64)
                                               for offset, array in enumerate(arrays)])
        trained = train_head(head.features(embeddings), labels, head.num_classes,
                             HeadTrainingOptions(temperature=head.temperature), initial=_plain(head))
        return head.with_columns(trained.weights, trained.bias), "replay"
    if stats is None:
        raise IncompatibleModelError(
            "re-solving all rows needs class statistics or replay examples of every old class; the bundle has no "
            "statistics: pass replay (--replay DIR)"
        )
    return resolve_all(head, stats, options), "statistics"


def _plain(head: Head) -> Head:
    """The head's columns as a head on already-normalised features (same temperature)."""
    return Head(weights=head.weights, bias=head.bias, temperature=head.temperature)


def resolve(
    bundle: str | Path | Bundle,
    output: str | Path,
    *,
    replay: Any = None,
    options: AddClassOptions = AddClassOptions(),
    backend: str = "auto",
    overwrite: bool = False,
) -> IncrementalResult:
    """Re-fit ALL rows of ``bundle``'s head (joint, upper-bound quality) into a new version.

    CHANGES OLD-CLASS OUTPUTS. With ``replay`` (examples of every class) the head is
    re-trained by softmax on them; otherwise solved in closed form from the statistics.
    """
    parent = _open(bundle)
    output = _check_output(output, overwrite, [parent])
    head = parent.load_head()
    stats = parent.load_class_stats()
    names = parent.manifest.class_names
    embedder = _Embedder(parent, backend)
    replay_data = _replay_embeddings(replay, names, embedder, head.embedding_size)
    start = time.perf_counter()
    new_head, resolved = _resolve(head, stats, [], replay_data, len(names), options)
    seconds = time.perf_counter() - start
    change = {"action": ChangeAction.HOST_RESOLVE, "classes": [], "resolved": resolved, "old_rows_unchanged": False}
    write_version(parent, new_head, stats, [dict(entry) for entry in parent.manifest.data["classes"]], output,
                  change, overwrite=overwrite)
    return IncrementalResult(output=output, version=parent.manifest.version + 1,
                             parent_version=parent.manifest.version, action="resolve", method="resolve",
                             old_rows_unchanged=False, resolved=resolved, seconds=seconds)


def merge_heads(
    a: str | Path | Bundle,
    b: str | Path | Bundle | NamedHead,
    output: str | Path,
    *,
    options: AddClassOptions = AddClassOptions(),
    overwrite: bool = False,
) -> IncrementalResult:
    """Append the classes of head ``b`` to bundle ``a``; write a new version of ``a`` at ``output``.

    ``b`` is a bundle (or a :class:`NamedHead`) whose head was trained on embeddings of the
    SAME backbone: different backbone fingerprints are refused. With the default method
    b's columns are recomputed from its class statistics and calibrated against a's
    columns (see :func:`edgeadapt.device.incremental.merge_heads`); a's rows stay
    bit-identical. Class names must not clash.

    Args:
        a: The base bundle.
        b: The bundle (or named head) whose classes are appended.
        output: The directory of the new version of ``a``.
        options: The head math (:class:`AddClassOptions`).
        overwrite: Replace ``output`` if it exists.

    Returns:
        The new version's path, classes and per-class figures.

    Raises:
        IncompatibleModelError: When the backbones differ or statistics are missing.
        InputError: When class names clash.
        BundleError: When a bundle cannot be read or ``output`` exists.
    """
    parent = _open(a)
    output = _check_output(output, overwrite, [parent])
    if not isinstance(options, AddClassOptions):
        raise InputError(f"options must be an AddClassOptions, got {type(options).__name__}")
    if isinstance(b, NamedHead):
        other_head, other_stats, other_names = b.head, b.stats, [check_class_name(name) for name in b.class_names]
        other_fingerprint, source = b.backbone_fingerprint, b.source
        other_infos: list[dict] = [{} for _ in other_names]
        if len(other_names) != other_head.num_classes:
            raise InputError(f"{len(other_names)} class names for a head with {other_head.num_classes} classes")
    else:
        other = _open(b)
        if other.path.resolve() == parent.path.resolve():
            raise InputError("cannot merge a bundle with itself")
        other_head, other_stats = other.load_head(), other.load_class_stats()
        other_names = other.manifest.class_names
        other_fingerprint = other.manifest.backbone_fingerprint
        source = f"{other.manifest.data.get('name', other.path.name)} v{other.manifest.version} ({other.path.name})"
        other_infos = [dict(entry) for entry in other.manifest.data["classes"]]
    if other_fingerprint is not None and other_fingerprint != parent.manifest.backbone_fingerprint:
        raise IncompatibleModelError(
            f"head b is bound to backbone {other_fingerprint[:23]}... but bundle a's backbone is "
            f"{parent.manifest.backbone_fingerprint[:23]}...: heads from different backbones cannot be merged "
            "(their embeddings mean different things); train b on embeddings of a's backbone"
        )
    if len(set(other_names)) != len(other_names):
        raise InputError(f"head b has duplicate class names {other_names}")
    old_names = parent.manifest.class_names
    clashes = [name for name in other_names if name in old_names]
    if clashes:
        raise InputError(f"class(es) {clashes} exist in both heads; rename them in one head before merging")
    head, stats = parent.load_head(), parent.load_class_stats()
    start = time.perf_counter()
    new_head, new_stats = head_math.merge_heads(head, stats, other_head, other_stats, options)
    seconds = time.perf_counter() - start
    unchanged = _old_rows_unchanged(head, new_head)
    version = parent.manifest.version + 1
    stamp = utc_timestamp()
    class_entries = [dict(entry) for entry in parent.manifest.data["classes"]]
    added = []
    for offset, name in enumerate(other_names):
        index = len(old_names) + offset
        examples = (int(other_stats.counts[offset]) if other_stats is not None
                    else other_infos[offset].get("examples"))
        entry = {"name": name, "index": index, "origin": "host-added", "added_at": stamp,
                 "added_in_version": version, "source": f"merged from {source}"}
        if examples is not None:
            entry["examples"] = int(examples)
        class_entries.append(entry)
        added.append({"name": name, "index": index, "examples": int(examples) if examples is not None else 0})
    change = {"action": ChangeAction.HOST_MERGE_HEADS, "classes": list(other_names), "source": source,
              "method": options.method, "old_rows_unchanged": unchanged}
    notes = [] if new_stats is not None else [
        "the merged head has no class statistics (one side had none): later statistics-based updates will ask for "
        "replay examples"]
    write_version(parent, new_head, new_stats, class_entries, output, change, overwrite=overwrite)
    return IncrementalResult(output=output, version=version, parent_version=parent.manifest.version,
                             action="merge-heads", method=options.method, added=added, old_rows_unchanged=unchanged,
                             seconds=seconds, notes=notes)
