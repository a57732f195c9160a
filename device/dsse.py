"""The signature format: DSSE envelopes around in-toto statements (stdlib only).

Used by :mod:`edgeadapt.device.signing`; docs/SIGNING.md describes the bytes. Parsing and
the statement checks need no ``cryptography``; :meth:`Envelope.verify` uses the keys' own
``verify`` (``cryptography`` Ed25519).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from edgeadapt.device.errors import (
    BadSignatureError,
    BundleError,
    ChangedAfterSigningError,
    MalformedSignatureError,
    SignatureError,
    UnknownSignerError,
)
from edgeadapt.device.safefs import read_regular

PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://model_signing/signature/v1.0"
EDGEADAPT_FORMAT = "edgeadapt-signature"
EDGEADAPT_FORMAT_VERSION = 1
KINDS = ("bundle", "device-version", "delta", "file")
#: The publisher's signature of a bundle (in the bundle folder) and of nothing else; also the
#: signature member of a delta zip.
SIGNATURE_NAME = "signature.dsse.json"
#: A device key's signature of a version committed on the device (in the bundle folder).
DEVICE_SIGNATURE_NAME = "device-signature.dsse.json"
#: Largest signature file or member read or written (a bundle of about 5000 files; the
#: packed-bundle and delta readers refuse a larger member before inflating it).
MAX_SIGNATURE_BYTES = 1 << 20
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE pre-authentication encoding: the exact bytes that are signed."""
    kind = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no spaces, ASCII only: the byte form of every signed statement."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def root_digest(resources: Mapping[str, str]) -> str:
    """sha256 over the raw 32-byte digests of ``resources`` in name order (the model-signing subject)."""
    digest = hashlib.sha256()
    for name in sorted(resources):
        digest.update(bytes.fromhex(resources[name]))
    return digest.hexdigest()


def build_statement(name: str, resources: Mapping[str, str], edgeadapt: Mapping[str, Any],
                    ignore_paths: tuple[str, ...] = ()) -> bytes:
    """The canonical in-toto statement over ``resources`` (name -> sha256 hex)."""
    statement = {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": name, "digest": {"sha256": root_digest(resources)}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "serialization": {"method": "files", "hash_type": "sha256", "allow_symlinks": False,
                              "ignore_paths": list(ignore_paths)},
            "resources": [{"name": key, "algorithm": "sha256", "digest": resources[key]} for key in sorted(resources)],
            "edgeadapt": {"format": EDGEADAPT_FORMAT, "format_version": EDGEADAPT_FORMAT_VERSION, **edgeadapt},
        },
    }
    return canonical_json(statement)


def make_envelope(payload: bytes, key: Any) -> bytes:
    """A DSSE envelope (JSON, UTF-8) with one Ed25519 signature by ``key`` (a :class:`PrivateKey`)."""
    signature = key.sign(pae(PAYLOAD_TYPE, payload))
    envelope = {"payloadType": PAYLOAD_TYPE, "payload": base64.b64encode(payload).decode("ascii"),
                "signatures": [{"keyid": key.key_id, "sig": base64.b64encode(signature).decode("ascii")}]}
    data = (json.dumps(envelope, indent=2, sort_keys=True) + "\n").encode("utf-8")
    if len(data) > MAX_SIGNATURE_BYTES:
        raise SignatureError(f"the signature would be {len(data)} bytes, more than the {MAX_SIGNATURE_BYTES} a reader "
                             "accepts: the bundle lists too many files to sign; pack fewer files into it")
    return data


@dataclass(frozen=True)
class Envelope:
    """A parsed (not yet verified) envelope: the payload bytes and its (key id, signature) pairs."""

    payload: bytes
    signatures: tuple[tuple[str, bytes], ...]
    source: str

    @property
    def statement_sha256(self) -> str:
        """sha256 of the payload bytes: how device versions and documents refer to this statement."""
        return hashlib.sha256(self.payload).hexdigest()

    @property
    def key_ids(self) -> list[str]:
        return [key_id for key_id, _ in self.signatures]

    def statement(self) -> dict:
        """The statement, structurally checked (call after :meth:`verify` for a trusted one)."""
        return _parse_statement(self.payload, self.source)

    def verify(self, trusted: Any) -> Any:
        """The trusted :class:`~edgeadapt.device.keys.PublicKey` whose signature verifies.

        Raises:
            UnknownSignerError: no signature is by a trusted key.
            BadSignatureError: a trusted key id is named but its signature does not verify.
        """
        message = pae(PAYLOAD_TYPE, self.payload)
        named = [(trusted.get(key_id), signature) for key_id, signature in self.signatures]
        for key, signature in named:
            if key is not None and key.verify(signature, message):
                return key
        if any(key is not None for key, _ in named):
            raise BadSignatureError(
                f"{self.source}: the signature by trusted key {self.key_ids} does not verify: the signed statement "
                "or the signature was altered. Refusing it; get a freshly signed copy from the publisher")
        for key in trusted.keys.values():  # a key id written by another tool
            for _, signature in self.signatures:
                if key.verify(signature, message):
                    return key
        raise UnknownSignerError(
            f"{self.source} is signed by key {', '.join(self.key_ids) or '?'}, which is not among the trusted keys "
            f"({trusted.describe()}). Refusing it; enrol the signer's public key (--trust, $EDGEADAPT_TRUST_DIR, or the "
            "host's --trust-devices folder) only if you trust it")


