"""Ed25519 signatures over bundles, device versions, deltas and single files, verified offline.

A signature is a DSSE envelope (https://github.com/secure-systems-lab/dsse) around an in-toto
Statement v1 whose predicate has the shape of the OpenSSF model-signing v1.0 predicate
(``resources``: name + sha256 of every file, ``serialization``), plus an ``edgeadapt``
section that says what was signed. docs/SIGNING.md describes the format byte for byte.

- bundle (``signature.dsse.json`` in the bundle folder, written by ``edgeadapt sign``): every
  file of the manifest's ``files`` table and ``manifest.json`` itself;
- device version (``device-signature.dsse.json``, written by a device key after a commit);
- delta (member ``signature.dsse.json`` of the ``.eadelta`` zip): every other member;
- single file (``FILE.dsse.json`` beside it, e.g. a fused ``.tflite``): that file.

Verification needs ``cryptography`` only when trusted keys are configured; reading the format
(``inspect`` without keys, recording the chain of a device update) needs nothing but stdlib.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from edgeadapt.device.dsse import (  # noqa: F401  (re-exported: the format lives in dsse.py)
    DEVICE_SIGNATURE_NAME,
    MAX_SIGNATURE_BYTES,
    PAYLOAD_TYPE,
    SIGNATURE_NAME,
    PREDICATE_TYPE,
    STATEMENT_TYPE,
    Envelope,
    build_statement,
    check_kind,
    compare_resources,
    make_envelope,
    pae,
    parse_envelope,
    read_envelope,
)
from edgeadapt.device.errors import (
    BundleError,
    ChangedAfterSigningError,
    SignatureError,
    UnsignedError,
)
from edgeadapt.device.safefs import durable_write, sha256_and_size

logger = logging.getLogger(__name__)

SIGNATURE_FILES = (SIGNATURE_NAME, DEVICE_SIGNATURE_NAME)
FILE_SIGNATURE_SUFFIX = ".dsse.json"
MANIFEST_RESOURCE = "manifest.json"
#: Not covered by a bundle signature (model-signing ``ignore_paths``).
BUNDLE_IGNORE_PATHS = (SIGNATURE_NAME, DEVICE_SIGNATURE_NAME, "versions", ".edgeadapt.lock")
_DEVICE_HEAD = re.compile(r"^heads/v(\d+)/[^/]+$")


# ----------------------------------------------------------------------------- bundles
@dataclass(frozen=True)
class SignatureStatus:
    """How a bundle or delta is signed, and whether that was checked against trusted keys.

    ``state``: "unsigned", "signed" (this exact version is signed), or "derived" (a version
    committed on the device from the signed one; ``device_signer`` names a trusted device key
    that signed it, if any).
    """

    state: str
    signer: str | None = None
    signer_source: str | None = None
    verified: bool = False
    signed_version: int | None = None
    statement_sha256: str | None = None
    device_signer: str | None = None

    def describe(self) -> str:
        """One line for ``inspect``."""
        if self.state == "unsigned":
            return f"unsigned ({self.signer})" if self.signer else "unsigned"
        checked = "verified with a trusted key" if self.verified else "not checked: no trusted keys (--trust KEYFILE)"
        if self.state == "signed":
            return f"signed by {self.signer} ({checked})"
        device = f"; device version signed by {self.device_signer}" if self.device_signer else \
            "; device version not signed by a device key"
        return (f"derived on the device from version {self.signed_version} signed by {self.signer} "
                f"(backbone and publisher files {'verified' if self.verified else 'not checked'}{device})")


def _read_manifest_file(folder: Path) -> bytes:
    """The raw bytes of ``folder/manifest.json`` (a regular file, size-capped, never through a link)."""
    from edgeadapt.device.manifest import MAX_MANIFEST_BYTES
    from edgeadapt.device.safefs import read_regular

    return read_regular(folder / MANIFEST_RESOURCE, MAX_MANIFEST_BYTES, "bundle manifest")


def _manifest_bytes(bundle: Any) -> bytes:
    data = _read_manifest_file(Path(bundle.path))
    try:
        same = json.loads(data) == bundle.manifest.stored_document()
    except (json.JSONDecodeError, UnicodeDecodeError):
        same = False
    if not same:
        raise SignatureError(f"{bundle.path}: manifest.json changed while it was being opened (a device update?); "
                             "open the bundle again")
    return data


def bundle_resources(bundle: Any, manifest_data: bytes) -> dict[str, str]:
    """name -> sha256 of every file the manifest lists, plus ``manifest.json`` itself."""
    resources = {name: str(entry.get("sha256")) for name, entry in bundle.manifest.files.items()}
    resources[MANIFEST_RESOURCE] = hashlib.sha256(manifest_data).hexdigest()
    return resources


def describe_signature(bundle: Any) -> SignatureStatus:
    """The bundle's signature as it claims to be (no key check, no ``cryptography`` needed)."""
    if getattr(bundle, "signature", None) is not None:
        return bundle.signature
    try:
        envelope = read_envelope(Path(bundle.path) / SIGNATURE_NAME)
        if envelope is None:
            return SignatureStatus("unsigned")
        statement = envelope.statement()
        digest = hashlib.sha256(_read_manifest_file(Path(bundle.path))).hexdigest()
    except BundleError as error:  # SignatureError included
        return SignatureStatus("unsigned", signer=f"the signature file is unreadable: {error}")
    signer = ", ".join(envelope.key_ids)
    section = statement["predicate"]["edgeadapt"]
    if digest == statement["_resources"].get(MANIFEST_RESOURCE):
        return SignatureStatus("signed", signer, statement_sha256=envelope.statement_sha256,
                               signed_version=section.get("version"))
    derived = bundle.manifest.data.get("derived_from") or {}
    if derived.get("statement_sha256") == envelope.statement_sha256:
        return SignatureStatus("derived", signer, statement_sha256=envelope.statement_sha256,
                               signed_version=section.get("version"))
    return SignatureStatus("unsigned", signer=f"the signature by {signer} no longer matches: manifest.json changed "
                                              "after signing")


