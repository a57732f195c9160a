"""Fold device deltas into a new bundle version on the host (``edgeadapt merge-deltas``).

Each device that learned classes exports a delta (:mod:`edgeadapt.device.delta`): the
classes it added or strengthened, with the raw example embeddings. Here the examples of every
delta are folded into the base bundle with the same head math the devices use
(:mod:`edgeadapt.device.incremental`), giving one new bundle version that every device can
receive. Old-class rows are unchanged by added classes (append-only).

Name clashes are never resolved silently: with ``on_clash="error"`` (the default) every
clash is listed and the caller chooses ``merge`` (one class from all examples; a clash with a
base class strengthens that class), ``rename`` (``name@source``), ``skip`` (keep the first),
or renames individual classes (``renames``).

numpy only (no TensorFlow needed).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from edgeadapt.device.bundle import Bundle, write_bundle
from edgeadapt.device.reference_embeddings import ReferenceEmbeddings
from edgeadapt.device.delta import Delta, read_delta
from edgeadapt.device.errors import IncompatibleModelError, InputError
from edgeadapt.device.merging import with_ridge_basis_like
from edgeadapt.device.manifest import utc_timestamp

logger = logging.getLogger(__name__)

CLASH_POLICIES = ("error", "merge", "rename", "skip")


@dataclass(frozen=True)
class MergeDeltasOptions:
    """How :func:`merge_deltas` folds deltas into a bundle.

    ``renames`` maps ``"OLD"`` (every delta) or ``"N:OLD"`` (the N-th delta, 1-based) to a new
    name, applied before clashes are checked. ``include_strengthened`` also applies the
    examples devices added to existing classes. ``use_device_rows`` keeps the devices' own
    head columns unchanged (``incremental.merge_heads`` with method "none") instead of
    recomputing them from the example embeddings. ``add_options`` is an ``incremental.AddClassOptions``.
    ``references_per_class``: update-gate references stored for each merged class.
    """

    on_clash: str = "error"
    renames: Mapping[str, str] = field(default_factory=dict)
    include_strengthened: bool = True
    use_device_rows: bool = False
    add_options: Any = None
    references_per_class: int = 5
    overwrite: bool = False
    #: update gate on the merged head: the largest fraction of old-class references it may disturb
    gate_budget: float = 0.10
    #: write the merged bundle even when the gate refuses it
    force: bool = False
    #: enrolled device keys (key files, a folder of ``*.pub``, or ``TrustedKeys``): only deltas signed by one
    #: of them are merged (docs/SIGNING.md); None: deltas are not authenticated
    trusted_devices: Any = None

    def __post_init__(self) -> None:
        if self.on_clash not in CLASH_POLICIES:
            raise InputError(f"on_clash must be one of {CLASH_POLICIES}, got {self.on_clash!r}")
        if isinstance(self.gate_budget, bool) or not isinstance(self.gate_budget, (int, float)) \
                or not 0.0 <= float(self.gate_budget) <= 1.0:
            raise InputError(f"gate_budget must be a fraction in [0, 1], got {self.gate_budget!r}")


@dataclass
class MergeReport:
    """What :func:`merge_deltas` did."""

    output: Path
    version: int
    parent_version: int
    added: list[dict] = field(default_factory=list)
    strengthened: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: the update gate's report on the merged head (``GateReport.to_dict()``)
    gate: dict | None = None
    #: delta file -> key id of the enrolled device key that signed it (None: not checked)
    signers: dict[str, str | None] = field(default_factory=dict)

    def table(self) -> str:
        lines = [f"wrote {self.output} (version {self.version}, parent {self.parent_version})"]
        lines.extend(f"  delta        {name}: {'signed by device key ' + signer if signer else 'signature not checked'}"
                     for name, signer in self.signers.items())
        for entry in self.added:
            lines.append(f"  added        {entry['name']:<24} {entry['examples']:>5} examples  from {', '.join(entry['sources'])}")
        for entry in self.strengthened:
            lines.append(f"  strengthened {entry['name']:<24} {entry['examples']:>5} examples  from {', '.join(entry['sources'])}")
        for entry in self.skipped:
            lines.append(f"  skipped      {entry['name']:<24} from {entry['source']}: {entry['reason']}")
        lines.extend(f"  note: {note}" for note in self.notes)
        if self.gate is not None:
            lines.append(f"  gate: {self.gate['disturbed']} of {self.gate['checked']} old-class references disturbed "
                         f"(budget {self.gate['budget']:.1%}){' -- FORCED past the gate' if self.gate['forced'] and not self.gate['passed'] else ''}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"output": str(self.output), "version": self.version, "parent_version": self.parent_version,
                "signers": self.signers,
                "added": self.added, "strengthened": self.strengthened, "skipped": self.skipped, "notes": self.notes,
                "gate": self.gate}


def parse_renames(items: Sequence[str]) -> dict[str, str]:
    """``["cat=kitten", "2:dog=puppy"]`` -> ``{"cat": "kitten", "2:dog": "puppy"}``."""
    renames: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise InputError(f"rename {item!r} must look like OLD=NEW or N:OLD=NEW")
        old, new = item.split("=", 1)
        if not old or not new.strip():
            raise InputError(f"rename {item!r} has an empty name")
        renames[old] = new
    return renames


@dataclass
class _Incoming:
    name: str
    kind: str
    embeddings: list[np.ndarray]
    sources: list[str]
    added_at: str | None
    columns: list[tuple[int, int]]  # (delta number, column) for use_device_rows


def merge_deltas(
    bundle_path: str | Path,
    delta_paths: Sequence[str | Path],
    output: str | Path,
    options: MergeDeltasOptions = MergeDeltasOptions(),
) -> MergeReport:
    """Fold ``delta_paths`` into the bundle at ``bundle_path`` and write the result to ``output``.

    The merged head passes the device update gate (old-class reference embeddings must keep
    their predictions, within ``options.gate_budget``) unless ``options.force``. Nothing is
    written on error.

    Args:
        bundle_path: The base bundle the devices started from.
        delta_paths: Delta files written by ``edgeadapt-device export-delta``.
        output: The directory of the new bundle version.
        options: Clash handling, renames, method, gate budget, ``force``, ``overwrite``.

    Returns:
        The classes merged, from which device, and how clashes were resolved.

    Raises:
        InputError: Unresolved name clashes (listing all of them), or no delta given.
        IncompatibleModelError: A delta made with another backbone.
        UpdateGateError: The merged head would change too many old-class predictions (the report is attached).
        BundleError: A damaged bundle or delta, or an existing ``output``.
    """
    if not delta_paths:
        raise InputError("give at least one delta file")
    with Bundle.open(bundle_path) as bundle:  # a packed bundle's unpacked copy is removed afterwards
        return _merge(bundle, delta_paths, output, options)


def _merge(bundle: Bundle, delta_paths: Sequence[str | Path], output: str | Path,
           options: MergeDeltasOptions) -> MergeReport:
    from edgeadapt.device import incremental
    from edgeadapt.bundles.version_writing import calibration_embeddings

    manifest = bundle.manifest
    deltas: list[Delta] = [read_delta(path, trusted_keys=options.trusted_devices) for path in delta_paths]
    head = bundle.load_head()
    stats = bundle.load_class_stats()
    base_head, base_stats = head, stats
    base_names = manifest.class_names
    report = MergeReport(output=Path(output), version=manifest.version + 1, parent_version=manifest.version)
    report.signers = {str(delta.path): delta.signer for delta in deltas}
    _check_deltas(bundle, deltas, head, options, report)
    incoming, strengthen = _sort_classes(deltas, base_names, options, report)
    calibration = calibration_embeddings(bundle)
    if options.add_options is not None:
        add_options = options.add_options
    else:  # the method this bundle supports, chosen for what it carries
        add_options = incremental.AddClassOptions(
            method=incremental.choose_method(stats, calibration is not None, None))
    for name, item in strengthen.items():
        embeddings = np.concatenate(item.embeddings)
        head, stats = incremental.add_examples(head, stats, base_names.index(name), embeddings, add_options,
                                               calibration=calibration)
        report.strengthened.append({"name": name, "examples": int(embeddings.shape[0]), "sources": item.sources})
    new_names = list(incoming)
    new_embeddings = [np.concatenate(incoming[name].embeddings) for name in new_names]
    old_count = head.num_classes
    if new_names:
        if options.use_device_rows:
            head, stats = _merge_device_rows(head, stats, deltas, [incoming[name] for name in new_names], add_options)
        else:
            head, stats = incremental.add_classes(head, stats, new_embeddings, add_options, calibration=calibration)
    classes = _merged_classes(manifest, incoming, strengthen, report)
    references = bundle.load_reference_embeddings()
    report.gate = _gate(manifest, base_head, base_stats, references, head, [entry["name"] for entry in classes],
                        options).to_dict()
    references = _with_new_references(references, new_embeddings, old_count, options.references_per_class)
    change = _change_record(deltas, report, options, add_options)
    _write_merged(bundle, output, head, stats, classes, references, change, report.version, options.overwrite)
    logger.info("merged %d delta(s) into %s", len(deltas), output)
    return report


def _check_deltas(bundle: Bundle, deltas: list[Delta], head: Any, options: MergeDeltasOptions,
                  report: MergeReport) -> None:
    """Refuse deltas of another backbone or embedding size (or normalisation, for device rows) and bad renames."""
    manifest = bundle.manifest
    for number, delta in enumerate(deltas, start=1):
        if delta.backbone_fingerprint != manifest.backbone_fingerprint:
            raise IncompatibleModelError(
                f"delta {number} ({delta.path}) was made with backbone {delta.backbone_fingerprint}, but {bundle.path} "
                f"has {manifest.backbone_fingerprint}; it cannot be merged"
            )
        if delta.embedding_size != head.embedding_size:
            raise IncompatibleModelError(f"delta {number} holds {delta.embedding_size}-d embeddings, the bundle "
                                         f"{head.embedding_size}-d")
        if delta.info.get("bundle_id") != manifest.data.get("bundle_id"):
            report.notes.append(f"delta {number} ({delta.source}) comes from bundle {delta.info.get('bundle_id')}, "
                                f"not {manifest.data.get('bundle_id')} (same backbone, merged anyway)")
        if options.use_device_rows and not delta.head.same_normalisation(head):
            raise IncompatibleModelError(
                f"delta {number}'s head normalisation differs from the bundle's; its device rows cannot be merged "
                "(merge without use_device_rows to recompute them from the example embeddings)"
            )
    for key in options.renames:
        if ":" in key:
            position = key.split(":", 1)[0]
            if not position.isdigit() or not 1 <= int(position) <= len(deltas):
                raise InputError(f"rename {key!r} refers to delta {position}, but {len(deltas)} delta(s) were given")


def _sort_classes(deltas: list[Delta], base_names: list[str], options: MergeDeltasOptions,
                  report: MergeReport) -> tuple[dict[str, _Incoming], dict[str, _Incoming]]:
    """(classes to add, bundle classes to strengthen) after renames and the clash policy; skips go to ``report``.

    Raises:
        InputError: Unresolved clashes (all of them listed), or nothing left to merge.
    """
    from edgeadapt.device.naming import check_class_name

    incoming: dict[str, _Incoming] = {}
    strengthen: dict[str, _Incoming] = {}
    clashes: list[str] = []
    for number, delta in enumerate(deltas, start=1):
        for position, entry in enumerate(delta.classes):
            name = options.renames.get(f"{number}:{entry.name}", options.renames.get(entry.name, entry.name))
            check_class_name(name)
            embeddings = delta.embeddings_of(position)
            if entry.kind == "strengthened":
                if not options.include_strengthened:
                    report.skipped.append({"name": name, "source": delta.source, "reason": "strengthened classes excluded"})
                elif name not in base_names:
                    report.skipped.append({"name": name, "source": delta.source,
                                           "reason": "strengthened on the device but not in the bundle"})
                else:
                    _collect(strengthen, name, "strengthened", embeddings, delta.source, None, (number, position))
                continue
            clash = name in base_names or name in incoming
            if clash:
                where = "the bundle" if name in base_names else f"another delta ({', '.join(incoming[name].sources)})"
                if options.on_clash == "error":
                    clashes.append(f"{name!r} from delta {number} ({delta.source}) already exists in {where}")
                    continue
                if options.on_clash == "skip":
                    report.skipped.append({"name": name, "source": delta.source, "reason": f"name exists in {where}"})
                    continue
                if options.on_clash == "rename":
                    name = _unique_name(f"{name}@{delta.source}", set(base_names) | set(incoming))
                    check_class_name(name)
                elif options.on_clash == "merge" and name in base_names:
                    _collect(strengthen, name, "strengthened", embeddings, delta.source, None, (number, position))
                    continue
            _collect(incoming, name, "added", embeddings, delta.source, entry.added_at, (number, position))
    if clashes:
        raise InputError(
            "class name clashes: " + "; ".join(clashes) + ". Nothing was written. Choose how to resolve them: "
            "--on-clash merge (one class from all examples; strengthens a bundle class of that name), "
            "--on-clash rename (NAME@SOURCE), --on-clash skip (keep the first), or --rename [N:]OLD=NEW"
        )
    if not incoming and not strengthen:
        raise InputError("the deltas hold nothing to merge (every class was skipped)")
    return incoming, strengthen


def _merged_classes(manifest: Any, incoming: dict[str, _Incoming], strengthen: dict[str, _Incoming],
                    report: MergeReport) -> list[dict]:
    """The new version's class entries: the bundle's (example counts of strengthened ones raised) + the added."""
    version = manifest.version + 1
    base_names = manifest.class_names
    classes = [dict(entry) for entry in manifest.data["classes"]]
    for name, item in incoming.items():
        examples = int(sum(part.shape[0] for part in item.embeddings))
        classes.append({"name": name, "index": len(classes), "origin": "device-added",
                        "added_at": item.added_at or utc_timestamp(), "examples": examples,
                        "added_in_version": version, "source": ", ".join(item.sources)})
        report.added.append({"name": name, "examples": examples, "sources": item.sources})
    for name, item in strengthen.items():
        entry = classes[base_names.index(name)]
        if entry.get("examples") is not None:
            entry["examples"] = int(entry["examples"]) + int(sum(part.shape[0] for part in item.embeddings))
    return classes


def _with_new_references(references: ReferenceEmbeddings | None, new_embeddings: list[np.ndarray], old_count: int,
                         per_class: int) -> ReferenceEmbeddings | None:
    """The base bundle's update-gate references plus the first ``per_class`` examples of each added class."""
    for offset, embeddings in enumerate(new_embeddings):
        chosen = embeddings[:per_class]
        labels = np.full(chosen.shape[0], old_count + offset, np.int64)
        if references is None:
            references = ReferenceEmbeddings(chosen.astype(np.float16), labels)
        else:
            references = ReferenceEmbeddings(
                np.concatenate([references.embeddings, chosen.astype(references.embeddings.dtype)]),
                np.concatenate([references.labels, labels]))
    return references


