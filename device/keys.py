"""Ed25519 key files for signing bundles and deltas (needs the ``signing`` extra: ``cryptography``).

Key files are PEM, so ``openssl pkey -in KEY.pem -pubout`` and every TLS library read them:

- private key: ``NAME.key`` -- PKCS#8 ``-----BEGIN PRIVATE KEY-----``, unencrypted, mode 0600;
- public key: ``NAME.pub`` -- SubjectPublicKeyInfo ``-----BEGIN PUBLIC KEY-----``.

A key is named by its *key id*: the first 32 hex digits of the sha256 of the 32 raw public-key
bytes (also written into every signature as the DSSE ``keyid``).

Private key files that other users can read are refused: whoever can read the key can sign.
Public key files that other users can write are refused too: whoever can replace a trusted key
can make the device trust anything.
"""

from __future__ import annotations

import functools
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from edgeadapt.device.errors import KeyFileError, SignatureError
from edgeadapt.device.safefs import durable_write

PRIVATE_SUFFIX = ".key"
PUBLIC_SUFFIX = ".pub"
_PRIVATE_MARKERS = (b"PRIVATE KEY-----",)
_PUBLIC_MARKER = b"-----BEGIN PUBLIC KEY-----"
_MAX_KEY_FILE_BYTES = 16 << 10


@functools.lru_cache(maxsize=1)
def crypto() -> Any:
    """The ``cryptography`` Ed25519 and serialisation modules (imported on first use).

    Raises:
        SignatureError: ``cryptography`` is not installed.
    """
    try:
        from cryptography import exceptions
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as error:
        raise SignatureError(
            "signing and signature checks need the 'cryptography' package: pip install 'edgeadapt[signing]' "
            f"({error})"
        ) from error

    return SimpleNamespace(ed25519=ed25519, serialization=serialization, InvalidSignature=exceptions.InvalidSignature)


def public_key_id(public_key: Any) -> str:
    """Key id of an Ed25519 public key: 32 hex digits of the sha256 of its 32 raw bytes."""
    serialization = crypto().serialization
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:32]


@dataclass(frozen=True)
class PublicKey:
    """A trusted Ed25519 public key, its key id and where it came from (for messages)."""

    key: Any
    key_id: str
    source: str

    def verify(self, signature: bytes, message: bytes) -> bool:
        """True when ``signature`` is this key's Ed25519 signature of ``message``."""
        try:
            self.key.verify(signature, message)
        except crypto().InvalidSignature:
            return False
        return True


