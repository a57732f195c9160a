"""Add classes to a bundle and merge heads on the host, as a NEW bundle version.

    >>> from edgeadapt.bundles.incremental import add_classes
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
from typing import Any, Sequence

import numpy as np

from edgeadapt.device.bundle import Bundle
from edgeadapt.device.errors import BundleError, IncompatibleModelError, InputError
from edgeadapt.device.head import ClassStats, Head
from edgeadapt.device.incremental import (
    STATISTICS_METHODS,
    TRAINED_METHODS,
    AddClassOptions,
    resolve_all,
)
from edgeadapt.device import incremental as head_math
from edgeadapt.device.manifest import utc_timestamp
from edgeadapt.device.naming import check_class_name
from edgeadapt.device.update_inputs import distinct_examples
from edgeadapt.device.version_builder import ChangeAction
from edgeadapt.bundles.incremental_inputs import BundleEmbedder, examples_mapping, replay_embeddings
from edgeadapt.bundles.version_writing import calibration_embeddings, new_references, write_version

logger = logging.getLogger(__name__)



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
    old_names = parent.manifest.class_names
    mapping = examples_mapping(new_data, classes, "new data")
    names = _new_class_names(mapping, old_names, parent.path)
    head, stats = parent.load_head(), parent.load_class_stats()
    calibration = calibration_embeddings(parent)
    _check_method_fits(options, replay is not None, head, stats, calibration)
    embedder = BundleEmbedder(parent, backend)
    notes: list[str] = []
    arrays = _distinct_examples(embedder, names, mapping, head.embedding_size, notes)
    replay_data = replay_embeddings(replay, old_names, embedder, head.embedding_size)
    stats = _statistics_from_replay(stats, replay_data, old_names, options, notes)
    method = head_math.choose_method(stats, calibration is not None, None if options is None else options.method)
    if options is None:
        options = AddClassOptions(method=method)
        notes.append(f"method {method} chosen automatically for what the bundle carries")
    change = _add_to_head(head, stats, arrays, replay_data, calibration, options, resolve)
    return _write_added_classes(parent, output, names, arrays, change, options, notes, overwrite)


def _new_class_names(mapping: dict[str, Any], old_names: list[str], parent_path: Path) -> list[str]:
    """The checked names of the classes to add: valid, at least one, distinct, none already in the bundle."""
    names = [check_class_name(name) for name in mapping]
    if not names:
        raise InputError("no new classes given; name at least one class to add")
    if len(set(names)) != len(names):
        raise InputError(f"duplicate new class names in {names}")
    clashes = [name for name in names if name in old_names]
    if clashes:
        raise InputError(
            f"class(es) {clashes} already exist in {parent_path}; choose other names (to strengthen an existing "
            "class use the device updater's add_examples); nothing was written"
        )
    return names


def _check_method_fits(options: AddClassOptions | None, has_replay: bool, head: Head, stats: ClassStats | None,
                       calibration: np.ndarray | None) -> None:
    """Refuse a chosen method the bundle cannot support, before any image is embedded."""
    if options is not None and (not has_replay or options.method not in STATISTICS_METHODS):
        # replay can supply missing statistics; otherwise the method must fit the bundle as it is
        head_math.choose_method(stats, calibration is not None, options.method)
    if options is not None and options.method == "center_l2" and (head.feature_mean is None or not head.l2_normalize):
        raise IncompatibleModelError(
            "method 'center_l2' needs a head trained on centred, L2-normalised features (feature_mean set and "
            "l2_normalize true), and this head is not; leave the method out for the automatic choice, or use "
            "imprint_calibrated, weight_align or imprint; nothing was written"
        )


def _distinct_examples(embedder: BundleEmbedder, names: list[str], mapping: dict[str, Any], size: int,
                       notes: list[str]) -> list[np.ndarray]:
    """Each new class's embeddings with identical examples counted once (noted in ``notes``)."""
    given = [embedder(name, mapping[name], size) for name in names]
    arrays = [distinct_examples(array) for array in given]  # the same photo twice is one example
    duplicates = {name: int(a.shape[0] - b.shape[0]) for name, a, b in zip(names, given, arrays) if a.shape != b.shape}
    if duplicates:
        notes.append(f"identical examples counted once: {duplicates} duplicate(s) ignored")
    return arrays


def _statistics_from_replay(stats: ClassStats | None, replay_data: tuple[np.ndarray, np.ndarray] | None,
                            old_names: list[str], options: AddClassOptions | None,
                            notes: list[str]) -> ClassStats | None:
    """The bundle's class statistics, or, when it has none, those of a replay covering every old class."""
    if stats is None and replay_data is not None:
        missing = sorted(set(range(len(old_names))) - set(np.unique(replay_data[1]).tolist()))
        if not missing:
            notes.append(f"class statistics computed from {replay_data[0].shape[0]} replay examples")
            return ClassStats.from_embeddings(replay_data[0], replay_data[1], len(old_names))
        if options is not None and options.method in STATISTICS_METHODS:
            raise IncompatibleModelError(
                f"the bundle has no class statistics and the replay lacks the old classes "
                f"{[old_names[index] for index in missing]}; give examples of every old class"
            )
    return stats


@dataclass
class _HeadChange:
    """A new head and its statistics, how it was re-solved (None: append-only) and the head math's time."""

    head: Head
    stats: ClassStats | None
    resolved: str | None
    seconds: float
    old_rows_unchanged: bool