def _change_record(deltas: list[Delta], report: MergeReport, options: MergeDeltasOptions, add_options: Any) -> dict:
    """The new version's ``change`` entry: what was merged from which delta, and how."""
    from edgeadapt.device.version_builder import ChangeAction

    return {
        "action": ChangeAction.MERGE_DELTAS,
        "classes": [entry["name"] for entry in report.added],
        "strengthened": [entry["name"] for entry in report.strengthened],
        "deltas": [{"file": str(delta.path), "source": delta.source, "bundle_id": delta.info.get("bundle_id"),
                    "signer": delta.signer,
                    "device_version": delta.info.get("device_version"),
                    "classes": [entry.name for entry in delta.classes]} for delta in deltas],
        "on_clash": options.on_clash,
        "rows": "device" if options.use_device_rows else "recomputed",
        "method": getattr(add_options, "method", None),
        "gate": report.gate,
    }


def _write_merged(bundle: Bundle, output: str | Path, head: Any, stats: Any, classes: list[dict],
                  references: ReferenceEmbeddings | None, change: dict, version: int, overwrite: bool) -> None:
    """Build the merged version from ``bundle`` (its unknown and background carried on) and write it."""
    from edgeadapt import __version__
    from edgeadapt.converters.bundle_export import created_by
    from edgeadapt.device.unknown import load_unknown
    from edgeadapt.device.version_builder import VersionPlan, build_version

    plan = VersionPlan(head=head, stats=with_ridge_basis_like(bundle.manifest, head, stats), classes=classes,
                       change=change, references=references, unknown=load_unknown(bundle),
                       background=bundle.load_background())
    built = build_version(bundle.manifest, plan, version, tool=f"edgeadapt {__version__}", created_by=created_by())
    new_manifest = built.manifest  # a new host version: unsigned until `edgeadapt sign`, derived from nothing
    files: dict[str, Any] = {name: bundle.path / name for name in new_manifest.files}
    files.update(built.new_files)
    write_bundle(output, new_manifest, files, overwrite=overwrite)


