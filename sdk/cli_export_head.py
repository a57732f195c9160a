"""``edgeadapt export-head BUNDLE --out head.eah [--int8]``: the flat head file for firmware.

Writes the current head of a bundle (weights, bias, feature normalisation, temperature, class
names) as a ``.eah`` file that the C head library (``device/c/``) and
:func:`edgeadapt.device.head_file.read_head_file` read. The bundle itself is not changed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _export_head(arguments: argparse.Namespace) -> int:
    from edgeadapt.device.bundle import Bundle, write_file_durably
    from edgeadapt.device.errors import BundleError
    from edgeadapt.device.head_file import head_from_bytes, head_to_bytes

    out = Path(arguments.out)
    if out.exists() and not arguments.overwrite:
        raise BundleError(f"{out} already exists; pass --overwrite or choose another --out")
    bundle = Bundle.open(arguments.bundle)
    head = bundle.load_head()
    names = bundle.manifest.class_names
    data = head_to_bytes(head, names, int8=arguments.int8)
    written = head_from_bytes(data, str(out))  # read back before writing: the file must be valid
    write_file_durably(out, data)
    report = {
        "out": str(out),
        "bytes": len(data),
        "embedding_size": head.embedding_size,
        "classes": head.num_classes,
        "weights": "int8" if arguments.int8 else "float32",
        "feature_mean": head.feature_mean is not None,
        "l2_normalize": bool(head.l2_normalize),
        "temperature": float(head.temperature),
        "bundle_version": bundle.manifest.version,
    }
    if arguments.int8:
        report["max_abs_weight_error"] = float(abs(written.head.weights - head.weights).max()) if head.num_classes else 0.0
    print(json.dumps(report, indent=2) if arguments.json else
          f"wrote {out}: {len(data)} bytes, {head.embedding_size} x {head.num_classes} {report['weights']} head "
          f"(bundle version {bundle.manifest.version})")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export-head",
        help="write a bundle's head as a flat .eah file for the C head library (firmware)",
        description="Write the current head of BUNDLE (weights, bias, feature mean, L2 flag, temperature, class "
        "names) as a little-endian .eah file with a sha256, for the C library in device/c (see docs/C_LIBRARY.md). "
        "The bundle is not changed.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("bundle", type=Path, help="bundle directory (NAME.eab) or packed bundle")
    parser.add_argument("--out", type=Path, required=True, help="head file to write (.eah)")
    parser.add_argument("--int8", action="store_true",
                        help="store int8 weights with one float32 scale per class (about 4x smaller)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(handler=_export_head)