def _add_to_head(head: Head, stats: ClassStats | None, arrays: list[np.ndarray],
                 replay_data: tuple[np.ndarray, np.ndarray] | None, calibration: np.ndarray | None,
                 options: AddClassOptions, resolve: bool) -> _HeadChange:
    """The head math of an addition: append the new columns, then re-fit every column when ``resolve``."""
    start = time.perf_counter()
    trained_replay = replay_data if options.method in TRAINED_METHODS else None
    new_head, new_stats = head_math.add_classes(head, stats, arrays, options, replay=trained_replay,
                                                calibration=calibration)
    resolved = None
    if resolve:
        new_head, resolved = _resolve(new_head, new_stats, arrays, replay_data, head.num_classes, options)
    seconds = time.perf_counter() - start
    return _HeadChange(new_head, new_stats, resolved, seconds, _old_rows_unchanged(head, new_head))


def _write_added_classes(parent: Bundle, output: Path, names: list[str], arrays: list[np.ndarray],
                         change: _HeadChange, options: AddClassOptions, notes: list[str],
                         overwrite: bool) -> IncrementalResult:
    """Write the added classes' version of ``parent`` (class entries with provenance, change record, references)."""
    manifest = parent.manifest
    old_count = len(manifest.class_names)
    version = manifest.version + 1
    stamp = utc_timestamp()
    class_entries = [dict(entry) for entry in manifest.data["classes"]]
    added = []
    for offset, (name, array) in enumerate(zip(names, arrays)):
        index = old_count + offset
        class_entries.append({"name": name, "index": index, "origin": "host-added", "added_at": stamp,
                              "examples": int(array.shape[0]), "added_in_version": version})
        added.append({"name": name, "index": index, "examples": int(array.shape[0])})
    record = {
        "action": ChangeAction.HOST_ADD_CLASSES, "classes": names, "examples": int(sum(array.shape[0] for array in arrays)),
        "method": options.method, "old_rows_unchanged": change.old_rows_unchanged, "resolved": change.resolved,
    }
    references = new_references(parent, arrays, old_count)
    write_version(parent, change.head, change.stats, class_entries, output, record, references=references,
                  overwrite=overwrite)
    return IncrementalResult(output=output, version=version, parent_version=manifest.version,
                             action="add-classes", method=options.method, added=added,
                             old_rows_unchanged=change.old_rows_unchanged, resolved=change.resolved,
                             seconds=change.seconds, notes=notes)


def _resolve(
    head: Head, stats: ClassStats | None, arrays: list[np.ndarray], replay: tuple[np.ndarray, np.ndarray] | None,
    old_count: int, options: AddClassOptions,
) -> tuple[Head, str]:
    """Joint re-fit of every column: softmax on replay + new examples, else the closed form from statistics."""
    if replay is not None and set(np.unique(replay[1]).tolist()) == set(range(old_count)):
        from edgeadapt.training.head_training import HeadTrainingOptions, train_head

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
    embedder = BundleEmbedder(parent, backend)
    replay_data = replay_embeddings(replay, names, embedder, head.embedding_size)
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
    other = _head_to_merge(b, parent)
    old_names = parent.manifest.class_names
    head, stats = parent.load_head(), parent.load_class_stats()
    start = time.perf_counter()
    new_head, new_stats = head_math.merge_heads(head, stats, other.head, other.stats, options)
    seconds = time.perf_counter() - start
    unchanged = _old_rows_unchanged(head, new_head)
    version = parent.manifest.version + 1
    stamp = utc_timestamp()
    class_entries = [dict(entry) for entry in parent.manifest.data["classes"]]
    added = []
    for offset, name in enumerate(other.class_names):
        index = len(old_names) + offset
        examples = (int(other.stats.counts[offset]) if other.stats is not None
                    else other.infos[offset].get("examples"))
        entry = {"name": name, "index": index, "origin": "host-added", "added_at": stamp,
                 "added_in_version": version, "source": f"merged from {other.source}"}
        if examples is not None:
            entry["examples"] = int(examples)
        class_entries.append(entry)
        added.append({"name": name, "index": index, "examples": int(examples) if examples is not None else 0})
    change = {"action": ChangeAction.HOST_MERGE_HEADS, "classes": list(other.class_names), "source": other.source,
              "method": options.method, "old_rows_unchanged": unchanged}
    notes = [] if new_stats is not None else [
        "the merged head has no class statistics (one side had none): later statistics-based updates will ask for "
        "replay examples"]
    write_version(parent, new_head, new_stats, class_entries, output, change, overwrite=overwrite)
    return IncrementalResult(output=output, version=version, parent_version=parent.manifest.version,
                             action="merge-heads", method=options.method, added=added, old_rows_unchanged=unchanged,
                             seconds=seconds, notes=notes)


@dataclass
class _HeadToMerge:
    """Head b of a merge: its head, statistics, checked class names, per-class manifest entries, source text."""

    head: Head
    stats: ClassStats | None
    class_names: list[str]
    infos: list[dict]
    source: str


def _head_to_merge(b: str | Path | Bundle | NamedHead, parent: Bundle) -> _HeadToMerge:
    """Read head b and check it can join ``parent``: same backbone, distinct names, none in ``parent``."""
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
    clashes = [name for name in other_names if name in parent.manifest.class_names]
    if clashes:
        raise InputError(f"class(es) {clashes} exist in both heads; rename them in one head before merging")
    return _HeadToMerge(other_head, other_stats, list(other_names), other_infos, source)