def check_bundle_signature(bundle: Any, trusted_keys: Any = None, files_verified: bool = True) -> SignatureStatus | None:
    """Verify ``bundle`` against the trusted keys (``Bundle.open`` and ``Runtime.open`` call this).

    Args:
        bundle: an opened :class:`~edgeadapt.device.bundle.Bundle`.
        trusted_keys: see :func:`edgeadapt.device.trust.resolve_trusted_keys`; None and no
            ``EDGEADAPT_TRUST_DIR`` means no check (returns None).
        files_verified: the caller already checked every file against the manifest's sha256.

    Returns:
        The verified status, or None when no keys are configured.

    Raises:
        SignatureError: a subclass naming what failed (unsigned, bad signature, unknown signer,
            changed after signing, malformed signature file, unusable key file).
    """
    from edgeadapt.device.trust import resolve_trusted_keys

    trusted = resolve_trusted_keys(trusted_keys)
    if trusted is None:
        return None
    path = Path(bundle.path)
    envelope = read_envelope(path / SIGNATURE_NAME)
    if envelope is None:
        raise UnsignedError(f"{path} is unsigned, but trusted keys are configured ({trusted.describe()}). Refusing "
                            "it; ask the publisher for a signed bundle (edgeadapt sign BUNDLE --key KEY)")
    signer = envelope.verify(trusted)
    statement = envelope.statement()
    section = check_kind(statement, "bundle", envelope.source)
    if not files_verified:
        bundle.verify()
    resources = statement["_resources"]
    actual = bundle_resources(bundle, _manifest_bytes(bundle))
    status = dict(signer=signer.key_id, signer_source=signer.source, verified=True,
                  signed_version=section.get("version"), statement_sha256=envelope.statement_sha256)
    if actual[MANIFEST_RESOURCE] == resources.get(MANIFEST_RESOURCE):
        compare_resources(resources, actual, str(path))
        return SignatureStatus("signed", **status)
    derived = bundle.manifest.data.get("derived_from")
    if not isinstance(derived, dict) or derived.get("statement_sha256") != envelope.statement_sha256:
        raise ChangedAfterSigningError(
            f"{path}: manifest.json changed after signing (classes, labels or checksums differ from the signed "
            "manifest, and it is not a version derived on the device from the signed one). Refusing it; re-copy "
            "the signed bundle")
    _check_derived(bundle, section, resources, actual)
    device_signer = _device_signer(bundle, trusted, actual)
    if device_signer is None and trusted.require_device_signature:
        raise UnsignedError(f"{path}: version {bundle.manifest.version} was committed on a device and no trusted "
                            "device key signed it, but device signatures are required. Refusing it")
    return SignatureStatus("derived", device_signer=device_signer, **status)