def _gate(manifest: Any, base_head: Any, base_stats: Any, references: ReferenceEmbeddings | None, head: Any,
          new_names: list[str], options: MergeDeltasOptions) -> Any:
    """Run the device update gate (old head -> merged head) on the base bundle's references.

    Returns:
        The ``GateReport``.

    Raises:
        UpdateGateError: the gate refused and ``options.force`` is false (the report is attached).
    """
    from edgeadapt.device.head_state import HeadState
    from edgeadapt.device.update_gate import UpdateGateError, evaluate_gate, gate_references

    state = HeadState(manifest, base_head, base_stats, references, None, None)
    embeddings, labels, source = gate_references(state, options.references_per_class)
    index_map = np.arange(base_head.num_classes, dtype=np.int64)
    report = evaluate_gate(base_head, head, embeddings, labels, index_map, manifest.class_names, new_names,
                           float(options.gate_budget), source=source, force=options.force)
    if not report.passed and not options.force:
        raise UpdateGateError(
            f"merge refused by the update gate: {report.describe()}. Nothing was written. Check the deltas (a "
            "delta whose examples look like old classes takes their predictions), raise the budget "
            "(--gate-budget), or merge anyway (--force)", report)
    return report


def _collect(target: dict, name: str, kind: str, embeddings: np.ndarray, source: str, added_at, column) -> None:
    item = target.get(name)
    if item is None:
        target[name] = _Incoming(name, kind, [embeddings], [source], added_at, [column])
        return
    item.embeddings.append(embeddings)
    if source not in item.sources:
        item.sources.append(source)
    item.columns.append(column)


