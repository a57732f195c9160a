"""The manifest schema: every field's type, range and length, every path, every declared size.

:func:`validate_manifest` is what :meth:`edgeadapt.device.manifest.Manifest.validate` runs on
every manifest read from disk or about to be written; :func:`head_files` returns the head
section typed, with the shape each ``.npy`` file must have (D = embedding size, C = number of
classes; C = 0 is legal: a headless bundle). Every violation is a
:class:`~edgeadapt.device.errors.BundleError` naming the field and what was expected.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from operator import itemgetter
from typing import Any

from edgeadapt.device.errors import BundleError
from edgeadapt.device.manifest import (
    MAX_CLASSES,
    MAX_EMBEDDING_SIZE,
    MAX_FILE_SIZE,
    MAX_FILES,
    MAX_MODELS,
    MAX_NAME_LENGTH,
    MAX_PATH_LENGTH,
    MAX_VERSION,
    RESERVED_TOP_LEVEL,
    SUPPORTED_SCHEMA_VERSIONS,
    InputSpec,
    SHA256_PATTERN,
    check_relative_path,
)
from edgeadapt.device.head_parts import MAX_PARTS
from edgeadapt.device.schema import REQUIRED, Fields


@dataclass(frozen=True)
class HeadFiles:
    """The files of the head section, typed, with the shape each must have (D = embedding size, C = classes).

    ``arrays`` maps each referenced ``.npy`` path to (expected shape, allowed dtype kinds);
    ``None`` in a shape matches any size. ``head_file`` is the flat ``.eah`` copy of the head
    for firmware when the bundle carries one (see :mod:`edgeadapt.device.head_file`).
    """

    weights: str
    bias: str
    feature_mean: str | None
    l2_normalize: bool
    temperature: float
    backbone_fingerprint: str | None
    arrays: dict[str, tuple[tuple[int | None, ...] | None, str]]
    head_file: str | None = None


def check_listed_path(relative_path: Any, source: str = "manifest.json") -> None:
    """A path of the ``files`` table: a plain relative path, no hidden component (temporary and lock
    files start with a dot), not the manifest itself or ``versions/`` (both owned by the updater)."""
    check_relative_path(relative_path)
    parts = relative_path.split("/")
    if any(part.startswith(".") for part in parts):
        raise BundleError(f"{source}: listed file {relative_path!r} has a hidden path component; refusing it")
    if parts[0] in RESERVED_TOP_LEVEL:
        raise BundleError(f"{source}: listed file {relative_path!r} uses a name reserved for the updater; refusing it")


def validate_manifest(data: Any, source: str = "manifest.json") -> None:
    """The manifest schema: every field's type, range, length and every path (see docs/ARCHITECTURE.md).

    Args:
        data: the parsed ``manifest.json``.
        source: name used in error messages.

    Raises:
        BundleError: naming the field and what was expected.
    """
    top = Fields(data, "", source)
    version = data.get("schema_version")
    if isinstance(version, bool) or version not in SUPPORTED_SCHEMA_VERSIONS:
        raise BundleError(
            f"{source} has schema_version {version!r}, but this edgeadapt reads "
            f"{list(SUPPORTED_SCHEMA_VERSIONS)}: upgrade edgeadapt or re-export the bundle"
        )
    for key in ("input", "embedding_size", "classes", "backbone", "head", "files"):
        if key not in data:
            raise BundleError(f"{source} lacks the required field {key!r}; the bundle is incomplete")
    top.integer("version", 0, MAX_VERSION, default=1)
    top.integer("parent_version", 0, MAX_VERSION, default=None, nullable=True)
    for key in ("bundle_id", "name", "created_at", "committed_at"):
        top.string(key, MAX_NAME_LENGTH, default=None, nullable=True)
    created_by = top.mapping("created_by", default=None, nullable=True)
    if created_by is not None:
        for key in created_by.data:
            created_by.string(key, MAX_NAME_LENGTH, nullable=True)
    _derived_from(top, source)
    InputSpec.from_dict(top.data["input"], source)
    top.integer("embedding_size", 1, MAX_EMBEDDING_SIZE)
    classes = top.sequence("classes", MAX_CLASSES)
    names: set[str] = set()
    for position, entry in enumerate([] if _plain_classes(classes) else classes):  # slow path names the error
        fields = Fields(entry, f"classes[{position}]", source)
        for key, value in entry.items():
            if isinstance(value, (dict, list)):
                raise fields.fail(key, "a number, string, boolean or null", value)
        name = fields.string("name", MAX_NAME_LENGTH, min_length=1)
        if name in names:
            raise BundleError(f"{source} lists the class name {name!r} twice; class names must be unique")
        names.add(name)
        if fields.integer("index", 0, MAX_CLASSES) != position:
            raise BundleError(f"{source}: field classes[{position}].index must be {position} (indices 0..C-1 in order)")
        fields.string("origin", 64, default="base")
        fields.string("added_at", 64, default=None, nullable=True)
        fields.string("source", MAX_NAME_LENGTH * 4, default=None, nullable=True)
        fields.integer("examples", 0, 2**53, default=None, nullable=True)
        fields.integer("added_in_version", 0, MAX_VERSION, default=None, nullable=True)
    table = top.mapping("files")
    if len(table.data) > MAX_FILES:
        raise BundleError(f"{source}: field files lists {len(table.data)} files, at most {MAX_FILES} are allowed")
    for relative_path in table.data:
        check_listed_path(relative_path, source)
        entry = table.mapping(relative_path)
        for key, value in entry.data.items():
            if isinstance(value, (dict, list)):
                raise entry.fail(key, "a number, string, boolean or null", value)
        sha = entry.string("sha256", 64, min_length=64)
        if not SHA256_PATTERN.fullmatch(sha):
            raise entry.fail("sha256", "64 lowercase hexadecimal digits", sha)
        entry.integer("size", 0, MAX_FILE_SIZE)
    backbone = top.mapping("backbone")
    backbone.string("fingerprint", MAX_NAME_LENGTH)
    models = backbone.sequence("models", MAX_MODELS)
    for position, model in enumerate(models):
        fields = Fields(model, f"backbone.models[{position}]", source)
        _listed(fields, "file", table.data, source)
        fields.string("format", 32)
        fields.string("quantization", 32, default=None, nullable=True)
        fields.integer("size", 0, MAX_FILE_SIZE, default=None, nullable=True)
        for key in ("input", "output"):
            tensor = fields.mapping(key, default=None, nullable=True)
            if tensor is not None:
                tensor.string("dtype", 32, default=None, nullable=True)
                tensor.number("scale", default=0.0, nullable=True)
                tensor.integer("zero_point", -(2**31), 2**31, default=0, nullable=True)
    head_files(data, source)


def _derived_from(top: Fields, source: str) -> None:
    """``derived_from``: the publisher-signed statement a device-committed version derives from.

    Written by the head updater (``edgeadapt.device.signing.chain_manifest``): the sha256 of the
    signed statement, the signed version and the signer's key id; other keys must be scalars.
    """
    derived = top.mapping("derived_from", default=None, nullable=True)
    if derived is None:
        return
    digest = derived.string("statement_sha256", 64, min_length=64)
    if not SHA256_PATTERN.fullmatch(digest):
        raise derived.fail("statement_sha256", "64 lowercase hexadecimal digits", digest)
    derived.integer("signed_version", 0, MAX_VERSION, default=None, nullable=True)
    derived.string("signer", MAX_NAME_LENGTH, default=None, nullable=True)
    for key, value in derived.data.items():
        if isinstance(value, (dict, list)):
            raise derived.fail(key, "a number, string, boolean or null", value)


_OPTIONAL_CLASS_FIELDS = {"added_at": (str, 64), "source": (str, MAX_NAME_LENGTH * 4), "origin": (str, 64),
                          "examples": (int, 2**53), "added_in_version": (int, MAX_VERSION)}
_SCALARS = (str, int, float, bool, type(None))
_SCALAR_SET = set(_SCALARS)


def _column(classes: list, key: str) -> list:
    try:
        return list(map(itemgetter(key), classes))
    except KeyError:
        return [entry[key] for entry in classes if key in entry]


def _plain_classes(classes: list) -> bool:
    """True when every class entry is valid (exact types, ranges, unique names, scalar values only).

    Checked column by column with C-level iteration, so a 1000-class table costs a fraction of a
    millisecond; when it returns False the entry-by-entry checks find and name the problem.
    """
    if not classes:
        return True
    if set(map(type, classes)) != {dict}:
        return False
    try:
        names = list(map(itemgetter("name"), classes))
        indices = list(map(itemgetter("index"), classes))
    except KeyError:
        return False
    if set(map(type, names)) != {str} or set(map(type, indices)) != {int} or indices != list(range(len(indices))):
        return False
    lengths = list(map(len, names))
    if min(lengths) < 1 or max(lengths) > MAX_NAME_LENGTH or len(set(names)) != len(names):
        return False
    for key in set(chain.from_iterable(map(dict.keys, classes))) - {"name", "index"}:
        values = _column(classes, key)
        types = set(map(type, values))
        rule = _OPTIONAL_CLASS_FIELDS.get(key)
        if rule is None:
            if not types <= _SCALAR_SET:
                return False
            continue
        if key == "origin" and type(None) in types:
            return False
        if not types <= {rule[0], type(None)} or (rule[0] is int and bool in types):
            return False
        present = [value for value in values if value is not None] if type(None) in types else values
        if not present:
            continue
        if rule[0] is int and (min(present) < 0 or max(present) > rule[1]):
            return False
        if rule[0] is str and max(map(len, present)) > rule[1]:
            return False
    return True


def _listed(fields: Fields, key: str, table: dict, source: str, nullable: bool = False) -> str | None:
    """A path field that must name a file of the ``files`` table."""
    path = fields.string(key, MAX_PATH_LENGTH, min_length=1, default=None if nullable else REQUIRED,
                         nullable=nullable)
    if path is None:
        return None
    check_relative_path(path)
    if path not in table:
        raise BundleError(f"{source}: field {fields.name(key)} names {path!r}, which is not listed in files")
    return path


def head_files(data: dict[str, Any], source: str) -> HeadFiles:
    """Validate the ``head`` section and return its files with the shape each must have."""
    table = data["files"]
    size = data["embedding_size"]
    count = len(data["classes"])
    head = Fields(data["head"], "head", source)
    head.integer("version", 0, MAX_VERSION, default=None, nullable=True)
    head.string("format", 16, choices=("npy",), default="npy")
    arrays: dict[str, tuple[tuple[int | None, ...] | None, str]] = {}
    count -= _parts(head, table, size, count, arrays, source)  # the base files hold the classes before the parts
    weights = _listed(head, "weights", table, source)
    bias = _listed(head, "bias", table, source)
    mean = _listed(head, "feature_mean", table, source, nullable=True)
    arrays[weights] = ((size, count), "f")
    arrays[bias] = ((count,), "f")
    if mean is not None:
        arrays[mean] = ((size,), "f")
    l2_normalize = head.boolean("l2_normalize", default=False)
    temperature = head.number("temperature", 0.0, 1e6, default=1.0, exclusive_minimum=True)
    fingerprint = head.string("backbone_fingerprint", MAX_NAME_LENGTH, default=None, nullable=True)
    statistics = head.mapping("statistics", default=None, nullable=True)
    if statistics is not None:
        arrays[_listed(statistics, "class_sums", table, source)] = ((count, size), "f")
        arrays[_listed(statistics, "class_counts", table, source)] = ((count,), "iu")
        gram = _listed(statistics, "gram", table, source, nullable=True)
        if gram is not None:
            arrays[gram] = ((size, size), "f")
        for key in ("bytes_per_class", "bytes_shared", "examples"):
            statistics.integer(key, 0, 2**53, default=None, nullable=True)
        basis = statistics.mapping("ridge_basis", default=None, nullable=True)
        if basis is not None:
            basis_files = basis.mapping("files", default=None, nullable=True)
            for name in (basis_files.data if basis_files is not None else {}):
                path = _listed(basis_files, name, table, source)
                arrays.setdefault(path, (None, "fiu"))
    for key in ("references", "device_examples"):
        section = head.mapping(key, default=None, nullable=True)
        if section is not None:
            arrays[_listed(section, "embeddings", table, source)] = ((None, size), "f")
            arrays[_listed(section, "labels", table, source)] = ((None,), "iu")
            section.integer("count", 0, 2**53, default=None, nullable=True)
            section.integer("per_class", 0, 2**53, default=None, nullable=True)
    unknown = head.mapping("unknown", default=None, nullable=True)
    if unknown is not None:
        arrays[_listed(unknown, "center", table, source)] = ((size,), "f")
        unknown.number("threshold", -1e6, 1e6)
        unknown.number("accept_rate", 0.0, 1.0, default=None, nullable=True)
        unknown.integer("calibrated_examples", 0, 2**53, default=None, nullable=True)
        unknown.integer("calibrated_in_version", 0, MAX_VERSION, default=None, nullable=True)
        unknown.string("method", 64, default=None, nullable=True)
    carried = head.mapping("head_file", default=None, nullable=True)
    head_file = None
    if carried is not None:
        head_file = _listed(carried, "file", table, source)
        if not head_file.endswith(".eah"):
            raise carried.fail("file", "a path ending in .eah", head_file)
        carried.string("weights", 16, choices=("float32", "int8"))
    return HeadFiles(weights, bias, mean, l2_normalize, temperature, fingerprint, arrays, head_file)


def _parts(head: Fields, table: dict, size: int, count: int, arrays: dict, source: str) -> int:
    """Validate ``head.parts`` (see :mod:`edgeadapt.device.head_parts`); returns the classes they append."""
    parts = head.sequence("parts", MAX_PARTS, default=None, nullable=True)
    added = 0
    statistics = isinstance(head.data.get("statistics"), dict)
    for position, entry in enumerate(parts or ()):
        fields = Fields(entry, f"head.parts[{position}]", source)
        fields.integer("version", 0, MAX_VERSION, default=None, nullable=True)
        columns = fields.integer("columns", 0, MAX_CLASSES)
        new = fields.integer("added", 0, columns)
        rows = fields.integer("rows", 0, 2**31, default=0)
        added += new
        if added > count:
            raise BundleError(f"{source}: head.parts append {added} classes but the manifest lists {count}")
        arrays[_listed(fields, "indices", table, source)] = ((columns,), "iu")
        arrays[_listed(fields, "weights", table, source)] = ((size, columns), "f")
        arrays[_listed(fields, "bias", table, source)] = ((columns,), "f")
        sums = _listed(fields, "class_sums", table, source, nullable=not statistics)
        counts = _listed(fields, "class_counts", table, source, nullable=not statistics)
        if sums is not None:
            arrays[sums] = ((columns, size), "f")
        if counts is not None:
            arrays[counts] = ((columns,), "iu")
        examples = _listed(fields, "examples", table, source, nullable=rows == 0)
        labels = _listed(fields, "labels", table, source, nullable=rows == 0)
        if examples is not None:
            arrays[examples] = ((rows, size), "f")
        if labels is not None:
            arrays[labels] = ((rows,), "iu")
    return added