def _check_derived(bundle: Any, section: Mapping[str, Any], resources: Mapping[str, str],
                   actual: Mapping[str, str]) -> None:
    """A device-derived version: same backbone and input, publisher files untouched, new files only in new heads."""
    where = str(bundle.path)
    data = bundle.manifest.data
    for key in ("bundle_id", "backbone", "input", "embedding_size"):
        if data.get(key) != section.get(key):
            raise ChangedAfterSigningError(f"{where}: the manifest's {key!r} differs from the signed bundle's; a "
                                           "device update never changes it. Refusing it")
    signed_version = int(section.get("version", 0))
    if bundle.manifest.version <= signed_version:
        raise ChangedAfterSigningError(f"{where}: version {bundle.manifest.version} claims to derive from signed "
                                       f"version {signed_version} but is not newer. Refusing it")
    for name, digest in resources.items():
        if name == MANIFEST_RESOURCE:
            continue
        if name in actual and actual[name] != digest:
            raise ChangedAfterSigningError(f"{where}: publisher-signed file {name!r} changed after signing. Refusing it")
        if name not in actual and not name.startswith("heads/"):
            raise ChangedAfterSigningError(f"{where}: publisher-signed file {name!r} was removed. Refusing it")
    for name in actual:
        if name == MANIFEST_RESOURCE or name in resources:
            continue
        match = _DEVICE_HEAD.match(name)
        if match is None or int(match.group(1)) <= signed_version:
            raise ChangedAfterSigningError(
                f"{where}: file {name!r} was not signed by the publisher and is not a head file written by a device "
                f"update (heads/vN/ with N > {signed_version}). Refusing it")


def _device_signer(bundle: Any, trusted: Any, actual: Mapping[str, str]) -> str | None:
    try:
        envelope = read_envelope(Path(bundle.path) / DEVICE_SIGNATURE_NAME)
        if envelope is None:
            return None
        key = envelope.verify(trusted)
        statement = envelope.statement()
        check_kind(statement, "device-version", envelope.source)
        compare_resources(statement["_resources"], actual, envelope.source)
    except SignatureError as error:
        if trusted.require_device_signature:
            raise
        logger.info("ignoring the device signature of %s: %s", bundle.path, error)
        return None
    return key.key_id


def sign_bundle(path: str | Path, key: Any) -> SignatureStatus:
    """Sign the bundle directory at ``path`` with the private ``key`` (a path or a :class:`PrivateKey`).

    Every file is checked against the manifest first; the signature is written to
    ``signature.dsse.json`` (replacing an older one) and a stale device signature is removed.

    Raises:
        BundleError: the bundle is not a verified bundle directory; KeyFileError: unusable key.
    """
    from edgeadapt.device.bundle import Bundle
    from edgeadapt.device.keys import load_private_key
    from edgeadapt.device.manifest import utc_timestamp
    from edgeadapt.device.versions import VersionStore

    private = key if hasattr(key, "sign") else load_private_key(key)
    location = Path(path)
    if not location.is_dir():
        raise BundleError(f"{location} is not a bundle directory; sign the folder (unpack a packed bundle first), "
                          "or sign a single file with `edgeadapt sign-file`")
    from edgeadapt.device.safefs import check_tree

    check_tree(location)  # no link or special file anywhere, as on every open
    bundle = Bundle(location, VersionStore(location).read_manifest())
    bundle.verify()  # sign only what is on disk (no signature check: this may be a re-sign)
    data = bundle.manifest.data
    section = {"kind": "bundle", "bundle_id": data.get("bundle_id"), "name": data.get("name"),
               "version": bundle.manifest.version, "backbone": data.get("backbone"), "input": data.get("input"),
               "embedding_size": data.get("embedding_size"), "signed_at": utc_timestamp()}
    payload = build_statement(str(data.get("name") or location.name), bundle_resources(bundle, _manifest_bytes(bundle)),
                              section, BUNDLE_IGNORE_PATHS)
    durable_write(location / SIGNATURE_NAME, make_envelope(payload, private))
    (location / DEVICE_SIGNATURE_NAME).unlink(missing_ok=True)
    return SignatureStatus("signed", private.key_id, private.source, verified=True,
                           signed_version=bundle.manifest.version,
                           statement_sha256=hashlib.sha256(payload).hexdigest())


