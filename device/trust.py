"""Which public keys a device (or the host, for device deltas) trusts.

Keys come from key files (``--trust KEYFILE``, repeatable), from ``trusted_keys=[...]`` in
Python, or from a trust folder named by the environment variable ``EDGEADAPT_TRUST_DIR``
(every ``*.pub`` file in it). An explicit list wins over the folder. With no keys at all
nothing is verified (today's behaviour), and ``inspect`` reports "unsigned" / "signature not
checked".
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Union

from edgeadapt.device.errors import KeyFileError
from edgeadapt.device.keys import PUBLIC_SUFFIX, PublicKey, check_not_world_writable, load_public_key

TRUST_DIR_ENV = "EDGEADAPT_TRUST_DIR"
TrustInput = Union["TrustedKeys", str, Path, PublicKey, Iterable[Union[str, Path, PublicKey]], bool, None]
#: ``trusted_keys=NO_SIGNATURE_CHECK``: no signature check, whatever ``EDGEADAPT_TRUST_DIR`` says (the
#: host's own opens of bundles it has just written, packing, which carries signatures unchecked).
NO_SIGNATURE_CHECK = False


@dataclass
class TrustedKeys:
    """A set of trusted Ed25519 public keys.

    ``require_device_signature``: refuse a device-derived version (a head committed on the
    device after the publisher signed the bundle) unless a trusted key signed it too (see
    docs/SIGNING.md, "Device versions").
    """

    keys: dict[str, PublicKey] = field(default_factory=dict)
    require_device_signature: bool = False

    def __len__(self) -> int:
        return len(self.keys)

    def get(self, key_id: str) -> PublicKey | None:
        """The trusted key with this key id, or None."""
        return self.keys.get(key_id)

    def add(self, key: PublicKey) -> None:
        """Trust ``key`` (a key already trusted is kept once)."""
        self.keys.setdefault(key.key_id, key)

    def describe(self) -> str:
        """The trusted key ids and their files, for messages."""
        return ", ".join(f"{key_id} ({Path(key.source).name})" for key_id, key in self.keys.items()) or "none"

    @classmethod
    def from_files(cls, paths: Iterable[str | Path], require_device_signature: bool = False) -> "TrustedKeys":
        """Load public key files; a folder stands for every ``*.pub`` file in it.

        Raises:
            KeyFileError: a file is unusable (private key, open permissions, not Ed25519), or a
                folder holds no public keys.
        """
        trusted = cls(require_device_signature=require_device_signature)
        for item in paths:
            path = Path(item)
            if path.is_dir():
                for key in load_trust_dir(path).keys.values():
                    trusted.add(key)
            else:
                trusted.add(load_public_key(path))
        return trusted


def load_trust_dir(folder: str | Path) -> TrustedKeys:
    """Every ``*.pub`` key in ``folder`` (the folder and its files must not be writable by others).

    Raises:
        KeyFileError: the folder is missing, writable by others, empty, or holds an unusable key.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise KeyFileError(f"trust folder {str(folder)!r} does not exist or is not a folder")
    check_not_world_writable(folder, "trust folder")
    trusted = TrustedKeys()
    for path in sorted(folder.iterdir()):
        if path.suffix == PUBLIC_SUFFIX and not path.name.startswith("."):
            trusted.add(load_public_key(path))
    if not trusted.keys:
        raise KeyFileError(f"trust folder {folder} holds no {PUBLIC_SUFFIX} public key files")
    return trusted


def resolve_trusted_keys(trusted_keys: TrustInput) -> TrustedKeys | None:
    """The trusted keys to check against, or None when none are configured.

    ``trusted_keys`` may be a :class:`TrustedKeys`, key file paths (a folder: all its ``*.pub``),
    or loaded :class:`PublicKey` objects. When it is None the folder named by
    ``EDGEADAPT_TRUST_DIR`` is used if that variable is set; :data:`NO_SIGNATURE_CHECK`
    (False) means no check at all. An empty list means "trust nothing" and refuses
    everything signed or not.

    Raises:
        KeyFileError: a key file or the trust folder is unusable.
    """
    if trusted_keys is NO_SIGNATURE_CHECK:
        return None
    if trusted_keys is None:
        folder = os.environ.get(TRUST_DIR_ENV)
        return load_trust_dir(folder) if folder else None
    if isinstance(trusted_keys, TrustedKeys):
        return trusted_keys
    if isinstance(trusted_keys, (str, Path, PublicKey)):
        trusted_keys = [trusted_keys]
    trusted = TrustedKeys()
    paths = []
    for item in trusted_keys:
        if isinstance(item, PublicKey):
            trusted.add(item)
        else:
            paths.append(item)
    for key in TrustedKeys.from_files(paths).keys.values():
        trusted.add(key)
    return trusted


# ----------------------------------------------------------------------------- command line
def add_trust_arguments(parser: argparse.ArgumentParser, what: str = "bundles", note: str = "",
                        device_versions: bool = True) -> None:
    """Add ``--trust KEYFILE`` (repeatable) and ``--require-device-signature`` to a sub-command.

    Args:
        parser: The sub-command's parser.
        what: What the keys check, for the help text.
        note: Appended to the help text.
        device_versions: Also add ``--require-device-signature`` (commands that open bundles).

    Returns:
        None.
    """
    parser.add_argument("--trust", action="append", type=Path, metavar="KEYFILE",
                        help=f"trusted public key file (or folder of *.pub files); repeatable. Refuses {what} "
                        f"that are unsigned or signed by other keys{note} (default: the folder in ${TRUST_DIR_ENV} "
                        "if set, else no signature check)")
    if not device_versions:
        return
    parser.add_argument("--require-device-signature", action="store_true",
                        help="with trusted keys: also refuse head versions committed on a device unless a "
                        "trusted device key signed them (default: accept them when the signed backbone and "
                        "publisher files are untouched)")


def trusted_keys_from_arguments(arguments: argparse.Namespace) -> TrustedKeys | None:
    """The trusted keys a command line asked for (``--trust``, else ``EDGEADAPT_TRUST_DIR``), or None."""
    paths = getattr(arguments, "trust", None)
    trusted = resolve_trusted_keys(list(paths) if paths else None)
    if trusted is not None and getattr(arguments, "require_device_signature", False):
        trusted.require_device_signature = True
    return trusted


def describe_trust(trusted: Any) -> str:
    """One line naming the trusted keys (for logs and errors)."""
    return trusted.describe() if isinstance(trusted, TrustedKeys) else "none"
