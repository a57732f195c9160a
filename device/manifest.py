"""The bundle manifest: a JSON document that describes every file of a bundle.

The manifest is the contract between the host (which writes bundles) and the device
(which reads them). It is plain JSON so that apps can read it without edgeadapt.
See docs/ARCHITECTURE.md for the field-by-field description.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from edgeadapt.device.errors import BundleError, InputError

SCHEMA_VERSION = 1
SUPPORTED_SCHEMA_VERSIONS = (1,)
RESIZE_POLICIES = ("stretch", "center_crop")
RESAMPLE_FILTERS = ("bilinear", "bicubic", "lanczos", "nearest")
CLASS_ORIGINS = ("base", "host-added", "device-added", "imported")


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
        if self.height < 1 or self.width < 1:
            raise InputError(f"input height and width must be positive, got {self.height}x{self.width}")
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
    def from_dict(cls, data: dict[str, Any]) -> "InputSpec":
        known = {name for name in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise BundleError(f"manifest input spec has unknown fields {sorted(unknown)}")
        return cls(**data)


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


@dataclass
class Manifest:
    """In-memory form of ``manifest.json``. ``data`` holds the raw JSON dictionary."""

    data: dict[str, Any] = field(default_factory=dict)

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
        return [ClassInfo(**entry) for entry in self.data["classes"]]

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

    def copy(self) -> "Manifest":
        return Manifest(copy.deepcopy(self.data))

    def to_json(self) -> str:
        return json.dumps(self.data, indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "manifest.json") -> "Manifest":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise BundleError(
                f"{source} is not valid JSON ({error}); the bundle is corrupted: re-export or re-copy it"
            ) from error
        manifest = cls(data)
        manifest.validate(source)
        return manifest

    def validate(self, source: str = "manifest.json") -> None:
        """Check the structure; raise :class:`BundleError` naming the first problem."""
        data = self.data
        if not isinstance(data, dict):
            raise BundleError(f"{source} must hold a JSON object")
        version = data.get("schema_version")
        if version not in SUPPORTED_SCHEMA_VERSIONS:
            raise BundleError(
                f"{source} has schema_version {version!r}, but this edgeadapt reads "
                f"{list(SUPPORTED_SCHEMA_VERSIONS)}: upgrade edgeadapt or re-export the bundle"
            )
        for key in ("input", "embedding_size", "classes", "backbone", "head", "files"):
            if key not in data:
                raise BundleError(f"{source} lacks the required field {key!r}; the bundle is incomplete")
        try:
            self.input_spec  # noqa: B018 - building the spec validates it
        except (InputError, TypeError) as error:
            raise BundleError(f"{source} has an invalid input spec: {error}") from error
        names = [entry.get("name") for entry in data["classes"]]
        if len(set(names)) != len(names):
            raise BundleError(f"{source} lists duplicate class names")
        indices = [entry.get("index") for entry in data["classes"]]
        if indices != list(range(len(indices))):
            raise BundleError(f"{source} class indices must be 0..{len(indices) - 1} in order")
        if "fingerprint" not in data["backbone"] or "models" not in data["backbone"]:
            raise BundleError(f"{source} backbone section needs 'fingerprint' and 'models'")
        for relative_path in data["files"]:
            check_relative_path(relative_path)


def check_relative_path(relative_path: str) -> None:
    """Refuse a path that could escape the bundle directory."""
    from pathlib import PurePosixPath

    path = PurePosixPath(relative_path)
    if path.is_absolute() or ".." in path.parts or relative_path.startswith(("/", "\\")) or "\\" in relative_path:
        raise BundleError(f"bundle path {relative_path!r} escapes the bundle directory; refusing it")
    if not relative_path or relative_path in (".",):
        raise BundleError("empty path in bundle file list")


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
