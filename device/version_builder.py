"""One builder for a new bundle version: head section, ``heads/vN/`` file table, provenance, change record.

Every writer of a new head version hands :func:`build_version` a :class:`VersionPlan` (the new
head, statistics, references, device examples, unknown rule, background, classes and the
change) and gets back the new manifest and the files to write:

* the device updater (:class:`edgeadapt.device.updater.HeadUpdater`), which commits them
  in place through :meth:`edgeadapt.device.versions.VersionStore.commit`;
* host ``add-classes``/``merge-heads``/``resolve`` (``edgeadapt.bundles.version_writing.write_version``)
  and ``merge-deltas`` (``edgeadapt.bundles.deltas``), which write a new bundle directory with
  :func:`edgeadapt.device.bundle.write_bundle`.

So the head-section keys, the file paths (``heads/v{N}/<name>.npy``), the timestamps
(``committed_at``), the provenance (``parent_version``; ``derived_from`` is set by the signing
code and dropped by host writers), a carried ``.eah`` head file and the change action
(:class:`ChangeAction`) are decided here once.

Given the previous version's arrays (``previous``), the builder shares every file whose
array did not change and, when the update only appends classes, replaces a few columns
and adds examples, writes a small *part* instead of new base files
(:mod:`edgeadapt.device.head_parts`); once the parts grow past a fraction of the base
files (or on request) it writes full new base files: a compaction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeadapt.device.head_section import head_file_names, head_payload
from edgeadapt.device.reference_embeddings import ReferenceEmbeddings
from edgeadapt.device.change_actions import ChangeAction  # noqa: F401 (re-exported)
from edgeadapt.device.head import ClassStats, Head
from edgeadapt.device.head_file import carried_head_file
from edgeadapt.device.head_parts import MAX_PARTS, base_bytes, part_bytes
from edgeadapt.device.manifest import Manifest, utc_timestamp
from edgeadapt.device.manifest_tables import SEGMENT_NAME, choose_layout

HEADS_DIR = "heads"
DEVICE_EXAMPLE_FILES = ("device_embeddings.npy", "device_labels.npy")
UNKNOWN_CENTER_FILE = "unknown_center.npy"
#: Head-section keys this builder owns; other keys of the previous version are carried unchanged.
MANAGED_KEYS = frozenset({
    "version", "format", "weights", "bias", "feature_mean", "l2_normalize", "temperature", "backbone_fingerprint",
    "statistics", "references", "device_examples", "unknown", "background", "head_file", "parts",
})
#: Write full base files (compact) once the parts exceed this fraction of the base files' bytes.
DEFAULT_COMPACT_FRACTION = 0.25
#: ... or once a version has this many parts.
DEFAULT_COMPACT_PARTS = 256
#: A part may replace at most this many existing columns (more: full base files).
MAX_REPLACED_COLUMNS = 64


@dataclass
class VersionPlan:
    """What a new version holds. ``added_examples``: (embeddings, class indices) learned in this
    version whose outer products were added to the Gram matrix and which were appended to the
    device examples (lets the builder write them as a part instead of new base files)."""

    head: Head
    stats: ClassStats | None
    classes: list[dict]
    change: dict
    references: ReferenceEmbeddings | None = None
    device_examples: ReferenceEmbeddings | None = None
    unknown: Any = None
    background: np.ndarray | None = None
    added_examples: tuple[np.ndarray, np.ndarray] | None = None


@dataclass
class BuiltVersion:
    """The new manifest (``files`` lists the shared files; entries of ``new_files`` are added when
    written), the files to write, and the previous version's files it shares."""

    manifest: Manifest
    new_files: dict[str, Any]
    shared: list[str] = field(default_factory=list)
    compacted: bool = False


def _referenced(value: Any, table: dict) -> list[str]:
    if isinstance(value, str):
        return [value] if value in table else []
    if isinstance(value, dict):
        return [name for item in value.values() for name in _referenced(item, table)]
    if isinstance(value, list):
        return [name for item in value for name in _referenced(item, table)]
    return []


def _replace_paths(section: Any, mapping: dict[str, str]) -> Any:
    if isinstance(section, str):
        return mapping.get(section, section)
    if isinstance(section, dict):
        return {key: _replace_paths(value, mapping) for key, value in section.items()}
    if isinstance(section, list):
        return [_replace_paths(value, mapping) for value in section]
    return section


