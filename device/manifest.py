"""The bundle manifest: a JSON document that describes every file of a bundle.

The manifest is the contract between the host (which writes bundles) and the device
(which reads them). It is plain JSON so that apps can read it without edgeadapt.
See docs/ARCHITECTURE.md for the field-by-field description.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from edgeadapt.device.dsse import DEVICE_SIGNATURE_NAME, SIGNATURE_NAME
from edgeadapt.device.errors import BundleError, InputError
from edgeadapt.device.schema import Fields, parse_document

if TYPE_CHECKING:  # pragma: no cover
    from edgeadapt.device.manifest_schema import HeadFiles

SCHEMA_VERSION = 1
SUPPORTED_SCHEMA_VERSIONS = (1,)
RESIZE_POLICIES = ("stretch", "center_crop")
RESAMPLE_FILTERS = ("bilinear", "bicubic", "lanczos", "nearest")
CLASS_ORIGINS = ("base", "host-added", "device-added", "imported")

# Caps on every size a manifest can declare (a manifest comes from other people).
MAX_MANIFEST_BYTES = 32 << 20
MAX_INPUT_SIDE = 4096
MAX_EMBEDDING_SIZE = 1 << 16
MAX_CLASSES = 200_000
MAX_FILES = 100_000
MAX_FILE_SIZE = 1 << 40
MAX_VERSION = 2**31 - 1
MAX_NAME_LENGTH = 1024
MAX_PATH_LENGTH = 1024
MAX_PATH_COMPONENT = 255
MAX_MODELS = 16
#: Top-level path components a listed file may not use: the updater owns them, and the two
#: signature files are never listed (a signature cannot cover itself).
RESERVED_TOP_LEVEL = ("manifest.json", "versions", SIGNATURE_NAME, DEVICE_SIGNATURE_NAME)


@dataclass(frozen=True)
class InputSpec:
    """How an image becomes the backbone's input.

    The float input the backbone was trained on is ``pixel * scale + offset`` where
    ``pixel`` is the uint8 value after resizing to ``height`` x ``width`` and converting
    to ``channels`` (1 = grayscale, 3 = RGB in ``color_order``). ``resample`` is the
    interpolation filter used when an image has another size (Pillow's filters).
    """

    height: int
    width: int
    channels: int = 3
    color_order: str = "RGB"
    dtype: str = "uint8"
    resize: str = "stretch"
    scale: float = 1.0 / 127.5
    offset: float = -1.0
    resample: str = "bilinear"

    def __post_init__(self) -> None:
        for name in ("height", "width", "channels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise InputError(f"input {name} must be an integer, got {value!r}")
        if self.height < 1 or self.width < 1:
            raise InputError(f"input height and width must be positive, got {self.height}x{self.width}")
        if self.height > MAX_INPUT_SIDE or self.width > MAX_INPUT_SIDE:
            raise InputError(
                f"input {self.height}x{self.width} is larger than {MAX_INPUT_SIDE}x{MAX_INPUT_SIDE}; "
                "no supported backbone takes such images"
            )
        if self.channels not in (1, 3):
            raise InputError(f"input channels must be 1 (grayscale) or 3 (RGB), got {self.channels}")
        if self.color_order not in ("RGB", "BGR", "GRAY"):
            raise InputError(f"color_order must be RGB, BGR or GRAY, got {self.color_order!r}")
        if (self.channels == 1) != (self.color_order == "GRAY"):
            raise InputError(
                f"color_order {self.color_order!r} does not fit {self.channels} channel(s): "
                "use GRAY with 1 channel and RGB/BGR with 3"
            )
        if self.resize not in RESIZE_POLICIES:
            raise InputError(f"resize must be one of {RESIZE_POLICIES}, got {self.resize!r}")
        if self.resample not in RESAMPLE_FILTERS:
            raise InputError(f"resample must be one of {RESAMPLE_FILTERS}, got {self.resample!r}")
        if self.dtype != "uint8":
            raise InputError(f"only uint8 pixel input is supported, got {self.dtype!r}")

    @property
    def shape(self) -> tuple[int, int, int]:
        """(height, width, channels) of one preprocessed image."""
        return (self.height, self.width, self.channels)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "manifest.json") -> "InputSpec":
        """Build from the manifest's ``input`` object; :class:`BundleError` names a wrong field."""
        fields = Fields(data, "input", source)
        known = {name for name in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise BundleError(f"{source}: manifest input spec has unknown fields {sorted(unknown)}")
        values = {
            "height": fields.integer("height", 1, MAX_INPUT_SIDE),
            "width": fields.integer("width", 1, MAX_INPUT_SIDE),
            "channels": fields.integer("channels", 1, 3, default=3),
            "color_order": fields.string("color_order", choices=("RGB", "BGR", "GRAY"), default="RGB"),
            "dtype": fields.string("dtype", choices=("uint8",), default="uint8"),
            "resize": fields.string("resize", choices=RESIZE_POLICIES, default="stretch"),
            "scale": fields.number("scale", -1e6, 1e6, default=1.0 / 127.5),
            "offset": fields.number("offset", -1e6, 1e6, default=-1.0),
            "resample": fields.string("resample", choices=RESAMPLE_FILTERS, default="bilinear"),
        }
        try:
            return cls(**values)
        except InputError as error:
            raise BundleError(f"{source} has an invalid input spec: {error}") from None


@dataclass
class ClassInfo:
    """One class of the head: its name, row index and where it came from."""

    name: str
    index: int
    origin: str = "base"
    added_at: str | None = None
    examples: int | None = None
    #: bundle version that introduced the class (device and host updates set it)
    added_in_version: int | None = None
    #: where a device-added class came from when it was merged on the host (device bundle id, delta file)
    source: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if value is not None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ClassInfo":
        """From a (validated) manifest class entry; fields this version does not know are ignored."""
        known = cls.__dataclass_fields__
        return cls(**{key: value for key, value in data.items() if key in known})


@dataclass(frozen=True)
class FileEntry:
    """One row of the manifest's ``files`` table."""

    sha256: str
    size: int


#: Encodes one class or file entry on its line.
_ENTRY = json.JSONEncoder(separators=(",", ":"))


@dataclass
class Manifest:
    """In-memory form of ``manifest.json``. ``data`` holds the raw JSON dictionary."""

    data: dict[str, Any] = field(default_factory=dict)
    #: the table segments the stored document names (:mod:`edgeadapt.device.manifest_tables`); None: full tables
    tables: Any = field(default=None, compare=False, repr=False)

    # -- convenience accessors -------------------------------------------------
    @property
    def schema_version(self) -> int:
        return int(self.data["schema_version"])

    @property
    def version(self) -> int:
        return int(self.data.get("version", 1))

    @property
    def input_spec(self) -> InputSpec:
        return InputSpec.from_dict(self.data["input"])

    @property
    def embedding_size(self) -> int:
        return int(self.data["embedding_size"])

    @property
    def classes(self) -> list[ClassInfo]:
        return [ClassInfo.from_dict(entry) for entry in self.data["classes"]]

    @property
    def class_names(self) -> list[str]:
        return [entry["name"] for entry in self.data["classes"]]

    @property
    def backbone_fingerprint(self) -> str:
        return str(self.data["backbone"]["fingerprint"])

    @property
    def models(self) -> list[dict[str, Any]]:
        return list(self.data["backbone"]["models"])

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        return dict(self.data.get("files", {}))

    @property
    def file_table(self) -> dict[str, FileEntry]:
        """The ``files`` table as typed entries."""
        return {name: FileEntry(entry["sha256"], int(entry["size"])) for name, entry in self.files.items()}

    @property
    def head_files(self) -> "HeadFiles":
        """The head section, typed, with the shape of each array (validated by :meth:`validate`)."""
        from edgeadapt.device.manifest_schema import head_files

        return head_files(self.data, "manifest.json")

    def copy(self) -> "Manifest":
        """A deep copy. The class and file tables are copied entry by entry (their entries hold only
        scalars, as the schema requires): fast at thousands of classes."""
        data = {}
        for key, value in self.data.items():
            if key == "classes" and type(value) is list:
                data[key] = [dict(entry) if type(entry) is dict else copy.deepcopy(entry) for entry in value]
            elif key == "files" and type(value) is dict:
                data[key] = {path: dict(entry) if type(entry) is dict else copy.deepcopy(entry)
                             for path, entry in value.items()}
            else:
                data[key] = copy.deepcopy(value)
        return Manifest(data, self.tables)

    def stored_document(self) -> dict[str, Any]:
        """The document :meth:`to_json` writes: ``data``, or its table segments plus what changed since them."""
        from edgeadapt.device.manifest_tables import split

        return split(self.data, self.tables)

    def to_json(self) -> str:
        """The manifest as written: indented JSON, one line per class entry and per file entry (a
        commit rewrites the manifest, so its size is part of what every update costs; a device commit
        stores the class and file tables in shared segments, see :mod:`edgeadapt.device.manifest_tables`)."""
        items = list(self.stored_document().items())
        lines = ["{"]
        for position, (key, value) in enumerate(items):
            comma = "," if position < len(items) - 1 else ""
            name = json.dumps(key)
            if key == "classes" and isinstance(value, list) and value:
                body = ",\n".join(f"    {_ENTRY.encode(entry)}" for entry in value)
                lines.append(f"  {name}: [\n{body}\n  ]{comma}")
            elif key == "tables" and isinstance(value, dict):
                body = ",\n".join(f"    {_ENTRY.encode(part)}: {_ENTRY.encode(item)}" for part, item in value.items())
                lines.append(f"  {name}: {{\n{body}\n  }}{comma}")
            elif key == "files" and isinstance(value, dict) and value:
                body = ",\n".join(f"    {_ENTRY.encode(path)}:{_ENTRY.encode(entry)}"
                                 for path, entry in value.items())
                lines.append(f"  {name}: {{\n{body}\n  }}{comma}")
            else:
                lines.append(f"  {name}: {json.dumps(value, indent=2)}".replace("\n", "\n  ") + comma)
        lines.append("}")
        return "\n".join(lines) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, source: str = "manifest.json",
                  read_segment: Callable[[str, int], bytes] | None = None) -> "Manifest":
        """Parse and validate a manifest; :class:`BundleError` names the first problem.

        Args:
            text: the stored document.
            source: name used in error messages.
            read_segment: ``read(path, size)`` for the table segments a device-committed manifest
                names (:func:`edgeadapt.device.manifest_tables.folder_reader`); without it such a
                manifest is refused.

        Returns:
            The manifest, its tables assembled.

        Raises:
            BundleError: naming the first problem.
        """
        from edgeadapt.device.manifest_schema import check_listed_path
        from edgeadapt.device.manifest_tables import TABLES_KEY, SegmentRules, expand

        document = parse_document(text, source, MAX_MANIFEST_BYTES, flat_keys=("classes", "files"),
                                  unique_keys=False)
        if isinstance(document, dict) and TABLES_KEY in document and read_segment is None:
            raise BundleError(f"{source} keeps its tables in segment files: read it from its bundle folder")
        rules = SegmentRules(MAX_MANIFEST_BYTES, check_listed_path, SHA256_PATTERN)
        data, layout = expand(document, read_segment, source, rules) if read_segment is not None \
            else (document, None)
        manifest = cls(data, layout)
        manifest.validate(source)
        return manifest

    def validate(self, source: str = "manifest.json") -> None:
        """Check every field (types, ranges, sizes, lengths, paths); raise :class:`BundleError` naming the first problem."""
        from edgeadapt.device.manifest_schema import validate_manifest

        validate_manifest(self.data, source)


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")


def check_relative_path(relative_path: Any) -> None:
    """Refuse a path (as text) that could escape the bundle directory or is not a plain relative path."""
    if not isinstance(relative_path, str) or not relative_path or relative_path == ".":
        raise BundleError(f"bundle path {relative_path!r} must be a non-empty relative path")
    if len(relative_path) > MAX_PATH_LENGTH:
        raise BundleError(f"bundle path {relative_path[:60]!r}... is longer than {MAX_PATH_LENGTH} characters")
    if relative_path.startswith(("/", "\\")) or "\\" in relative_path or ":" in relative_path.split("/")[0]:
        raise BundleError(f"bundle path {relative_path!r} escapes the bundle directory; refusing it")
    if _CONTROL.search(relative_path):
        raise BundleError(f"bundle path {relative_path!r} contains control characters; refusing it")
    parts = relative_path.split("/")
    if ".." in parts:
        raise BundleError(f"bundle path {relative_path!r} escapes the bundle directory; refusing it")
    for part in parts:
        if part in ("", "."):
            raise BundleError(f"bundle path {relative_path!r} has an empty or '.' component; refusing it")
        if len(part.encode("utf-8", "surrogatepass")) > MAX_PATH_COMPONENT:
            raise BundleError(f"bundle path {relative_path[:60]!r} has a component longer than {MAX_PATH_COMPONENT} bytes")


def utc_timestamp() -> str:
    """Current UTC time, ISO 8601, seconds precision."""
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def new_manifest(
    *,
    name: str,
    input_spec: InputSpec,
    embedding_size: int,
    classes: list[ClassInfo],
    backbone_fingerprint: str,
    models: list[dict[str, Any]],
    head: dict[str, Any],
    created_by: dict[str, str],
    parity: dict[str, Any] | None = None,
    version: int = 1,
    parent_version: int | None = None,
    bundle_id: str | None = None,
) -> Manifest:
    """Assemble a schema-1 manifest (the ``files`` table is filled in by the writer)."""
    import uuid

    return Manifest(
        {
            "schema_version": SCHEMA_VERSION,
            "bundle_id": bundle_id or str(uuid.uuid4()),
            "name": name,
            "version": version,
            "parent_version": parent_version,
            "created_at": utc_timestamp(),
            "created_by": created_by,
            "input": input_spec.to_dict(),
            "embedding_size": int(embedding_size),
            "classes": [info.to_dict() for info in classes],
            "backbone": {"fingerprint": backbone_fingerprint, "models": models},
            "head": head,
            "parity": parity or {},
            "files": {},
        }
    )
