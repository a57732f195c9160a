"""``edgeadapt keys generate``, ``edgeadapt sign``, ``edgeadapt sign-file`` and ``edgeadapt verify``.

The publisher signs a bundle with one command, also after a host merge (``merge-deltas``
writes a new, unsigned bundle: sign it again). See docs/SIGNING.md. No TensorFlow needed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from edgeadapt.device.cli_common import add_json_options, emit_report
from edgeadapt.device.cli_signing import register_keys, register_verify


def _sign(arguments: argparse.Namespace) -> int:
    from edgeadapt.device.signing import sign_bundle

    status = sign_bundle(arguments.bundle, arguments.key)
    text = (f"signed {arguments.bundle} (version {status.signed_version}) with key {status.signer}; "
            f"statement sha256 {status.statement_sha256}")
    emit_report(arguments, text, {"bundle": str(arguments.bundle), "signer": status.signer,
                                  "version": status.signed_version, "statement_sha256": status.statement_sha256})
    return 0


def _sign_file(arguments: argparse.Namespace) -> int:
    from edgeadapt.device.signing import sign_file

    output = sign_file(arguments.file, arguments.key)
    emit_report(arguments, f"wrote {output}", {"file": str(arguments.file), "signature": str(output)})
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Host CLI: ``keys generate`` (default name "publisher"), ``sign``, ``sign-file``, ``verify``."""
    register_keys(subparsers, default_name="publisher")
    sign = subparsers.add_parser(
        "sign", help="sign a bundle with a private key (also to re-sign after merge-deltas)",
        description="Check every file of BUNDLE against its manifest, then write BUNDLE/signature.dsse.json: an "
        "Ed25519 DSSE signature over an in-toto statement of every file's sha256 and the manifest. Signing again "
        "replaces the old signature (one command after a host merge).")
    sign.add_argument("bundle", type=Path, help="bundle directory (NAME.eab)")
    sign.add_argument("--key", type=Path, required=True, metavar="PRIVATE_KEY",
                      help="private key file (edgeadapt keys generate); must have mode 0600")
    add_json_options(sign, "the result")
    sign.set_defaults(handler=_sign)
    sign_file = subparsers.add_parser(
        "sign-file", help="sign one file, e.g. a fused .tflite/.onnx for an app (writes FILE.dsse.json)",
        description="Write FILE.dsse.json beside FILE: the same envelope as a bundle signature over that one "
        "file's sha256. Apps check it as docs/SIGNING.md shows.")
    sign_file.add_argument("file", type=Path, help="file to sign")
    sign_file.add_argument("--key", type=Path, required=True, metavar="PRIVATE_KEY", help="private key file")
    add_json_options(sign_file, "the result")
    sign_file.set_defaults(handler=_sign_file)
    register_verify(subparsers)