def _previous_arrays(previous: Any) -> dict[str, Any]:
    """The arrays of the previous version by file name (for sharing files whose array did not change)."""
    arrays: dict[str, Any] = {"weights.npy": previous.head.weights, "bias.npy": previous.head.bias,
                              "feature_mean.npy": previous.head.feature_mean}
    if previous.stats is not None:
        arrays.update({"class_sums.npy": previous.stats.sums, "class_counts.npy": previous.stats.counts,
                       "gram.npy": previous.stats.gram})
        basis = previous.stats.ridge_basis
        if basis is not None and hasattr(basis, "arrays"):
            arrays.update({f"{name}.npy": array for name, array in basis.arrays().items()})
    if previous.references is not None:
        arrays.update({"reference_embeddings.npy": previous.references.embeddings,
                       "reference_labels.npy": previous.references.labels})
    if previous.device_examples is not None:
        arrays.update({DEVICE_EXAMPLE_FILES[0]: previous.device_examples.embeddings,
                       DEVICE_EXAMPLE_FILES[1]: previous.device_examples.labels})
    if previous.unknown is not None:
        arrays[UNKNOWN_CENTER_FILE] = previous.unknown.center
    if getattr(previous, "background", None) is not None:
        arrays["background.npy"] = previous.background
    return {name: array for name, array in arrays.items() if array is not None}


#: Files that parts extend: with parts in the previous version, their arrays are never the files'.
_BASE_FILES = ("weights.npy", "bias.npy", "class_sums.npy", "class_counts.npy", "gram.npy", *DEVICE_EXAMPLE_FILES)


def build_version(parent: Manifest, plan: VersionPlan, version: int, *, tool: str, previous: Any = None,
                  compact: bool = False, compact_fraction: float = DEFAULT_COMPACT_FRACTION,
                  created_by: dict | None = None) -> BuiltVersion:
    """The manifest of version ``version`` after ``parent`` and the files it needs written.

    Args:
        parent: the manifest of the version this one replaces.
        plan: what the new version holds.
        version: the new version number (new files go to ``heads/v{version}/``).
        tool: who wrote it (``change.tool``), e.g. ``"edgeadapt-device 0.1.0"``.
        previous: the parent's arrays (an object with ``head``, ``stats``, ``references``,
            ``device_examples``, ``unknown``, ``background``, e.g. the updater's ``HeadState``):
            files whose arrays are the very same objects are shared, and appended classes become
            a part. None (host writers): every head file is written.
        compact: write full base files even when a part would do, and a full manifest (no table segments).
        compact_fraction: compact once the parts exceed this fraction of the base files.
        created_by: host writers: who built the version (merged into ``created_by``); the version
            then also gets ``created_at`` and loses the parent's ``derived_from`` (a new host
            version is unsigned until ``edgeadapt sign``; a device version keeps it, see
            :mod:`edgeadapt.device.signing`).

    Returns:
        The :class:`BuiltVersion`.
    """
    old_section = parent.data["head"]
    section, arrays, carried_files = _head_section(parent, plan, version)
    old_files = parent.files
    shared: list[str] = []
    for key, value in old_section.items():  # keep fields (and their files) this builder does not manage
        if key not in MANAGED_KEYS and key not in section:
            section[key] = value
            shared.extend(_referenced(value, old_files))
    renames: dict[str, str] = {}
    compacted = True
    if previous is not None:
        part = None if compact else _part(parent, plan, previous, version, compact_fraction)
        if part is not None:
            compacted = False
            shared.extend(_use_part(old_section, section, arrays, renames, part, version, old_files))
        _share_unchanged(old_section, arrays, renames, previous, old_files)
    else:
        section.pop("parts", None)
    shared.extend(renames.values())
    table = {name: dict(entry) for name, entry in old_files.items() if not name.startswith(f"{HEADS_DIR}/")}
    for name in shared:
        table[name] = dict(old_files[name])
    section = _replace_paths(section, renames)
    section["version"] = version
    new_files: dict[str, Any] = dict(arrays)
    new_files.update(carried_files)
    manifest = _provenance(parent, plan, version, tool, created_by)
    manifest.data["head"] = section
    manifest.data["files"] = table
    manifest.tables = None
    if previous is not None and created_by is None and not compact:  # a device commit: shared table segments
        segment_path = f"{HEADS_DIR}/v{version}/{SEGMENT_NAME}"
        segment = choose_layout(parent, manifest, segment_path)
        if segment is not None:
            new_files[segment_path] = segment
    return BuiltVersion(manifest, new_files, sorted(set(shared)), compacted)