@dataclass(frozen=True)
class PrivateKey:
    """An Ed25519 private key loaded from a key file."""

    key: Any
    key_id: str
    source: str

    def sign(self, message: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``message``."""
        return self.key.sign(message)

    def public(self) -> PublicKey:
        return PublicKey(self.key.public_key(), self.key_id, self.source)


def _read_key_file(path: Path, what: str) -> bytes:
    try:
        status = path.stat()
    except FileNotFoundError as error:
        raise KeyFileError(f"{what} {str(path)!r} does not exist") from error
    except OSError as error:
        raise KeyFileError(f"cannot read {what} {str(path)!r}: {error}") from error
    if not stat.S_ISREG(status.st_mode):
        raise KeyFileError(f"{what} {str(path)!r} is not a regular file")
    if status.st_size > _MAX_KEY_FILE_BYTES:
        raise KeyFileError(f"{what} {str(path)!r} is {status.st_size} bytes; a PEM Ed25519 key is about 120 bytes")
    try:
        return path.read_bytes()
    except OSError as error:
        raise KeyFileError(f"cannot read {what} {str(path)!r}: {error}") from error


def _check_private_permissions(path: Path) -> None:
    if os.name != "posix":
        return
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise KeyFileError(
            f"private key {str(path)!r} has open permissions ({mode:04o}): other users could read it and sign "
            f"as you. Refusing it; run `chmod 600 {path}`"
        )


def check_not_world_writable(path: Path, what: str) -> None:
    """Refuse a trust file or folder that users other than its owner may change.

    Raises:
        KeyFileError: ``path`` is writable by its group or by everyone.
    """
    if os.name != "posix":
        return
    mode = path.stat().st_mode & 0o777
    if mode & 0o022:
        raise KeyFileError(
            f"{what} {str(path)!r} is writable by other users ({mode:04o}): anyone could replace the keys the "
            f"device trusts. Refusing it; run `chmod go-w {path}`"
        )


def load_private_key(path: str | Path) -> PrivateKey:
    """Load an Ed25519 private key file (PEM PKCS#8, unencrypted, mode 0600).

    Raises:
        KeyFileError: missing, unreadable, open permissions, a public key, or not an Ed25519 PEM key.
    """
    path = Path(path)
    data = _read_key_file(path, "private key")
    if _PUBLIC_MARKER in data:
        raise KeyFileError(f"{str(path)!r} is a public key; signing needs the private key file (NAME{PRIVATE_SUFFIX})")
    _check_private_permissions(path)
    modules = crypto()
    try:
        key = modules.serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as error:
        raise KeyFileError(f"{str(path)!r} is not an unencrypted PEM private key: {error}") from error
    if not isinstance(key, modules.ed25519.Ed25519PrivateKey):
        raise KeyFileError(f"{str(path)!r} holds a {type(key).__name__}; edgeadapt signs with Ed25519 keys only "
                           "(edgeadapt keys generate)")
    return PrivateKey(key, public_key_id(key.public_key()), str(path))


def load_public_key(path: str | Path) -> PublicKey:
    """Load an Ed25519 public key file (PEM SubjectPublicKeyInfo).

    Raises:
        KeyFileError: missing, unreadable, writable by others, a private key, or not an Ed25519 public key.
    """
    path = Path(path)
    data = _read_key_file(path, "public key")
    if any(marker in data for marker in _PRIVATE_MARKERS):
        raise KeyFileError(
            f"{str(path)!r} is a private key, but a public key is expected here: give the matching "
            f"NAME{PUBLIC_SUFFIX} file, and keep the private key off the device"
        )
    check_not_world_writable(path, "public key")
    modules = crypto()
    try:
        key = modules.serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as error:
        raise KeyFileError(f"{str(path)!r} is not a PEM public key: {error}") from error
    if not isinstance(key, modules.ed25519.Ed25519PublicKey):
        raise KeyFileError(f"{str(path)!r} holds a {type(key).__name__}; edgeadapt verifies Ed25519 keys only")
    return PublicKey(key, public_key_id(key), str(path))


def generate_keypair(output_dir: str | Path, name: str = "signing", overwrite: bool = False) -> tuple[Path, Path]:
    """Write a new Ed25519 key pair: ``DIR/NAME.key`` (mode 0600) and ``DIR/NAME.pub``.

    Args:
        output_dir: folder for the two files (created with mode 0700 when missing).
        name: file name stem.
        overwrite: replace existing key files (never by default: a lost key cannot be recovered).

    Returns:
        The private and public key paths.

    Raises:
        KeyFileError: a key file exists already, or the name is not a plain file name.
    """
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise KeyFileError(f"key name {name!r} must be a plain file name")
    folder = Path(output_dir)
    private_path, public_path = folder / f"{name}{PRIVATE_SUFFIX}", folder / f"{name}{PUBLIC_SUFFIX}"
    for path in (private_path, public_path):
        if path.exists() and not overwrite:
            raise KeyFileError(f"{path} exists; choose another --out/--name or pass --overwrite (the old key is lost)")
    modules = crypto()
    serialization = modules.serialization
    key = modules.ed25519.Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    _write_new(private_path, private_pem, 0o600)
    _write_new(public_path, public_pem, 0o644)
    return private_path, public_path


def _write_new(path: Path, data: bytes, mode: int) -> None:
    durable_write(path, data, mode=mode)  # exactly ``mode``: the umask may only have removed bits
