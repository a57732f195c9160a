"""``edgeadapt export-head BUNDLE --out head.eah [--int8] [--into-bundle]``: the flat head file for firmware.

Writes the current head of a bundle (weights, bias, feature normalisation, temperature, class
names) as a ``.eah`` file that the C head library (``device/c/``) and
:func:`edgeadapt.device.head_file.read_head_file` read. With ``--into-bundle`` the bundle
carries the file too (``heads/vN/head.eah``, listed with its sha256 in a new bundle version).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from edgeadapt.device.cli_common import add_json_options, emit_report


def _export_head(arguments: argparse.Namespace) -> int:
    from edgeadapt.device.bundle import Bundle
    from edgeadapt.device.errors import InputError
    from edgeadapt.device.head_file import carry_head_file, head_from_bytes, head_to_bytes, write_head_file

    out = arguments.out
    if out is None and not arguments.into_bundle:
        arguments.export_head_parser.error("nothing to write: give --out FILE, --into-bundle, or both")
    if out is not None and not arguments.overwrite and os.path.lexists(out):
        raise InputError(f"{out} already exists; pass --overwrite or choose another --out")
    with Bundle.open(arguments.bundle) as bundle:
        head = bundle.load_head()
        names = bundle.manifest.class_names
        version = bundle.manifest.version
    weights = "int8" if arguments.int8 else "float32"
    data = head_to_bytes(head, names, int8=arguments.int8)
    written = head_from_bytes(data, "the exported head")  # read back before writing: the file must be valid
    report = {
        "out": None if out is None else str(out),
        "bytes": len(data),
        "sha256": data[-32:].hex(),
        "embedding_size": head.embedding_size,
        "classes": head.num_classes,
        "weights": weights,
        "feature_mean": head.feature_mean is not None,
        "l2_normalize": bool(head.l2_normalize),
        "temperature": float(head.temperature),
        "bundle_version": version,
        "carried_in_bundle": None,
    }
    if arguments.int8:
        report["max_abs_weight_error"] = float(abs(written.head.weights - head.weights).max()) if head.num_classes else 0.0
    if arguments.into_bundle:
        committed = carry_head_file(arguments.bundle, int8=arguments.int8)
        report["carried_in_bundle"] = committed.data["head"]["head_file"]["file"]
        report["bundle_version"] = committed.version
    if out is not None:
        write_head_file(out, head, names, int8=arguments.int8, overwrite=True)
    lines = [f"{head.embedding_size} x {head.num_classes} {weights} head, {len(data)} bytes (bundle version {version})"]
    if out is not None:
        lines.append(f"wrote {out}")
    if report["carried_in_bundle"]:
        lines.append(f"the bundle carries it as {report['carried_in_bundle']} (new bundle version "
                     f"{report['bundle_version']})")
    emit_report(arguments, "\n".join(lines), report)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``export-head`` sub-command.

    Args:
        subparsers: The sub-parser group of the main parser.

    Returns:
        None.
    """
    parser = subparsers.add_parser(
        "export-head",
        help="write a bundle's head as a flat .eah file for the C head library (firmware)",
        description="Write the current head of BUNDLE (weights, bias, feature mean, L2 flag, temperature, class "
        "names) as a little-endian .eah file with a sha256, for the C library in device/c (see docs/C_LIBRARY.md). "
        "--out writes a file and leaves the bundle unchanged; --into-bundle stores the file in the bundle directory "
        "itself as a new bundle version (head unchanged) whose manifest lists it; device updates then rewrite it "
        "with every new head.",
    )
    parser.add_argument("bundle", type=Path, help="bundle directory (NAME.eab), or a packed bundle with --out only")
    parser.add_argument("--out", type=Path, metavar="FILE", help="head file to write (.eah)")
    parser.add_argument("--into-bundle", action="store_true",
                        help="also store the head file in the bundle directory (heads/vN/head.eah, a new version)")
    parser.add_argument("--int8", action="store_true",
                        help="store int8 weights with one float32 scale per class (about 4x smaller)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_json_options(parser)
    parser.set_defaults(handler=_export_head, export_head_parser=parser)