def _unique_name(name: str, taken: set[str]) -> str:
    candidate, counter = name, 2
    while candidate in taken:
        candidate = f"{name}#{counter}"
        counter += 1
    return candidate


def _merge_device_rows(head, stats, deltas: list[Delta], items: list[_Incoming], add_options):
    """Append the devices' own columns (one per class; a class merged from several deltas is refit
    from its examples) through ``incremental.merge_heads``."""
    from edgeadapt.device import incremental
    from edgeadapt.device.head import ClassStats, Head

    weights, biases, sums, counts, grams = [], [], [], [], []
    for item in items:
        examples = np.concatenate(item.embeddings).astype(np.float64)
        if len(item.columns) == 1:
            number, position = item.columns[0]
            delta = deltas[number - 1]
            weights.append(delta.head.weights[:, position])
            biases.append(delta.head.bias[position])
        else:
            raise InputError(
                f"class {item.name!r} comes from {len(item.columns)} deltas; merging device rows needs one row per "
                "class: merge without use_device_rows (recompute from the examples) or rename the classes"
            )
        sums.append(examples.sum(axis=0))
        counts.append(examples.shape[0])
        grams.append(examples.T @ examples)
    other = Head(weights=np.stack(weights, axis=1), bias=np.array(biases, np.float32), feature_mean=head.feature_mean,
                 l2_normalize=head.l2_normalize, temperature=head.temperature)
    other_stats = ClassStats(sums=np.stack(sums), counts=np.array(counts), gram=np.sum(grams, axis=0))
    # method "none" in merge_heads = the columns are copied unchanged (the devices' own rows)
    return incremental.merge_heads(head, stats, other, other_stats, replace(add_options, method="none"))
