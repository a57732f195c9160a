"""The manifest's class and file tables in shared segments: a device commit writes what it changes.

Readers assemble the tables (the same ``ClassInfo`` list, the same ``files`` table); segments roll
and fold; rollback, prune, packing and verification see every file; hostile segments and deltas
are refused with :class:`BundleError` (device environment: numpy + the interpreter only).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgeadapt.device import Bundle, HeadUpdater, Runtime, pack_bundle, unpack_bundle
from edgeadapt.device import manifest_tables
from edgeadapt.device.errors import BundleError, EdgeAdaptError
from edgeadapt.device.manifest import Manifest
from edgeadapt.device.versions import VersionStore
from fuzz_support import fuzz_settings


def _stored(bundle_path) -> dict:
    return json.loads((bundle_path / "manifest.json").read_text())


def _write(bundle_path, document: dict) -> None:
    (bundle_path / "manifest.json").write_text(json.dumps(document))


def _grow(bundle_path, test_images, count: int, monkeypatch) -> HeadUpdater:
    """``count`` device commits (added classes) with small roll and fold thresholds."""
    monkeypatch.setattr(manifest_tables, "ROLL_BYTES", 1500)
    monkeypatch.setattr(manifest_tables, "REBASE_SEGMENTS", 3)
    images, labels = test_images
    runtime = Runtime.open(bundle_path)
    updater = HeadUpdater(runtime, reader_grace_seconds=0.0, keep_versions=4, compact_fraction=100.0)
    embeddings = runtime.embed(images[labels == 1][:3])
    for number in range(count):
        updater.add_class_embeddings(f"extra{number}", embeddings + number, force=True)
    return updater


def test_commits_write_deltas_and_readers_see_the_whole_tables(bundle_copy, test_images, monkeypatch):
    full = Bundle.open(bundle_copy, trusted_keys=False).manifest
    updater = _grow(bundle_copy, test_images, 9, monkeypatch)
    stored = _stored(bundle_copy)
    assert "classes" not in stored and "files" not in stored and "parts" not in stored["head"]
    assert 1 <= len(stored["tables"]["segments"]) <= 3
    reopened = Bundle.open(bundle_copy, verify=True, trusted_keys=False)
    memory = updater.runtime.manifest
    assert reopened.manifest.classes == memory.classes  # the same ClassInfo list
    assert reopened.manifest.classes[:len(full.classes)] == full.classes
    assert [info.name for info in reopened.manifest.classes[-9:]] == [f"extra{n}" for n in range(9)]
    assert reopened.manifest.files == memory.files
    for segment in stored["tables"]["segments"]:
        assert reopened.manifest.files[segment["file"]]["sha256"] == segment["sha256"]
    np.testing.assert_array_equal(reopened.load_head().weights, updater.runtime.head.weights)
    # every kept version reads back; files no kept version needs are gone, the others are there
    store = VersionStore(bundle_copy)
    kept = store.kept_manifests()
    referenced = {name for manifest in kept.values() for name in manifest.files}
    on_disk = {str(path.relative_to(bundle_copy)) for path in (bundle_copy / "heads").rglob("*") if path.is_file()}
    assert on_disk == {name for name in referenced if name.startswith("heads/")}


def test_rollback_and_packing_keep_the_tables(bundle_copy, test_images, tmp_path, monkeypatch):
    updater = _grow(bundle_copy, test_images, 6, monkeypatch)
    target = sorted(updater.store.kept_manifests())[0]
    names = updater.store.read_record(target).class_names
    updater.rollback(target)
    reopened = Bundle.open(bundle_copy, verify=True, trusted_keys=False)
    assert reopened.manifest.class_names == names
    packed = pack_bundle(bundle_copy, tmp_path / "packed.zip")
    unpacked = unpack_bundle(packed, tmp_path / "unpacked.eab")
    assert Bundle.open(unpacked, verify=True, trusted_keys=False).manifest.class_names == names
    with Bundle.open(packed, trusted_keys=False) as opened:
        assert opened.manifest.class_names == names


def test_compaction_writes_a_full_manifest_and_the_next_commit_a_new_base(bundle_copy, test_images, monkeypatch):
    updater = _grow(bundle_copy, test_images, 3, monkeypatch)
    updater.compact()
    stored = _stored(bundle_copy)
    assert "tables" not in stored and stored["classes"][-1]["name"] == "extra2"
    images, labels = test_images
    updater.add_class_embeddings("after", updater.runtime.embed(images[labels == 2][:3]), force=True)
    stored = _stored(bundle_copy)
    assert len(stored["tables"]["segments"]) == 1 and [entry["name"] for entry in stored["tables"]["classes"]] == ["after"]
    assert Bundle.open(bundle_copy, verify=True, trusted_keys=False).manifest.class_names[-2:] == ["extra2", "after"]


def test_host_writers_and_the_schema_read_old_full_manifests(bundle_copy):
    stored = _stored(bundle_copy)
    assert "tables" not in stored  # an exported bundle keeps its tables in the manifest
    manifest = Manifest.from_json(json.dumps(stored))
    assert manifest.tables is None and manifest.stored_document() == stored


# ----------------------------------------------------------------------------- hostile segments and deltas
@pytest.fixture
def committed(bundle_copy, test_images, monkeypatch):
    _grow(bundle_copy, test_images, 2, monkeypatch)
    return bundle_copy


def _segment(bundle_path) -> tuple[dict, object]:
    reference = _stored(bundle_path)["tables"]["segments"][0]
    return reference, bundle_path / reference["file"]


def test_a_changed_missing_or_linked_segment_is_refused(committed):
    reference, path = _segment(committed)
    original = path.read_bytes()
    at = original.index(b'"name":"') + 8
    path.write_bytes(original[:at] + (b"Y" if original[at:at + 1] == b"Z" else b"Z") + original[at + 1:])
    with pytest.raises(BundleError, match="size or sha256"):
        Bundle.open(committed, trusted_keys=False)
    path.write_bytes(original + b" ")
    with pytest.raises(BundleError):
        Bundle.open(committed, trusted_keys=False)
    path.unlink()
    with pytest.raises(BundleError, match="roll back or re-copy"):
        Bundle.open(committed, trusted_keys=False)
    elsewhere = committed.parent / "elsewhere.json"
    elsewhere.write_bytes(original)
    os.symlink(elsewhere, path)
    with pytest.raises(BundleError):
        Bundle.open(committed, trusted_keys=False)


def _mutations(document: dict) -> list[tuple[str, dict]]:
    reference = document["tables"]["segments"][0]
    cases = []

    def case(name: str, change) -> None:
        mutated = json.loads(json.dumps(document))
        change(mutated)
        cases.append((name, mutated))

    case("escaping path", lambda d: d["tables"]["segments"][0].update(file="../outside.json"))
    case("hidden path", lambda d: d["tables"]["segments"][0].update(file="heads/.x/tables.json"))
    case("bad sha", lambda d: d["tables"]["segments"][0].update(sha256="0" * 63 + "g"))
    case("negative size", lambda d: d["tables"]["segments"][0].update(size=-1))
    case("huge size", lambda d: d["tables"]["segments"][0].update(size=1 << 40))
    case("extra key", lambda d: d["tables"]["segments"][0].update(extra=1))
    case("segments not a list", lambda d: d["tables"].update(segments=reference))
    case("segment twice", lambda d: d["tables"].update(segments=[reference, reference]))
    case("too many", lambda d: d["tables"].update(segments=[reference] * (manifest_tables.MAX_SEGMENTS + 1)))
    case("unknown delta key", lambda d: d["tables"].update(sneaky=[]))
    case("index past the end", lambda d: d["tables"]["classes"][0].update(index=10**6))
    case("index a bool", lambda d: d["tables"]["classes"][0].update(index=True))
    case("class not an object", lambda d: d["tables"].update(classes=["x"]))
    case("remove unlisted", lambda d: d["tables"].update(removed=["heads/v1/nothing.npy"]))
    case("files a list", lambda d: d["tables"].update(files=[]))
    case("segment unlisted", lambda d: d["tables"].update(removed=[reference["file"]]))
    case("segment relisted", lambda d: d["tables"].update(files={reference["file"]: {"sha256": "0" * 64, "size": 1}}))
    case("inline classes too", lambda d: d.update(classes=[]))
    case("inline head parts too", lambda d: d["head"].update(parts=[]))
    case("tables not an object", lambda d: d.update(tables=[]))
    case("duplicate class name", lambda d: d["tables"]["classes"][0].update(name=d["tables"]["classes"][1]["name"]))
    return cases


def test_hostile_tables_are_refused_with_bundle_errors(committed):
    document = _stored(committed)
    assert len(document["tables"]["classes"]) >= 2
    for name, mutated in _mutations(document):
        _write(committed, mutated)
        with pytest.raises(BundleError):
            Bundle.open(committed, trusted_keys=False)
            pytest.fail(f"{name}: accepted")
    with pytest.raises(BundleError, match="segment files"):
        Manifest.from_json(json.dumps(document))  # no folder to read the segments from


def test_a_segment_with_a_matching_hash_but_hostile_content_is_refused(committed):
    document = _stored(committed)
    reference, path = _segment(committed)
    for content in (b"[]", b'{"classes": 1}', b'{"removed": ["nothing"]}', b"{" * 5000, b"\xff\xfe"):
        path.write_bytes(content)
        reference.update(sha256=hashlib.sha256(content).hexdigest(), size=len(content))
        _write(committed, document)
        with pytest.raises(BundleError):
            Bundle.open(committed, trusted_keys=False)


_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2, 2**40), st.text(max_size=12),
                    st.lists(st.integers(-1, 3), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))


@fuzz_settings(share=0.5)
@given(data=st.data())
def test_fuzzed_table_sections_open_correctly_or_raise_edgeadapt_errors(fixture_dir, tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("tables") / "bundle.eab"
    shutil.copytree(_fuzz_base(fixture_dir, tmp_path_factory), folder)
    document = _stored(folder)
    section = document["tables"]
    key = data.draw(st.sampled_from(["segments", *manifest_tables.DELTA_KEYS]))
    if key == "segments" and section["segments"] and data.draw(st.booleans()):
        field = data.draw(st.sampled_from(["file", "sha256", "size"]))
        section["segments"][0][field] = data.draw(_VALUES)
    elif key == "classes" and section.get("classes") and data.draw(st.booleans()):
        field = data.draw(st.sampled_from(["name", "index", "origin", "examples", "added_in_version"]))
        section["classes"][0][field] = data.draw(_VALUES)
    else:
        section[key] = data.draw(_VALUES)
    _write(folder, document)
    try:
        Bundle.open(folder, verify=True, trusted_keys=False).load_head()
    except EdgeAdaptError:
        pass


_FUZZ_BASE: dict = {}


def _fuzz_base(fixture_dir, tmp_path_factory):
    """A bundle whose manifest names one segment and a delta (built once per session)."""
    if "path" not in _FUZZ_BASE:
        folder = tmp_path_factory.mktemp("tables-base") / "bundle.eab"
        shutil.copytree(fixture_dir / "tiny.eab", folder)
        runtime = Runtime.open(folder)
        updater = HeadUpdater(runtime, reader_grace_seconds=0.0)
        for number in range(2):
            updater.add_class_embeddings(f"fuzz{number}", np.full((2, runtime.head.embedding_size), number + 1.0,
                                                                  np.float32), force=True)
        _FUZZ_BASE["path"] = folder
    return _FUZZ_BASE["path"]