def _head_section(parent: Manifest, plan: VersionPlan,
                  version: int) -> tuple[dict, dict[str, Any], dict[str, bytes]]:
    """The head section of the new version with every file at its ``heads/v{version}/`` path."""
    old_section = parent.data["head"]
    section, arrays = head_payload(plan.head, plan.stats, version, parent.backbone_fingerprint, plan.references,
                                   background=plan.background)
    base = f"{HEADS_DIR}/v{version}"
    if plan.device_examples is not None and len(plan.device_examples):
        embeddings_path, labels_path = (f"{base}/{name}" for name in DEVICE_EXAMPLE_FILES)
        arrays[embeddings_path] = np.asarray(plan.device_examples.embeddings, dtype=np.float32)
        arrays[labels_path] = plan.device_examples.labels
        section["device_examples"] = {"embeddings": embeddings_path, "labels": labels_path,
                                      "count": len(plan.device_examples)}
    if plan.unknown is not None:
        center_path = f"{base}/{UNKNOWN_CENTER_FILE}"
        arrays[center_path] = plan.unknown.center
        before = old_section.get("unknown") or {}
        calibrated_in = version if plan.change.get("action") == ChangeAction.CALIBRATE_UNKNOWN \
            else before.get("calibrated_in_version", version)
        section["unknown"] = plan.unknown.section(center_path, calibrated_in)
    names = [entry["name"] for entry in plan.classes]
    carried, carried_files = carried_head_file(plan.head, names, version, old_section.get("head_file"))
    if carried is not None:
        section["head_file"] = carried
    return section, arrays, carried_files


def _use_part(old_section: dict, section: dict, arrays: dict, renames: dict, part: tuple, version: int,
              old_files: dict) -> list[str]:
    """Point ``section`` at the previous base files plus its parts and ``part``; returns the shared part files."""
    entry, part_files = part
    base = f"{HEADS_DIR}/v{version}"
    new_paths = {**head_file_names(version), "device_examples": f"{base}/{DEVICE_EXAMPLE_FILES[0]}",
                 "device_example_labels": f"{base}/{DEVICE_EXAMPLE_FILES[1]}"}
    old_paths = _base_paths(old_section)
    for key, path in old_paths.items():
        renames[new_paths[key]] = path
        arrays.pop(new_paths[key], None)
    if "device_examples" not in old_paths and section.pop("device_examples", None) is not None:
        arrays.pop(new_paths["device_examples"], None)  # every device example lives in the parts
        arrays.pop(new_paths["device_example_labels"], None)
    section["parts"] = list(old_section.get("parts") or []) + ([entry] if entry else [])
    if not section["parts"]:
        del section["parts"]
    arrays.update(part_files)
    return _referenced(old_section.get("parts") or [], old_files)


def _share_unchanged(old_section: dict, arrays: dict, renames: dict, previous: Any, old_files: dict) -> None:
    """Share (rename to the previous path, drop from ``arrays``) every file whose array is the previous one."""
    with_parts = bool(old_section.get("parts"))
    old_by_name = {Path(name).name: name for name in old_files if name.startswith(f"{HEADS_DIR}/")}
    unchanged = _previous_arrays(previous)
    for relative_path in list(arrays):
        name = Path(relative_path).name
        if with_parts and name in _BASE_FILES:
            continue  # the previous arrays are assembled from base and parts, not the base file
        old_path = old_by_name.get(name)
        if old_path is not None and unchanged.get(name) is arrays[relative_path]:
            renames[relative_path] = old_path
            del arrays[relative_path]


def _provenance(parent: Manifest, plan: VersionPlan, version: int, tool: str, created_by: dict | None) -> Manifest:
    """A copy of ``parent`` with the new version's number, timestamps, classes and change record."""
    for entry in plan.classes:
        if entry.get("added_in_version", 0) is None:
            entry["added_in_version"] = version
    for position, entry in enumerate(plan.classes):
        entry["index"] = position
    manifest = parent.copy()
    data = manifest.data
    data["version"] = version
    data["parent_version"] = parent.version
    data["committed_at"] = utc_timestamp()
    if created_by is not None:
        data["created_at"] = data["committed_at"]
        data["created_by"] = {**(parent.data.get("created_by") or {}), **created_by}
        data.pop("derived_from", None)
    data["classes"] = [{key: value for key, value in entry.items() if value is not None} for entry in plan.classes]
    change = {key: (value.value if isinstance(value, ChangeAction) else value) for key, value in plan.change.items()}
    data["change"] = {**change, "tool": tool}
    return manifest