# ----------------------------------------------------------------------------- device versions
def chain_manifest(bundle_path: str | Path, current: Any, new: Any) -> Any:
    """Record in ``new`` (the next device version) the signed statement it derives from.

    Called by the head updater before each commit. When ``current`` is the publisher-signed
    version, or already derives from it, ``new.data["derived_from"]`` names the statement;
    otherwise a stale ``derived_from`` is dropped. Needs no keys and no ``cryptography``.
    """
    path = Path(bundle_path)
    try:
        envelope = read_envelope(path / SIGNATURE_NAME)
        if envelope is None:
            new.data.pop("derived_from", None)
            return new
        statement = envelope.statement()
        manifest_data = _read_manifest_file(path)
    except (BundleError, OSError) as error:  # SignatureError included
        logger.warning("not recording a signed base for the new version of %s: %s", path, error)
        new.data.pop("derived_from", None)
        return new
    section = statement["predicate"]["edgeadapt"]
    signed_current = hashlib.sha256(manifest_data).hexdigest() == statement["_resources"].get(MANIFEST_RESOURCE) \
        and json.loads(manifest_data) == current.stored_document()
    already = (current.data.get("derived_from") or {}).get("statement_sha256") == envelope.statement_sha256
    if signed_current or already:
        new.data["derived_from"] = {"statement_sha256": envelope.statement_sha256,
                                    "signed_version": section.get("version"), "signer": envelope.key_ids[0]}
    else:
        new.data.pop("derived_from", None)
    return new


def sign_device_version(bundle_path: str | Path, key: Any) -> str:
    """Sign the current (device-committed) version with a device key; returns the key id."""
    from edgeadapt.device.bundle import Bundle
    from edgeadapt.device.keys import load_private_key
    from edgeadapt.device.manifest import utc_timestamp
    from edgeadapt.device.versions import VersionStore

    private = key if hasattr(key, "sign") else load_private_key(key)
    path = Path(bundle_path)
    bundle = Bundle(path, VersionStore(path).read_manifest())
    data = bundle.manifest.data
    section = {"kind": "device-version", "bundle_id": data.get("bundle_id"), "version": bundle.manifest.version,
               "derived_from": data.get("derived_from"), "signed_at": utc_timestamp()}
    payload = build_statement(str(data.get("name") or path.name), bundle_resources(bundle, _manifest_bytes(bundle)),
                              section, BUNDLE_IGNORE_PATHS)
    durable_write(path / DEVICE_SIGNATURE_NAME, make_envelope(payload, private))
    return private.key_id


@dataclass
class UpdaterSigning:
    """The head updater's signing hooks: the chain record before a commit, the device signature after."""

    path: Path
    device_key: Any = None

    @classmethod
    def create(cls, runtime: Any, trusted_keys: Any = None, device_key: Any = None) -> "UpdaterSigning":
        """Check the runtime's bundle against ``trusted_keys`` (if any) and load ``device_key`` (if given).

        Raises:
            SignatureError: the bundle fails the check, or the device key is unusable.
        """
        from edgeadapt.device.bundle import Bundle
        from edgeadapt.device.keys import load_private_key
        from edgeadapt.device.versions import VersionStore

        path = Path(runtime.bundle.path)
        if trusted_keys is not None or getattr(runtime.bundle, "signature", None) is None:
            from edgeadapt.device.trust import resolve_trusted_keys

            trusted = resolve_trusted_keys(trusted_keys)
            if trusted is not None:  # check the version on disk now (another process may have committed)
                bundle = Bundle(path, VersionStore(path).read_manifest())
                check_bundle_signature(bundle, trusted, files_verified=False)
        key = load_private_key(device_key) if device_key is not None and not hasattr(device_key, "sign") else device_key
        return cls(path, key)

    def chain(self, current: Any, new: Any) -> Any:
        return chain_manifest(self.path, current, new)

    def after_commit(self) -> None:
        """Sign the version just committed with the device key (a failure leaves it committed, unsigned)."""
        if self.device_key is not None:
            try:
                sign_device_version(self.path, self.device_key)
            except (OSError, SignatureError) as error:
                logger.error("version committed in %s but the device signature could not be written: %s",
                             self.path, error)


# ----------------------------------------------------------------------------- deltas and single files
def sign_members(members: Mapping[str, bytes], key: Any, info: Mapping[str, Any]) -> bytes:
    """The envelope that signs every member of a delta zip (``signature.dsse.json`` member)."""
    resources = {name: hashlib.sha256(data).hexdigest() for name, data in members.items()}
    section = {"kind": "delta", "source": info.get("source"), "bundle_id": info.get("bundle_id"),
               "device_version": info.get("device_version"), "signed_at": info.get("created_at")}
    return make_envelope(build_statement(str(info.get("source") or "delta"), resources, section), key)


