"""``edgeadapt merge-deltas BUNDLE DELTA... --out NEW``: fold device deltas into a new bundle version."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from edgeadapt.device.cli_common import add_json_options, emit_report


def _merge_deltas(arguments: argparse.Namespace) -> int:
    from edgeadapt.bundles.deltas import MergeDeltasOptions, merge_deltas, parse_renames
    from edgeadapt.device import UpdateGateError

    add_options = None
    if arguments.method:
        from edgeadapt.device.incremental import AddClassOptions

        add_options = AddClassOptions(method=arguments.method)
    options = MergeDeltasOptions(
        on_clash=arguments.on_clash,
        renames=parse_renames(arguments.rename or []),
        include_strengthened=not arguments.no_strengthened,
        use_device_rows=arguments.use_device_rows,
        add_options=add_options,
        overwrite=arguments.overwrite,
        gate_budget=arguments.gate_budget,
        force=arguments.force,
        trusted_devices=_enrolled_devices(arguments.trust_devices),
    )
    try:
        report = merge_deltas(arguments.bundle, arguments.deltas, arguments.out, options)
    except UpdateGateError as error:  # the full gate report, then the one-line error of the CLI
        print(json.dumps({"gate": error.report.to_dict()}, indent=2), file=sys.stderr)
        raise
    emit_report(arguments, report.table(), report.to_dict())
    return 0


def _enrolled_devices(folder: Path | None) -> Any:
    """The enrolled device keys of ``--trust-devices DIR`` (a ``TrustedKeys``), or None."""
    if folder is None:
        return None
    from edgeadapt.device.trust import load_trust_dir

    return load_trust_dir(folder)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``merge-deltas`` sub-command.

    Args:
        subparsers: The sub-parser group of the main parser.

    Returns:
        None.
    """
    parser = subparsers.add_parser(
        "merge-deltas",
        help="fold delta files exported by devices into a new bundle version",
        description="Fold the classes that devices learned (delta files from `edgeadapt-device export-delta`) "
        "into BUNDLE and write a new bundle version to --out. Rows are recomputed from the devices' example "
        "embeddings with the same head math the devices use; old-class rows stay unchanged. Name clashes "
        "stop the merge unless --on-clash or --rename says how to resolve them. The merged head must pass the "
        "device update gate (old-class predictions kept within --gate-budget) unless --force.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("bundle", type=Path, help="base bundle directory (NAME.eab) or packed bundle")
    parser.add_argument("deltas", nargs="+", type=Path, metavar="DELTA", help="delta files (.eadelta)")
    parser.add_argument("--out", type=Path, required=True, help="new bundle directory to write")
    parser.add_argument("--on-clash", choices=("error", "merge", "rename", "skip"), default="error",
                        help="what to do when a class name already exists: error (default), merge (one class from "
                        "all examples), rename (NAME@SOURCE), skip (keep the first)")
    parser.add_argument("--rename", action="append", metavar="[N:]OLD=NEW",
                        help="rename a delta class before merging (N = 1-based delta position; repeatable)")
    parser.add_argument("--no-strengthened", action="store_true",
                        help="ignore examples that devices added to existing classes")
    parser.add_argument("--use-device-rows", action="store_true",
                        help="keep the devices' own head columns instead of recomputing them from the examples")
    from edgeadapt.device.incremental import DEFAULT_METHOD, METHODS

    parser.add_argument("--method", choices=tuple(METHODS),
                        help=f"head math of the recomputed columns (default: {DEFAULT_METHOD})")
    parser.add_argument("--gate-budget", type=float, default=0.10,
                        help="update gate: the largest fraction of old-class reference embeddings the merged head "
                        "may change the prediction of (default: %(default)s)")
    parser.add_argument("--force", action="store_true",
                        help="write the merged bundle even when the update gate refuses it (the report is kept in "
                        "the manifest's change record)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--trust-devices", type=Path, metavar="DIR",
                        help="folder of enrolled device public keys (*.pub): merge only deltas signed by one of "
                        "them and report each delta's signer (default: deltas are not authenticated). Sign the "
                        "result again with `edgeadapt sign OUT --key KEY`")
    add_json_options(parser, "the report")
    parser.set_defaults(handler=_merge_deltas)
