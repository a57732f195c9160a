"""Signing sub-commands shared by both CLIs: ``keys generate`` and ``verify``.

``edgeadapt-device keys generate --out DIR`` makes a device key (it signs the device's
versions and deltas); ``edgeadapt keys generate`` makes a publisher key. ``verify`` checks a
bundle, delta or single file against trusted keys and names the signer. Needs the
``signing`` extra (``cryptography``); registered through ``COMMAND_MODULES``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from edgeadapt.device.cli_common import add_json_options, emit_report
from edgeadapt.device.errors import SignatureError
from edgeadapt.device.trust import add_trust_arguments, trusted_keys_from_arguments


def _keys_generate(arguments: argparse.Namespace) -> int:
    from edgeadapt.device.keys import generate_keypair, load_public_key

    private_path, public_path = generate_keypair(arguments.out, name=arguments.name, overwrite=arguments.overwrite)
    key_id = load_public_key(public_path).key_id
    text = (f"private key {private_path} (mode 0600: keep it secret; it never goes on a device that only verifies)\n"
            f"public key  {public_path} (give this to whoever verifies: --trust {public_path})\n"
            f"key id      {key_id}")
    emit_report(arguments, text, {"private_key": str(private_path), "public_key": str(public_path), "key_id": key_id})
    return 0


def _verify(arguments: argparse.Namespace) -> int:
    from edgeadapt.device.delta import DELTA_SUFFIX, read_delta
    from edgeadapt.device.signing import verify_file

    trusted = trusted_keys_from_arguments(arguments)
    if trusted is None:
        raise SignatureError("verify needs trusted keys: --trust KEYFILE (repeatable) or $EDGEADAPT_TRUST_DIR")
    path: Path = arguments.path
    if path.suffix == DELTA_SUFFIX:
        delta = read_delta(path, trusted_keys=trusted)
        result = {"path": str(path), "kind": "delta", "state": "signed", "signer": delta.signer,
                  "source": delta.source}
        line = f"{path}: delta from {delta.source!r} signed by {delta.signer}"
    elif path.is_dir() or path.suffix == ".zip":
        from edgeadapt.device.bundle import Bundle

        with Bundle.open(path, trusted_keys=trusted) as bundle:  # a packed bundle's copy is removed afterwards
            status = bundle.signature
        result = {"path": str(path), "kind": "bundle", "state": status.state, "signer": status.signer,
                  "device_signer": status.device_signer, "statement_sha256": status.statement_sha256}
        line = f"{path}: {status.describe()}"
    else:
        signer = verify_file(path, trusted, signature=arguments.signature)
        result = {"path": str(path), "kind": "file", "state": "signed", "signer": signer}
        line = f"{path}: signed by {signer}"
    emit_report(arguments, line, result)
    return 0


def register_keys(subparsers: argparse._SubParsersAction, default_name: str) -> None:
    """``keys generate --out DIR [--name NAME]``."""
    keys = subparsers.add_parser("keys", help="create Ed25519 signing keys",
                                 description="Manage Ed25519 signing keys (docs/SIGNING.md).")
    actions = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    generate = actions.add_parser("generate", help="write a new key pair: NAME.key (0600) and NAME.pub",
                                  description="Write a new Ed25519 key pair: DIR/NAME.key (PEM PKCS#8, mode 0600) "
                                  "and DIR/NAME.pub (PEM public key).")
    generate.add_argument("--out", type=Path, required=True, help="folder for the key files (created with mode 0700)")
    generate.add_argument("--name", default=default_name, help="file name stem")
    generate.add_argument("--overwrite", action="store_true", help="replace existing key files (the old key is lost)")
    add_json_options(generate, "the key file paths and key id")
    generate.set_defaults(handler=_keys_generate)


def register_verify(subparsers: argparse._SubParsersAction) -> None:
    """``verify PATH --trust KEYFILE``: a bundle, a delta (.eadelta) or a signed single file."""
    verify = subparsers.add_parser("verify", help="check a signed bundle, delta or file and name its signer",
                                   description="Check the signature of a bundle directory/packed bundle, a delta "
                                   "(.eadelta) or a single signed file (FILE.dsse.json beside it) against trusted "
                                   "keys. Exits with status 1 and names what failed when the check fails.")
    verify.add_argument("path", type=Path, help="bundle (NAME.eab or .zip), delta (.eadelta) or file")
    verify.add_argument("--signature", type=Path, help="single files: signature file (default: PATH.dsse.json)")
    add_json_options(verify, "the result")
    add_trust_arguments(verify)
    verify.set_defaults(handler=_verify)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Device CLI: ``keys generate`` (default name "device") and ``verify``."""
    register_keys(subparsers, default_name="device")
    register_verify(subparsers)