def _base_paths(section: dict) -> dict[str, str]:
    """The base files of a section by key (``head_file_names`` keys; device examples by file stem)."""
    paths = {"weights": section.get("weights"), "bias": section.get("bias")}
    statistics = section.get("statistics") or {}
    for key in ("class_sums", "class_counts", "gram"):
        paths[key] = statistics.get(key)
    examples = section.get("device_examples") or {}
    paths["device_examples"] = examples.get("embeddings")
    paths["device_example_labels"] = examples.get("labels")
    return {key: path for key, path in paths.items() if path}


def _part(parent: Manifest, plan: VersionPlan, previous: Any, version: int,
          compact_fraction: float) -> tuple[dict | None, dict[str, np.ndarray]] | None:
    """The part that turns ``previous`` into ``plan`` (None: write full base files instead)."""
    old_head, new_head = previous.head, plan.head
    if old_head.feature_mean is not new_head.feature_mean and not (
            old_head.feature_mean is not None and new_head.feature_mean is not None
            and np.array_equal(old_head.feature_mean, new_head.feature_mean)):
        return None
    old_count, new_count = old_head.num_classes, new_head.num_classes
    if new_count < old_count or old_head.embedding_size != new_head.embedding_size \
            or old_head.l2_normalize != new_head.l2_normalize or old_head.temperature != new_head.temperature:
        return None
    section = parent.data["head"]
    if (section.get("statistics") is None) != (plan.stats is None) or (previous.stats is None) != (plan.stats is None):
        return None
    if plan.stats is not None and plan.stats.num_classes != new_count:
        return None
    if plan.stats is not None and (previous.stats.gram is None) != (plan.stats.gram is None):
        return None
    added = plan.added_examples
    rows = 0 if added is None else int(added[0].shape[0])
    old_examples = previous.device_examples
    if added is None:
        if plan.device_examples is not old_examples:
            return None
        if plan.stats is not None and plan.stats.gram is not previous.stats.gram:
            return None
    else:
        before = 0 if old_examples is None else len(old_examples)
        if plan.device_examples is None or len(plan.device_examples) != before + rows:
            return None
    if new_head.weights is old_head.weights and new_head.bias is old_head.bias:
        changed = np.zeros(0, np.int64)
    else:
        if plan.change.get("old_rows_unchanged") is True:  # the updater compared the old columns already
            differs = np.zeros(old_count, bool)
        else:
            differs = np.any(new_head.weights[:, :old_count] != old_head.weights, axis=0)
            differs |= new_head.bias[:old_count] != old_head.bias
        if plan.stats is not None and plan.stats.sums is not previous.stats.sums:
            differs |= np.any(plan.stats.sums[:old_count] != previous.stats.sums, axis=1)
            differs |= plan.stats.counts[:old_count] != previous.stats.counts
        changed = np.flatnonzero(differs)
    if changed.size > MAX_REPLACED_COLUMNS:
        return None
    indices = np.concatenate([changed, np.arange(old_count, new_count)]).astype(np.int64)
    if not indices.size and not rows:
        return None, {}  # nothing extends the base: share the previous version's base and parts
    parts = section.get("parts") or []
    if len(parts) + 1 > min(MAX_PARTS, DEFAULT_COMPACT_PARTS):
        return None
    base = f"{HEADS_DIR}/v{version}"
    files: dict[str, np.ndarray] = {f"{base}/part_indices.npy": indices,
                                    f"{base}/part_weights.npy": np.ascontiguousarray(new_head.weights[:, indices]),
                                    f"{base}/part_bias.npy": np.ascontiguousarray(new_head.bias[indices])}
    if plan.stats is not None:
        files[f"{base}/part_class_sums.npy"] = np.ascontiguousarray(plan.stats.sums[indices])
        files[f"{base}/part_class_counts.npy"] = np.ascontiguousarray(plan.stats.counts[indices])
    if rows:
        files[f"{base}/part_examples.npy"] = np.ascontiguousarray(added[0], dtype=np.float32)
        files[f"{base}/part_labels.npy"] = np.ascontiguousarray(added[1], dtype=np.int64)
    size = sum(int(array.nbytes) + 128 for array in files.values())
    if part_bytes(section, parent.files) + size > compact_fraction * max(base_bytes(section, parent.files), 1):
        return None
    entry: dict[str, Any] = {"version": version, "columns": int(indices.size), "added": int(new_count - old_count),
                             "rows": rows}
    for path in files:
        entry[Path(path).stem.removeprefix("part_")] = path
    return entry, files