def verify_delta_signature(envelope_data: bytes | None, metadata: bytes, info: Mapping[str, Any],
                           trusted_keys: Any, source: str) -> str | None:
    """Check a delta zip's ``signature.dsse.json`` member; returns the signer's key id.

    The statement must cover exactly ``delta.json`` (``metadata``, its raw bytes) and the
    members it lists with their sha256. :func:`~edgeadapt.device.delta.read_delta` checks each
    member against ``delta.json`` before use, so every member is authenticated through it.

    Args:
        envelope_data: The content of the signature member (read size-capped by the caller),
            or None when the delta has none.
        metadata: The raw bytes of ``delta.json``.
        info: ``delta.json`` parsed and schema-checked.
        trusted_keys: Enrolled device keys (see :func:`edgeadapt.device.trust.resolve_trusted_keys`).
        source: The delta's path, for messages.

    Returns:
        The key id, or None when ``trusted_keys`` is None. Unlike bundles, deltas are never
        checked against ``$EDGEADAPT_TRUST_DIR``: that folder holds publisher keys, while
        deltas are signed by enrolled device keys given explicitly.

    Raises:
        SignatureError: unsigned, malformed, unknown signer, bad signature or changed member.
    """
    from edgeadapt.device.trust import resolve_trusted_keys

    if trusted_keys is None:
        return None
    trusted = resolve_trusted_keys(trusted_keys)
    if envelope_data is None:
        raise UnsignedError(f"{source} is not signed by a device key, but only enrolled devices are accepted "
                            f"({trusted.describe()}). Refusing it; export it with --device-key")
    envelope = parse_envelope(envelope_data, f"{source}:{SIGNATURE_NAME}")
    key = envelope.verify(trusted)
    statement = envelope.statement()
    check_kind(statement, "delta", envelope.source)
    files = info.get("files")
    if not isinstance(files, dict) or not all(isinstance(entry, dict) for entry in files.values()):
        raise ChangedAfterSigningError(f"{source}: delta.json has no valid files table. Refusing it")
    actual = {name: str(entry.get("sha256")) for name, entry in files.items()}
    actual["delta.json"] = hashlib.sha256(metadata).hexdigest()
    compare_resources(statement["_resources"], actual, source)
    return key.key_id


def sign_file(path: str | Path, key: Any) -> Path:
    """Sign one file (e.g. a fused ``.tflite``/``.onnx``); writes ``PATH.dsse.json`` beside it."""
    from edgeadapt.device.keys import load_private_key
    from edgeadapt.device.manifest import utc_timestamp

    private = key if hasattr(key, "sign") else load_private_key(key)
    path = Path(path)
    if not path.is_file():
        raise SignatureError(f"{path} is not a file")
    payload = build_statement(path.name, {path.name: sha256_and_size(path)[0]}, {"kind": "file", "signed_at": utc_timestamp()})
    output = path.with_name(path.name + FILE_SIGNATURE_SUFFIX)
    durable_write(output, make_envelope(payload, private))
    return output


def verify_file(path: str | Path, trusted_keys: Any, signature: str | Path | None = None) -> str:
    """Check ``PATH.dsse.json`` (or ``signature``) against the file; returns the signer's key id.

    Raises:
        SignatureError: no keys configured, unsigned, malformed, unknown signer, bad signature, changed file.
    """
    from edgeadapt.device.trust import resolve_trusted_keys

    path = Path(path)
    trusted = resolve_trusted_keys(trusted_keys)
    if trusted is None:
        raise SignatureError("checking a file signature needs trusted keys (--trust KEYFILE or $EDGEADAPT_TRUST_DIR)")
    signature_path = Path(signature) if signature else path.with_name(path.name + FILE_SIGNATURE_SUFFIX)
    envelope = read_envelope(signature_path)
    if envelope is None:
        raise UnsignedError(f"{path} has no signature {signature_path.name}. Refusing it")
    key = envelope.verify(trusted)
    statement = envelope.statement()
    check_kind(statement, "file", envelope.source)
    compare_resources(statement["_resources"], {path.name: sha256_and_size(path)[0]}, str(path))
    return key.key_id
