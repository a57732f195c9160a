"""``edgeadapt-device`` update commands: add-class, add-examples, remove-class, rename-class,
history, rollback, export-delta, set-references, calibrate-unknown, classify-unknown.

Registered through ``COMMAND_MODULES`` in :mod:`edgeadapt.device.cli`. No TensorFlow.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from edgeadapt.device.cli_common import add_backend_option, add_json_options, emit_report
from edgeadapt.device.errors import InputError
from edgeadapt.device.preprocessing import IMAGE_SUFFIXES, list_image_files
from edgeadapt.device.trust import add_trust_arguments, trusted_keys_from_arguments


def expand_images(arguments: list[Path]) -> list[Path]:
    """Image files given on the command line; a folder stands for the image files inside it (sorted)."""
    images: list[Path] = []
    for argument in arguments:
        if argument.is_dir():
            found = list_image_files(argument)
            if not found:
                raise InputError(f"folder {str(argument)!r} holds no {'/'.join(IMAGE_SUFFIXES)} images")
            images.extend(found)
        else:
            images.append(argument)  # missing or unreadable files are reported by the updater
    return images


def _open_updater(arguments: argparse.Namespace):
    from edgeadapt.device.runtime import Runtime
    from edgeadapt.device.updater import HeadUpdater

    options = None
    if getattr(arguments, "method", None):
        from edgeadapt.device.incremental import AddClassOptions

        options = AddClassOptions(method=arguments.method)
    runtime = Runtime.open(arguments.bundle, backend=getattr(arguments, "backend", "auto"),
                           trusted_keys=trusted_keys_from_arguments(arguments))
    updater = HeadUpdater(
        runtime,
        keep_versions=arguments.keep_versions,
        wait_for_lock=arguments.wait,
        lock_timeout=arguments.lock_timeout,
        **({"gate_budget": arguments.gate_budget} if "gate_budget" in arguments else {}),
        options=options,
        device_key=arguments.device_key,
    )
    return runtime, updater


def _print_result(result, arguments: argparse.Namespace) -> None:
    from edgeadapt.device.versions import summarize_change

    data = {
        "version": result.version,
        "action": result.action,
        "classes": list(result.classes),
        "change": result.change,
        "timings_ms": {key: round(value * 1000.0, 3) for key, value in result.timings.items()},
    }
    lines = [f"version {result.version}: {summarize_change(result.change)}"]
    if result.gate is not None:
        gate = result.gate
        status = "passed" if gate.passed else "FORCED past the budget"
        lines.append(f"  update gate {status}: {gate.disturbed}/{gate.checked} old-class references disturbed "
                     f"(budget {gate.budget:.0%}, {gate.source})")
    emit_report(arguments, "\n".join(lines), data)


def _add_class(arguments: argparse.Namespace) -> int:
    images = expand_images(arguments.images)
    _, updater = _open_updater(arguments)
    _print_result(updater.add_class(arguments.name, images, force=arguments.force), arguments)
    return 0


def _add_examples(arguments: argparse.Namespace) -> int:
    images = expand_images(arguments.images)
    _, updater = _open_updater(arguments)
    _print_result(updater.add_examples(arguments.name, images, force=arguments.force), arguments)
    return 0


def _remove_class(arguments: argparse.Namespace) -> int:
    _, updater = _open_updater(arguments)
    _print_result(updater.remove_class(arguments.name, force=arguments.force), arguments)
    return 0


def _rename_class(arguments: argparse.Namespace) -> int:
    _, updater = _open_updater(arguments)
    _print_result(updater.rename_class(arguments.old_name, arguments.new_name), arguments)
    return 0


def _rollback(arguments: argparse.Namespace) -> int:
    _, updater = _open_updater(arguments)
    _print_result(updater.rollback(arguments.version), arguments)
    return 0


def _compact(arguments: argparse.Namespace) -> int:
    _, updater = _open_updater(arguments)
    _print_result(updater.compact(), arguments)
    return 0


def _history(arguments: argparse.Namespace) -> int:
    from edgeadapt.device.bundle import Bundle
    from edgeadapt.device.versions import VersionStore

    trusted_keys = trusted_keys_from_arguments(arguments)
    if trusted_keys is not None:
        Bundle.open(arguments.bundle, trusted_keys=trusted_keys)
    history = VersionStore(arguments.bundle).history()
    lines = [f"{'':2}{'version':>7}  {'parent':>6}  {'committed (UTC)':<25} {'classes':>7}  change"]
    for info in history:
        marker = "* " if info.current else "  "
        parent = "-" if info.parent_version is None else str(info.parent_version)
        lines.append(f"{marker}{info.version:>7}  {parent:>6}  {str(info.committed_at):<25} {info.num_classes:>7}  "
                     f"{info.summary}")
    emit_report(arguments, "\n".join(lines), [info.to_dict() for info in history])
    return 0


def _export_delta(arguments: argparse.Namespace) -> int:
    from edgeadapt.device.bundle import Bundle
    from edgeadapt.device.delta import export_delta, read_delta

    trusted_keys = trusted_keys_from_arguments(arguments)
    if trusted_keys is not None:
        Bundle.open(arguments.bundle, trusted_keys=trusted_keys)
    path = export_delta(arguments.bundle, arguments.output, source=arguments.source, device_key=arguments.device_key)
    delta = read_delta(path)
    summary = {
        "delta": str(path),
        "bytes": path.stat().st_size,
        "classes": [entry.to_dict() for entry in delta.classes],
        "examples": int(delta.example_embeddings.shape[0]),
    }
    described = ", ".join(f"{entry.name!r} ({entry.kind}, {entry.examples} examples)" for entry in delta.classes)
    emit_report(arguments, f"wrote {path} ({summary['bytes']} bytes): {described}", summary)
    return 0


def _set_references(arguments: argparse.Namespace) -> int:
    examples: dict[str, Any] = {}
    for folder in arguments.folders:
        if not folder.is_dir():
            raise InputError(f"{str(folder)!r} is not a folder; give one folder of images per class, named after it")
        examples[folder.name] = expand_images([folder])
    _, updater = _open_updater(arguments)
    _print_result(updater.set_reference_embeddings(examples, per_class=arguments.per_class), arguments)
    return 0


def _calibrate_unknown(arguments: argparse.Namespace) -> int:
    known = expand_images(arguments.known) if arguments.known else None
    unknown = expand_images(arguments.unknown) if arguments.unknown else None
    _, updater = _open_updater(arguments)
    result = updater.calibrate_unknown(known, accept_rate=arguments.accept_rate, unknown_examples=unknown)
    _print_result(result, arguments)
    return 0


def _classify_unknown(arguments: argparse.Namespace) -> int:
    from edgeadapt.device.runtime import Runtime
    from edgeadapt.device.unknown import UnknownAwareClassifier

    images = expand_images(arguments.images)
    classifier = UnknownAwareClassifier(Runtime.open(arguments.bundle, backend=arguments.backend,
                                                     trusted_keys=trusted_keys_from_arguments(arguments)))
    results = classifier.classify(images)
    data = [{"image": str(image), "label": label, "score": round(score, 6), "cosine": round(cosine, 6)}
            for image, (label, score, cosine) in zip(images, results)]
    text = "\n".join(f"{str(image)}: {label} (score {score:.3f}, prototype cosine {cosine:.3f})"
                     for image, (label, score, cosine) in zip(images, results))
    emit_report(arguments, text, data)
    return 0


def _writer_options(parser: argparse.ArgumentParser, gate: bool = True) -> None:
    """Options of every command that commits a head version; ``gate``: the command runs the update gate."""
    parser.add_argument("--keep-versions", type=int, default=5, help="head versions to keep for rollback")
    parser.add_argument("--wait", action="store_true", help="wait for another writer instead of failing")
    parser.add_argument("--lock-timeout", type=float, default=None, help="with --wait: give up after this many seconds")
    add_backend_option(parser)
    add_json_options(parser, "the new version")
    if gate:  # only the commands that run the update gate take its budget
        parser.add_argument("--gate-budget", type=float, default=0.10,
                            help="largest fraction of old-class reference embeddings an update may disturb")
        parser.add_argument("--force", action="store_true", help="commit even if the update gate refuses")
    add_trust_arguments(parser)
    _device_key_argument(parser, "each committed version")


def _device_key_argument(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--device-key", type=Path, metavar="PRIVATE_KEY",
                        help=f"this device's private key file (edgeadapt-device keys generate): signs {what} "
                        "(default: not signed)")


def _method_option(parser: argparse.ArgumentParser) -> None:
    from edgeadapt.device.incremental import DEFAULT_METHOD, METHODS, STATISTICS_FREE_METHOD

    parser.add_argument("--method", choices=METHODS, default=None,
                        help=f"how the head column is computed (default: chosen from what the bundle carries: "
                        f"{DEFAULT_METHOD} when it has class statistics with a Gram matrix, else "
                        f"{STATISTICS_FREE_METHOD}; a method the bundle cannot support is refused)")


BUNDLE_HELP = "bundle directory (NAME.eab)"


def _register_class_commands(subparsers: argparse._SubParsersAction) -> None:
    """add-class, add-examples, remove-class, rename-class."""
    parser = subparsers.add_parser("add-class", help="add a class from a few example images",
                                   description="Learn a new class from example images (files or folders) with the "
                                   "bundle's own backbone and commit it as a new head version.")
    parser.add_argument("bundle", type=Path, help=BUNDLE_HELP)
    parser.add_argument("name", help="name of the new class")
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="example images or folders of images")
    _method_option(parser)
    _writer_options(parser)
    parser.set_defaults(handler=_add_class)

    parser = subparsers.add_parser("add-examples", help="strengthen an existing class with more examples")
    parser.add_argument("bundle", type=Path, help=BUNDLE_HELP)
    parser.add_argument("name", help="existing class")
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="example images or folders of images")
    _method_option(parser)
    _writer_options(parser)
    parser.set_defaults(handler=_add_examples)

    parser = subparsers.add_parser("remove-class", help="remove a class (a new head version)")
    parser.add_argument("bundle", type=Path, help=BUNDLE_HELP)
    parser.add_argument("name", help="the class to remove")
    _writer_options(parser)
    parser.set_defaults(handler=_remove_class)

    parser = subparsers.add_parser("rename-class", help="rename a class (a new head version)")
    parser.add_argument("bundle", type=Path, help=BUNDLE_HELP)
    parser.add_argument("old_name", help="the class's current name")
    parser.add_argument("new_name", help="its new name")
    _writer_options(parser, gate=False)
    parser.set_defaults(handler=_rename_class)


def _register_version_commands(subparsers: argparse._SubParsersAction) -> None:
    """compact, history, rollback, export-delta."""
    parser = subparsers.add_parser("compact", help="fold the head parts of later commits into one set of head "
                                   "files (a new head version)")
    parser.add_argument("bundle", type=Path, help=BUNDLE_HELP)
    _writer_options(parser, gate=False)
    parser.set_defaults(handler=_compact)

    parser = subparsers.add_parser("history", help="list the kept head versions and what changed")
    parser.add_argument("bundle", type=Path, help=BUNDLE_HELP)
    add_json_options(parser, "the version list")
    add_trust_arguments(parser)
    parser.set_defaults(handler=_history)

    parser = subparsers.add_parser("rollback", help="restore an earlier head version (committed as a new version)")
    parser.add_argument("bundle", type=Path, help=BUNDLE_HELP)
    parser.add_argument("version", type=int, help="version number from `history`")
    _writer_options(parser, gate=False)
    parser.set_defaults(handler=_rollback)

    parser = subparsers.add_parser("export-delta", help="write the classes learned on this device to a delta file",
                                   description="Write the classes added (or strengthened) on this device -- head "
                                   "columns, example embeddings, provenance -- to a small file that `edgeadapt "
                                   "merge-deltas` folds into a new bundle on the host.")
    parser.add_argument("bundle", type=Path, help=BUNDLE_HELP)
    parser.add_argument("output", type=Path, help="delta file to write (e.g. device42.eadelta)")
    parser.add_argument("--source", help="name of this device in the host's provenance (default: host name)")
    add_json_options(parser, "the delta's summary")
    add_trust_arguments(parser)
    _device_key_argument(parser, "the delta, so the host can check it came from an enrolled device")
    parser.set_defaults(handler=_export_delta)


def _register_unknown_commands(subparsers: argparse._SubParsersAction) -> None:
    """set-references, calibrate-unknown, classify-unknown (the gate's references and unknown rejection)."""
    parser = subparsers.add_parser("set-references", help="store update-gate reference embeddings from images",
                                   description="Embed a few images per class and store them as the update gate's "
                                   "reference embeddings. Give one folder per class, named after the class.")
    parser.add_argument("bundle", type=Path, help=BUNDLE_HELP)
    parser.add_argument("folders", nargs="+", type=Path, metavar="CLASS_FOLDER",
                        help="one folder of images per class, named after the class")
    parser.add_argument("--per-class", type=int, default=5, help="references kept per class")
    _writer_options(parser, gate=False)
    parser.set_defaults(handler=_set_references)

    parser = subparsers.add_parser("calibrate-unknown", help="calibrate unknown rejection and store it in the bundle")
    parser.add_argument("bundle", type=Path, help=BUNDLE_HELP)
    parser.add_argument("--known", nargs="+", type=Path, metavar="IMAGE",
                        help="images of known classes (default: the stored reference embeddings)")
    parser.add_argument("--unknown", nargs="+", type=Path, metavar="IMAGE",
                        help="optional images of none of the classes")
    parser.add_argument("--accept-rate", type=float, default=0.95,
                        help="fraction of known images to accept")
    _writer_options(parser, gate=False)
    parser.set_defaults(handler=_calibrate_unknown)

    parser = subparsers.add_parser("classify-unknown", help="classify images, answering 'unknown' when unsure")
    parser.add_argument("bundle", type=Path, help=BUNDLE_HELP)
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="images or folders of images")
    add_backend_option(parser)
    add_json_options(parser, "the results")
    add_trust_arguments(parser)
    parser.set_defaults(handler=_classify_unknown)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the update commands to ``subparsers`` (the ``edgeadapt-device`` command line).

    Args:
        subparsers: The command line's sub-command parsers.
    """
    _register_class_commands(subparsers)
    _register_version_commands(subparsers)
    _register_unknown_commands(subparsers)
