"""The manifest's large tables kept in shared segment files, so that a commit writes only what it changes.

A manifest lists every class (``classes``), every file with its sha256 (``files``) and, for a
head with parts, every part (``head.parts``). At 1000 classes that is over 100 KB, and a device
commit rewrites ``manifest.json``. A device-committed manifest may therefore keep these three
tables in *segments*: immutable JSON files under ``heads/vN/`` that earlier commits wrote, each
named in the manifest with its sha256 and size. The manifest itself then holds only what
changed since the segments (its *delta*)::

    "tables": {
      "segments": [{"file": "heads/v2/tables.json", "sha256": "...", "size": 118503}, ...],
      "classes": [{"name": "mug", "index": 1000, ...}],       entries replaced (index < count) or appended
      "files": {"heads/v9/part_weights.npy": {"sha256": "...", "size": 5248}, ...},   added or replaced
      "removed": ["heads/v8/unknown_center.npy"],             files no longer listed
      "head_parts": [{...}]                                  appended to head.parts
    }

and no top-level ``classes`` or ``files`` and no ``head.parts``. A segment holds the same four
keys. Reading (:func:`expand`): start from empty tables, apply each segment in order, then the
manifest's own delta; add each segment file to ``files``. The result is the ordinary manifest
(what :class:`~edgeadapt.device.manifest.Manifest` holds in memory, what every other reader sees).

Writing (:func:`split`, :func:`choose_layout`): a device commit keeps its parent's segments and
writes the delta against them; once that delta passes :data:`ROLL_BYTES` the next commit writes
the parent's delta as a new segment (so every commit writes a bounded number of bytes), and
once there are :data:`REBASE_SEGMENTS` segments it writes the parent's whole tables as one
segment. A change the delta cannot express (a class removed, head parts folded by a
compaction) is written as an ordinary full manifest. Host writers always write full manifests.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable

from edgeadapt.device.errors import BundleError

TABLES_KEY = "tables"
DELTA_KEYS = ("classes", "files", "removed", "head_parts")
SEGMENT_NAME = "tables.json"
#: At most this many segments (a writer folds them into one long before).
MAX_SEGMENTS = 64
#: Roll the delta into a new segment once its JSON passes this many bytes.
ROLL_BYTES = 16 << 10
#: Write the whole tables as one segment once a manifest names this many segments.
REBASE_SEGMENTS = 16


@dataclass(frozen=True)
class TableLayout:
    """The segments a manifest names and the tables they hold (never changed once built)."""

    segments: tuple[dict, ...]
    classes: list = field(repr=False)
    files: dict = field(repr=False)
    head_parts: list = field(repr=False)


def _fail(source: str, what: str) -> BundleError:
    return BundleError(f"{source}: {what}; the bundle is damaged: roll back or re-copy it")


def _apply(classes: list, files: dict, head_parts: list, delta: Any, where: str) -> None:
    """Apply one delta (a segment or the manifest's own) to the tables, checking its shape."""
    if not isinstance(delta, dict) or set(delta) - set(DELTA_KEYS):
        raise _fail(where, f"a table delta must be an object with the keys {list(DELTA_KEYS)}")
    entries, table = delta.get("classes", []), delta.get("files", {})
    removed, parts = delta.get("removed", []), delta.get("head_parts", [])
    if not (isinstance(entries, list) and isinstance(table, dict) and isinstance(removed, list)
            and isinstance(parts, list)):
        raise _fail(where, "table delta fields have the wrong types (lists, and an object for files)")
    for entry in entries:
        index = entry.get("index") if isinstance(entry, dict) else None
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= len(classes):
            raise _fail(where, f"class entry {str(entry)[:80]} must carry an index 0..{len(classes)}")
        if index == len(classes):
            classes.append(entry)
        else:
            classes[index] = entry
    for path in removed:
        if not isinstance(path, str) or path not in files:
            raise _fail(where, f"removes {str(path)[:80]!r}, which is not listed")
        del files[path]
    files.update(table)
    head_parts.extend(parts)


@dataclass(frozen=True)
class SegmentRules:
    """What a segment reference must satisfy (given by the manifest module, which owns the caps)."""

    max_bytes: int
    check_path: Callable[[Any, str], None]
    digest: Any  # compiled pattern of a sha256 in hexadecimal


def _segment_refs(section: dict, source: str, rules: SegmentRules) -> list[tuple[str, str, int]]:
    refs = section.get("segments", [])
    if not isinstance(refs, list) or len(refs) > MAX_SEGMENTS:
        raise _fail(source, f"tables.segments must be a list of at most {MAX_SEGMENTS} entries")
    result, total = [], 0
    for position, ref in enumerate(refs):
        where = f"{source}: tables.segments[{position}]"
        if not isinstance(ref, dict) or set(ref) != {"file", "sha256", "size"}:
            raise _fail(where, "a segment is an object with exactly file, sha256 and size")
        path, digest, size = ref["file"], ref["sha256"], ref["size"]
        rules.check_path(path, source)
        if not isinstance(digest, str) or not rules.digest.fullmatch(digest):
            raise _fail(where, "sha256 must be 64 lowercase hexadecimal digits")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise _fail(where, "size must be a non-negative integer")
        total += size
        if total > rules.max_bytes:
            raise _fail(where, f"the segments hold more than {rules.max_bytes} bytes")
        if any(path == other for other, _, _ in result):
            raise _fail(where, f"names the segment {path!r} twice")
        result.append((path, digest, size))
    return result


def expand(document: Any, read: Callable[[str, int], bytes], source: str,
           rules: SegmentRules) -> tuple[Any, TableLayout | None]:
    """The ordinary manifest of a stored document, and the layout of its segments (None: no segments).

    Args:
        document: the parsed ``manifest.json`` (or version record).
        read: ``read(path, size)`` returns the bytes of a segment file (size-capped by the caller).
        source: name used in error messages.
        rules: the caps and path rules a segment reference must satisfy.

    Returns:
        (manifest data, layout).

    Raises:
        BundleError: a segment is missing, fails its sha256 check or is malformed.
    """
    if not isinstance(document, dict) or TABLES_KEY not in document:
        return document, None
    from edgeadapt.device.schema import parse_document

    section = document[TABLES_KEY]
    head = document.get("head")
    if not isinstance(section, dict) or set(section) - {"segments", *DELTA_KEYS}:
        raise _fail(source, f"tables must be an object with the keys segments, {', '.join(DELTA_KEYS)}")
    if "classes" in document or "files" in document or not isinstance(head, dict) or "parts" in head:
        raise _fail(source, "a manifest with tables lists no classes, files or head.parts of its own")
    classes: list = []
    files: dict = {}
    head_parts: list = []
    refs = _segment_refs(section, source, rules)
    for path, digest, size in refs:
        raw = read(path, size)
        if len(raw) != size or hashlib.sha256(raw).hexdigest() != digest:
            raise _fail(source, f"the table segment {path!r} fails its size or sha256 check")
        _apply(classes, files, head_parts, parse_document(raw, f"{source}: {path}", rules.max_bytes,
                                                          flat_keys=("classes", "files"), unique_keys=False),
               f"{source}: {path}")
    for path, digest, size in refs:
        files[path] = {"sha256": digest, "size": size}
    layout = TableLayout(tuple({"file": path, "sha256": digest, "size": size} for path, digest, size in refs),
                         list(classes), dict(files), list(head_parts))
    _apply(classes, files, head_parts, {key: section[key] for key in DELTA_KEYS if key in section}, source)
    for path, digest, size in refs:  # pruning keeps what ``files`` lists: every segment must stay listed
        if files.get(path) != {"sha256": digest, "size": size}:
            raise _fail(source, f"the table segment {path!r} must stay listed in files with its sha256 and size")
    data = {key: value for key, value in document.items() if key != TABLES_KEY}
    data["classes"], data["files"] = classes, files
    data["head"] = dict(head)
    if head_parts:
        data["head"]["parts"] = head_parts
    return data, layout


def delta(data: dict, layout: TableLayout) -> dict | None:
    """What ``data`` changes against the tables of ``layout`` (None: a change a delta cannot express)."""
    classes = data.get("classes") or []
    head_parts = data["head"].get("parts") or []
    known = len(layout.classes)
    table = data.get("files") or {}
    if any(table.get(ref["file"]) != {"sha256": ref["sha256"], "size": ref["size"]} for ref in layout.segments):
        return None  # a segment the version does not list
    if len(classes) < known or head_parts[:len(layout.head_parts)] != layout.head_parts:
        return None
    result: dict[str, Any] = {}
    if classes[:known] == layout.classes:  # (one C-level comparison: the common case)
        changed = classes[known:]
    else:
        changed = [entry for index, entry in enumerate(classes) if index >= known or entry != layout.classes[index]]
    if changed:
        result["classes"] = changed
    files = {path: entry for path, entry in table.items() if layout.files.get(path) != entry}
    if files:
        result["files"] = files
    removed = [path for path in layout.files if path not in table]
    if removed:
        result["removed"] = removed
    if len(head_parts) > len(layout.head_parts):
        result["head_parts"] = head_parts[len(layout.head_parts):]
    return result


def split(data: dict, layout: TableLayout | None) -> dict:
    """The document to store for ``data``: segments plus a delta, or ``data`` itself (full tables)."""
    change = None if layout is None else delta(data, layout)
    if change is None:
        return data
    document: dict[str, Any] = {}
    for key, value in data.items():
        if key == "classes":
            document[TABLES_KEY] = {"segments": list(layout.segments), **change}
        elif key == "head":
            document[key] = {name: item for name, item in value.items() if name != "parts"}
        elif key != "files":
            document[key] = value
    return document


def _encoded_size(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":")))