def parse_envelope(data: bytes, source: str) -> Envelope:
    """Parse a DSSE envelope.

    Raises:
        MalformedSignatureError: not JSON, truncated, wrong payload type, bad base64, no signatures.
    """
    if len(data) > MAX_SIGNATURE_BYTES:
        raise MalformedSignatureError(f"{source} is {len(data)} bytes: not a signature file")
    try:
        envelope = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise MalformedSignatureError(
            f"{source} is not a readable signature (truncated or garbage: {error}). Refusing it; re-sign the "
            "bundle (edgeadapt sign) or re-copy it") from error
    try:
        if envelope.get("payloadType") != PAYLOAD_TYPE:
            raise MalformedSignatureError(
                f"{source} has payloadType {envelope.get('payloadType')!r}, expected {PAYLOAD_TYPE!r}")
        payload = base64.b64decode(envelope["payload"], validate=True)
        signatures = tuple((str(item["keyid"]), base64.b64decode(item["sig"], validate=True))
                           for item in envelope["signatures"])
    except MalformedSignatureError:
        raise
    except (AttributeError, KeyError, TypeError, ValueError, binascii.Error) as error:
        raise MalformedSignatureError(f"{source} is not a DSSE signature envelope ({type(error).__name__}: {error}); "
                                      "re-sign the bundle (edgeadapt sign) or re-copy it") from error
    if not signatures or any(len(signature) != 64 for _, signature in signatures):
        raise MalformedSignatureError(f"{source} holds no Ed25519 signature (64 bytes); re-sign or re-copy it")
    return Envelope(payload, signatures, source)


def _parse_statement(payload: bytes, source: str) -> dict:
    try:
        statement = json.loads(payload.decode("utf-8"))
        predicate = statement["predicate"]
        resources = {item["name"]: item["digest"] for item in predicate["resources"]
                     if item.get("algorithm") == "sha256"}
        kind = predicate["edgeadapt"]["kind"]
        subject = statement["subject"][0]["digest"]["sha256"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError) as error:
        raise MalformedSignatureError(f"{source}: the signed statement is not an edgeadapt statement ({error})") from error
    if statement.get("_type") != STATEMENT_TYPE or statement.get("predicateType") != PREDICATE_TYPE:
        raise MalformedSignatureError(f"{source}: statement type {statement.get('_type')!r} / "
                                      f"{statement.get('predicateType')!r} is not {STATEMENT_TYPE} / {PREDICATE_TYPE}")
    if kind not in KINDS or len(resources) != len(predicate["resources"]) \
            or not all(isinstance(value, str) and _HEX64.match(value) for value in resources.values()):
        raise MalformedSignatureError(f"{source}: the statement's resources or kind {kind!r} are malformed")
    if root_digest(resources) != subject:
        raise MalformedSignatureError(f"{source}: the statement's subject digest does not match its resources")
    statement["_resources"] = resources
    return statement


def check_kind(statement: dict, kind: str, source: str) -> dict:
    section = statement["predicate"]["edgeadapt"]
    if section.get("kind") != kind:
        raise BadSignatureError(f"{source} signs a {section.get('kind')!r}, not a {kind!r}: a signature was moved "
                                "from another artefact. Refusing it")
    return section


def read_envelope(path: Path) -> Envelope | None:
    """The envelope stored at ``path``, or None when there is none.

    The file is read without following a symlink and refused above :data:`MAX_SIGNATURE_BYTES`.

    Raises:
        MalformedSignatureError: the file exists but is not a (readable) signature.
    """
    if not os.path.lexists(path):
        return None
    try:
        data = read_regular(path, MAX_SIGNATURE_BYTES, "signature file")
    except BundleError as error:
        raise MalformedSignatureError(f"{error}; re-sign or re-copy it") from error
    return parse_envelope(data, str(path))


def compare_resources(resources: Mapping[str, str], actual: Mapping[str, str], where: str) -> None:
    for name in sorted(set(resources) | set(actual)):
        if name not in actual:
            raise ChangedAfterSigningError(f"{where}: signed file {name!r} was removed after signing. Refusing it")
        if name not in resources:
            raise ChangedAfterSigningError(f"{where}: file {name!r} was added after signing (not signed). Refusing it")
        if resources[name] != actual[name]:
            raise ChangedAfterSigningError(f"{where}: {name!r} changed after signing (sha256 {actual[name][:16]}... "
                                           f"!= signed {resources[name][:16]}...). Refusing it")