def full_tables(data: dict) -> dict:
    """A segment holding the whole tables of ``data``."""
    return {"classes": list(data["classes"]), "files": dict(data["files"]),
            "head_parts": list(data["head"].get("parts") or [])}


def choose_layout(parent: Any, new: Any, segment_path: str) -> bytes | None:
    """Give ``new`` (the next device version after ``parent``) its layout; returns a segment to write.

    Keeps the parent's segments while its delta is small; otherwise the parent's delta (or its
    whole tables, past :data:`REBASE_SEGMENTS` segments or without segments) becomes a new
    segment at ``segment_path``. ``new.tables`` is None (a full manifest) when no layout can
    express the change.

    Args:
        parent: the parent :class:`~edgeadapt.device.manifest.Manifest` (with its ``tables``).
        new: the new manifest; its ``tables`` is set here.
        segment_path: where a new segment goes (``heads/v{N}/tables.json``).

    Returns:
        The bytes of the new segment, or None when none is written.
    """
    layout = parent.tables
    parent_delta = None if layout is None else delta(parent.data, layout)
    if parent_delta is not None and _encoded_size(parent_delta) <= ROLL_BYTES and _list_segments(new, layout):
        return None
    if parent_delta is not None and len(layout.segments) < REBASE_SEGMENTS:
        content, base = parent_delta, layout
    else:
        content, base = full_tables(parent.data), TableLayout((), [], {}, [])
    raw = (json.dumps(content, separators=(",", ":")) + "\n").encode()
    classes, files, head_parts = list(base.classes), dict(base.files), list(base.head_parts)
    _apply(classes, files, head_parts, content, segment_path)
    ref = {"file": segment_path, "sha256": hashlib.sha256(raw).hexdigest(), "size": len(raw)}
    files[segment_path] = {"sha256": ref["sha256"], "size": ref["size"]}
    if not _list_segments(new, TableLayout((*base.segments, ref), classes, files, head_parts)):
        return None
    return raw


def _list_segments(new: Any, layout: TableLayout) -> bool:
    """Give ``new`` the ``layout`` (listing its segment files) if a delta can express it; else a full manifest."""
    table = new.data["files"]
    saved = {ref["file"]: table.get(ref["file"]) for ref in layout.segments}
    for ref in layout.segments:
        table[ref["file"]] = {"sha256": ref["sha256"], "size": ref["size"]}
    if delta(new.data, layout) is None:
        for path, entry in saved.items():
            if entry is None:
                del table[path]
            else:
                table[path] = entry
        new.tables = None
        return False
    new.tables = layout
    return True


def folder_reader(folder: Any) -> Callable[[str, int], bytes]:
    """``read(path, size)`` for the segments of a bundle folder (inside it, regular files, size-capped)."""
    from pathlib import Path

    from edgeadapt.device.safefs import inside, read_regular

    def read(path: str, size: int) -> bytes:
        try:
            return read_regular(inside(Path(folder), path), size, "table segment")
        except BundleError as error:
            raise BundleError(f"{error}; the bundle is damaged: roll back or re-copy it") from None

    return read
