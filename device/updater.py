"""HeadUpdater: add, strengthen, remove and rename classes on the device, commit atomically, roll back.

No TensorFlow: embeddings come from the bundle's own backbone through the open
:class:`~edgeadapt.device.runtime.Runtime`, the head math is the shared numpy code in
:mod:`edgeadapt.device.incremental` (the host calls the same functions), and every change
is committed as a new head version by :mod:`edgeadapt.device.versions`.

>>> runtime = Runtime.open("model.eab")
>>> updater = HeadUpdater(runtime)
>>> updater.add_class("mug", ["mug1.jpg", "mug2.jpg", "mug3.jpg", "mug4.jpg", "mug5.jpg"])
>>> runtime.predict("mug6.jpg")[0].label        # the runtime uses the new head at once
'mug'
>>> updater.rollback(1)                          # restore the exported head

Every method validates all of its inputs (names, every image: :mod:`edgeadapt.device.update_inputs`)
before it takes the lock and writes anything; a refused or failed update leaves the bundle exactly
as it was. What each operation changes is its plan (:mod:`edgeadapt.device.update_plans`); this
module runs the gate on it and commits it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from edgeadapt.device.calibration_rows import CalibrationRows
from edgeadapt.device.reference_embeddings import ReferenceEmbeddings
from edgeadapt.device.errors import InputError, UpdateError
from edgeadapt.device.head import ClassStats
from edgeadapt.device.manifest import Manifest
from edgeadapt.device.naming import check_class_name
from edgeadapt.device.head_state import (
    HeadState,
    apply_to_runtime as _apply_to_runtime,
    head_file_paths,
    load_state,
    refresh_runtime,
    refuse_temporary_unpack as _refuse_temporary_unpack,
)
from edgeadapt.device.update_gate import (
    DEFAULT_GATE_BUDGET,
    DEFAULT_REFERENCES_PER_CLASS,
    GateReport,
    UpdateGateError,
    evaluate_gate,
    gate_reference_parts,
)
from edgeadapt.device.version_builder import DEFAULT_COMPACT_FRACTION, ChangeAction, VersionPlan, build_version
from edgeadapt.device.update_inputs import (
    check_embeddings,
    check_name_free,
    check_new_names,
    distinct_examples,
    existing_index,
    finite_embeddings,
    prepare_examples,
    reference_labels,
)
from edgeadapt.device.update_plans import (
    STRENGTHEN_NEEDS_STATISTICS,
    UpdatePlan,
    add_classes_plan,
    add_examples_plan,
    calibrate_unknown_plan,
    calibration_embeddings,
    compact_plan,
    head_math,
    refuse_strengthen_without_statistics,
    remove_class_plan,
    rename_class_plan,
    set_references_plan,
)
from edgeadapt.device.versions import (
    DEFAULT_KEEP_VERSIONS,
    DEFAULT_READER_GRACE_SECONDS,
    VersionInfo,
    VersionStore,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class UpdateResult:
    """A committed update: the new version, what changed, the gate report and timings (seconds)."""

    version: int
    action: str
    classes: tuple[str, ...]
    change: dict
    gate: GateReport | None = None
    timings: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- the updater
class HeadUpdater:
    """Updates the head of an open :class:`~edgeadapt.device.runtime.Runtime`'s bundle in place.

    ``keep_versions``: versions kept for :meth:`rollback` (at least 2).
    ``wait_for_lock``: when another writer holds the bundle, wait (up to ``lock_timeout`` s)
    instead of raising :class:`~edgeadapt.device.errors.ConcurrentUpdateError`.
    ``gate_budget``: the largest fraction of old-class reference embeddings an update may
    disturb (:class:`GateReport`); ``force=True`` on a method commits anyway.
    ``options``: :class:`edgeadapt.device.incremental.AddClassOptions` for the head math
    (default: per update, the method :func:`edgeadapt.device.incremental.choose_method` picks
    for what the bundle carries, as the host does; a chosen method the bundle cannot support
    is refused with :class:`~edgeadapt.device.errors.IncompatibleModelError` before any image
    is embedded).
    ``references_per_class``: how many of a device-added class's own examples the gate uses
    as its references in later updates (default: as many as the bundle stores per class, else 5).
    ``reader_grace_seconds``: a version superseded less than this long ago is not pruned yet,
    so readers that have just read its manifest can finish loading it.
    ``trusted_keys``: the bundle must be signed by one of these keys (default: as the runtime
    was opened, or ``$EDGEADAPT_TRUST_DIR``); new versions record the signed base they derive
    from. ``device_key``: a private key file that signs each committed version (docs/SIGNING.md).
    """

    def __init__(
        self,
        runtime: Any,
        keep_versions: int = DEFAULT_KEEP_VERSIONS,
        wait_for_lock: bool = False,
        lock_timeout: float | None = None,
        gate_budget: float = DEFAULT_GATE_BUDGET,
        options: Any = None,
        references_per_class: int | None = None,
        reader_grace_seconds: float = DEFAULT_READER_GRACE_SECONDS,
        trusted_keys: Any = None,
        device_key: Any = None,
        compact_fraction: float = DEFAULT_COMPACT_FRACTION,
    ):
        if not 0.0 <= float(gate_budget) <= 1.0:
            raise InputError(f"gate_budget must be a fraction in [0, 1], got {gate_budget}")
        if references_per_class is not None and references_per_class < 1:
            raise InputError(f"references_per_class must be at least 1, got {references_per_class}")
        _refuse_temporary_unpack(Path(runtime.bundle.path))
        self.runtime = runtime
        self.store = VersionStore(runtime.bundle.path, keep_versions=keep_versions,
                                  reader_grace_seconds=reader_grace_seconds)
        self.wait_for_lock = bool(wait_for_lock)
        self.lock_timeout = lock_timeout
        self.gate_budget = float(gate_budget)
        self.options = options
        self.references_per_class = references_per_class
        if not 0.0 <= float(compact_fraction) <= 1e6:
            raise InputError(f"compact_fraction must be a non-negative fraction, got {compact_fraction}")
        self.compact_fraction = float(compact_fraction)
        self._state_cache: tuple[HeadState, dict] | None = None
        self._calibration_rows = CalibrationRows()  # the calibration embeddings, kept between updates
        from edgeadapt.device.signing import UpdaterSigning  # trusted keys, chain record, device key

        self._signing = UpdaterSigning.create(runtime, trusted_keys, device_key)

    @property
    def path(self) -> Path:
        return self.store.path

    # ------------------------------------------------------------------ public operations
    def add_class(self, name: str, examples: Any, *, force: bool = False) -> UpdateResult:
        """Add class ``name`` learned from ``examples`` (image paths, PIL images or uint8 arrays)."""
        return self.add_classes({name: examples}, force=force)

    def add_classes(self, examples_by_name: Mapping[str, Any], *, force: bool = False) -> UpdateResult:
        """Add several classes in one version: ``{name: examples}``."""
        names = self._check_new_names(list(examples_by_name))
        self._check_method_early()
        start = time.perf_counter()
        embeddings = [self._embed(examples_by_name[name], f"class {name!r}") for name in names]
        return self._add(names, embeddings, force, embed_seconds=time.perf_counter() - start)

    def add_class_embeddings(self, name: str, embeddings: np.ndarray, *, force: bool = False) -> UpdateResult:
        """:meth:`add_class` from embeddings already computed with this bundle's backbone."""
        names = self._check_new_names([name])
        return self._add(names, [self._check_embeddings(embeddings, f"class {name!r}")], force, embed_seconds=0.0)

    def add_examples(self, name: str, examples: Any, *, force: bool = False) -> UpdateResult:
        """Strengthen the existing class ``name`` with more examples."""
        existing_index(name, self.store.read_manifest())
        self._check_method_early(strengthen=True)
        start = time.perf_counter()
        embeddings = self._embed(examples, f"class {name!r}")
        return self._add_examples(name, embeddings, force, embed_seconds=time.perf_counter() - start)

    def add_examples_embeddings(self, name: str, embeddings: np.ndarray, *, force: bool = False) -> UpdateResult:
        """:meth:`add_examples` from embeddings already computed with this bundle's backbone."""
        existing_index(name, self.store.read_manifest())
        return self._add_examples(name, self._check_embeddings(embeddings, f"class {name!r}"), force, 0.0)

    def remove_class(self, name: str, *, force: bool = False) -> UpdateResult:
        """Remove class ``name`` (refused for the last class)."""
        manifest = self.store.read_manifest()
        existing_index(name, manifest)
        if len(manifest.class_names) <= 1:
            raise UpdateError(f"cannot remove {name!r}: it is the last class of the bundle; nothing was changed")

        def build(state: HeadState) -> UpdatePlan:
            return remove_class_plan(state, name, existing_index(name, state.manifest))

        return self._update(build, force)

    def rename_class(self, old_name: str, new_name: str) -> UpdateResult:
        """Rename a class (head rows and statistics are unchanged; their files are shared)."""
        manifest = self.store.read_manifest()
        existing_index(old_name, manifest)
        check_class_name(new_name, "new class name")
        check_name_free(new_name, manifest, exclude=old_name)
        if new_name == old_name:
            raise InputError(f"the class is already called {old_name!r}; nothing to rename")

        def build(state: HeadState) -> UpdatePlan:
            existing_index(old_name, state.manifest)
            check_name_free(new_name, state.manifest, exclude=old_name)
            return rename_class_plan(state, old_name, new_name)

        return self._update(build, force=False)

    def set_reference_embeddings(self, examples_by_name: Mapping[str, Any] | None = None, *,
                                 embeddings: np.ndarray | None = None, labels: Sequence[str | int] | None = None,
                                 per_class: int = DEFAULT_REFERENCES_PER_CLASS, replace: bool = False) -> UpdateResult:
        """Store reference embeddings of existing classes for the update gate (a new version).

        Give images per class name (``{name: examples}``, embedded here) or ``embeddings``
        with ``labels`` (class names or indices). At most ``per_class`` are kept per class.
        Classes not mentioned keep their references unless ``replace``.
        """
        manifest = self.store.read_manifest()
        names = manifest.class_names
        if not names:
            raise InputError("the bundle has no classes yet, so there are no classes to store references for; "
                             "add classes first (their photos become their references); nothing was changed")
        if examples_by_name is not None:
            if embeddings is not None:
                raise InputError("give either examples_by_name or embeddings, not both")
            if not examples_by_name:
                raise InputError("no classes given")
            for name in examples_by_name:
                existing_index(name, manifest)
            parts = [self._embed(examples_by_name[name], f"class {name!r}") for name in examples_by_name]
            labels_array = np.concatenate([np.full(len(part), names.index(name), np.int64)
                                           for part, name in zip(parts, examples_by_name)])
            all_embeddings = np.concatenate(parts)
        else:
            if embeddings is None or labels is None:
                raise InputError("give examples_by_name, or embeddings together with labels")
            all_embeddings = self._check_embeddings(embeddings, "reference embeddings")
            labels_array = reference_labels(labels, all_embeddings.shape[0], manifest)
        chosen = ReferenceEmbeddings.select(all_embeddings, labels_array, per_class=per_class)
        label_set = [names[int(index)] for index in np.unique(labels_array)]

        def build(state: HeadState) -> UpdatePlan:
            if state.manifest.class_names != names:
                raise UpdateError("the classes changed while the references were being computed; retry")
            return set_references_plan(state, chosen, label_set, replace)

        return self._update(build, force=False)

    def calibrate_unknown(self, examples: Any = None, *, accept_rate: float = 0.95,
                          unknown_examples: Any = None) -> UpdateResult:
        """Calibrate and store the unknown-rejection threshold (a new version).

        ``examples``: images of known classes, ideally not used to build the head (default:
        the stored reference embeddings). ``unknown_examples``: optional images of none of
        the classes; with them the threshold balances both kinds of error.
        """
        known = self._embed(examples, "unknown-rejection calibration") if examples is not None else None
        unknown = self._embed(unknown_examples, "unknown examples") if unknown_examples is not None else None

        def build(state: HeadState) -> UpdatePlan:
            return calibrate_unknown_plan(state, known, unknown, accept_rate)

        return self._update(build, force=False)

    def compact(self) -> UpdateResult:
        """Commit the current head as one set of base files (its parts folded in; a new version).

        Returns:
            The result of the new version (``action == "compact"``).
        """
        return self._update(compact_plan, force=False)

    def history(self) -> list[VersionInfo]:
        """Kept versions, oldest first, with what changed and which one is current."""
        return self.store.history()

    def rollback(self, version: int) -> UpdateResult:
        """Restore the head, classes and statistics of ``version`` (committed as a new version)."""
        if isinstance(version, bool) or not isinstance(version, (int, np.integer)):
            raise InputError(f"version must be an integer, got {version!r}")
        version = int(version)
        available = sorted(self.store.kept_manifests())
        if version not in available:  # checked again under the lock
            raise UpdateError(f"version {version} does not exist in {self.path} (kept versions: {available}); "
                              "nothing was changed")
        start = time.perf_counter()
        with self.store.lock(wait=self.wait_for_lock, timeout=self.lock_timeout):
            current = self.store.recover()
            restored = self.store.rollback_manifest(version, current)
            restored.data["change"]["from_version"] = current.version
            committed = self.store.commit(self._signing.chain(current, restored), {})
            self._signing.after_commit()
        state = load_state(self.path, committed, verify=False)
        self._apply(state)
        return UpdateResult(version=committed.version, action=ChangeAction.ROLLBACK, classes=tuple(committed.class_names),
                            change=dict(committed.data["change"]),
                            timings={"total": time.perf_counter() - start})

    def export_delta(self, path: str | Path, source: str | None = None) -> Path:
        """Write the classes added (or strengthened) on this device as a delta file for the host
        (signed with the updater's ``device_key`` when one was given)."""
        from edgeadapt.device.delta import export_delta

        return export_delta(self.path, path, source=source, device_key=self._signing.device_key)

    def refresh(self) -> bool:
        """Load a newer version committed by another process into the runtime; True if it changed."""
        return refresh_runtime(self.runtime)

    # ------------------------------------------------------------------ internals
    def _check_new_names(self, names: list) -> list[str]:
        check_new_names(names)
        manifest = self.store.read_manifest()
        for name in names:
            check_name_free(name, manifest)
        return names

    def _embed(self, examples: Any, what: str) -> np.ndarray:
        embeddings = self.runtime.embed(prepare_examples(examples, self.runtime.input_spec, what))
        return finite_embeddings(np.asarray(embeddings, dtype=np.float32), what)

    def _check_embeddings(self, embeddings: Any, what: str) -> np.ndarray:
        return check_embeddings(embeddings, self.runtime.head.embedding_size, what)

    def _options(self, state: HeadState, has_calibration: bool):
        """The options of an add/strengthen on ``state``: the method the user chose (checked against what the
        bundle carries), else the one :func:`~edgeadapt.device.incremental.choose_method` picks for it."""
        incremental = head_math()
        if self.options is not None:
            incremental.choose_method(state.stats, has_calibration, self.options.method)
            return self.options
        return incremental.AddClassOptions(method=incremental.choose_method(state.stats, has_calibration, None))

    def _check_method_early(self, strengthen: bool = False) -> None:
        """Refuse a chosen method the bundle cannot support before any image is embedded (checked again under
        the lock on the state the update really uses)."""
        incremental = head_math()
        section = self.store.read_manifest().data["head"]
        if self.options is None:
            method = incremental.choose_method(None, False, None)
            if strengthen and not section.get("statistics") and method in STRENGTHEN_NEEDS_STATISTICS:
                refuse_strengthen_without_statistics(method)
            return
        statistics = section.get("statistics")
        stats = None
        if statistics:  # what the manifest says the statistics hold (the arrays are read under the lock)
            gram = np.zeros((0, 0)) if statistics.get("gram") else None
            stats = ClassStats(sums=np.zeros((0, 0)), counts=np.zeros(0, np.int64), gram=gram)
        has_calibration = bool(section.get("background") or section.get("references"))
        incremental.choose_method(stats, has_calibration, self.options.method)
        if self.options.method == "center_l2" and not (section.get("feature_mean") and section.get("l2_normalize")):
            incremental._require_cosine_head(self.runtime.head, "center_l2")  # says what it needs

    def _references_per_class(self, state: HeadState) -> int:
        if self.references_per_class is not None:
            return self.references_per_class
        if state.references is not None and len(state.references):
            return max(1, state.references.per_class_count())
        return DEFAULT_REFERENCES_PER_CLASS

    def _add(self, names: list[str], embeddings: list[np.ndarray], force: bool, embed_seconds: float) -> UpdateResult:
        given = sum(int(part.shape[0]) for part in embeddings)
        embeddings = [distinct_examples(part) for part in embeddings]
        duplicates = given - sum(int(part.shape[0]) for part in embeddings)

        def build(state: HeadState) -> UpdatePlan:
            for name in names:
                check_name_free(name, state.manifest)
            calibration = self._calibration_rows.rows(state)
            options = self._options(state, calibration is not None)
            return add_classes_plan(state, names, embeddings, options, calibration, duplicates)

        return self._update(build, force, embed_seconds=embed_seconds)

    def _add_examples(self, name: str, embeddings: np.ndarray, force: bool, embed_seconds: float) -> UpdateResult:
        given = int(embeddings.shape[0])
        embeddings = distinct_examples(embeddings)
        duplicates = given - int(embeddings.shape[0])

        def build(state: HeadState) -> UpdatePlan:
            index = existing_index(name, state.manifest)
            calibration = calibration_embeddings(state, exclude_class=index)
            options = self._options(state, calibration is not None)
            return add_examples_plan(state, name, index, embeddings, options, calibration, duplicates,
                                     automatic=self.options is None)

        return self._update(build, force, embed_seconds=embed_seconds)

    def _update(self, build: Callable[[HeadState], UpdatePlan], force: bool, embed_seconds: float = 0.0) -> UpdateResult:
        timings = {"embed": embed_seconds}
        start = time.perf_counter()
        with self.store.lock(wait=self.wait_for_lock, timeout=self.lock_timeout):
            timings["lock"] = time.perf_counter() - start
            mark = time.perf_counter()
            current = self.store.recover()
            state = self._load_state(current)
            timings["load"] = time.perf_counter() - mark
            plan = build(state)
            timings.update(plan.timings)
            report = None
            if plan.gate:
                mark = time.perf_counter()
                references, labels, source = gate_reference_parts(state, self._references_per_class(state))
                report = evaluate_gate(state.head, plan.head, references, labels, plan.index_map,
                                       state.class_names, [entry["name"] for entry in plan.classes],
                                       self.gate_budget, source=source, force=force,
                                       changed_columns=plan.changed_columns)
                timings["gate"] = time.perf_counter() - mark
                if not report.passed and not force:
                    raise UpdateGateError(
                        f"update refused by the gate: {report.describe()}. Nothing was changed. Give more or "
                        "clearer examples, raise the budget (gate_budget / --gate-budget), or force it "
                        "(force=True / --force)", report)
                plan.change["gate"] = report.to_dict()
            mark = time.perf_counter()
            version = self.store.next_version(current)
            manifest, new_files = self._assemble(current, plan, version, state)
            timings["assemble"] = time.perf_counter() - mark
            mark = time.perf_counter()
            committed = self.store.commit(self._signing.chain(current, manifest), new_files)
            self._signing.after_commit()
            timings["commit"] = time.perf_counter() - mark
        new_state = HeadState(committed, plan.head, plan.stats, plan.references, plan.device_examples, plan.unknown,
                              state.background)
        self._remember(new_state)
        self._apply(new_state)
        timings["total"] = embed_seconds + time.perf_counter() - start
        logger.info("committed version %d (%s %s)", committed.version, plan.action, plan.change.get("classes"))
        return UpdateResult(version=committed.version, action=plan.action,
                            classes=tuple(plan.change.get("classes", ())), change=dict(committed.data["change"]),
                            gate=report, timings=timings)

    def _load_state(self, current: Manifest) -> HeadState:
        """The current version's state: from memory when this updater wrote or read exactly these
        files last (same manifest, same size/mtime/inode of every head file), else read and checksummed."""
        cached = self._state_cache
        if cached is not None and cached[0].manifest.data == current.data \
                and cached[1] == _file_signatures(self.path, head_file_paths(current)):
            return cached[0]
        state = load_state(self.path, current)
        self._remember(state)
        return state

    def _remember(self, state: HeadState) -> None:
        try:
            self._state_cache = (state, _file_signatures(self.path, head_file_paths(state.manifest)))
        except OSError:
            self._state_cache = None

    def _assemble(self, current: Manifest, plan: UpdatePlan, version: int,
                  state: HeadState | None = None) -> tuple[Manifest, dict[str, np.ndarray | bytes]]:
        """The new manifest and the head files it needs written (unchanged files are shared, appended
        classes become a small part: :func:`edgeadapt.device.version_builder.build_version`)."""
        built = build_version(current, VersionPlan(
            head=plan.head, stats=plan.stats, classes=plan.classes, change=plan.change, references=plan.references,
            device_examples=plan.device_examples, unknown=plan.unknown,
            background=state.background if state is not None else None, added_examples=plan.added_examples),
            version, tool=f"edgeadapt-device {_package_version()}", previous=state, compact=plan.compact,
            compact_fraction=self.compact_fraction)
        return built.manifest, built.new_files

    def _apply(self, state: HeadState) -> None:
        """Point the runtime at the committed version (names and head swapped in a reader-safe order)."""
        _apply_to_runtime(self.runtime, self.path, state.manifest, state.head)


def _file_signatures(root: Path, names: Iterable[str]) -> dict[str, tuple[int, int, int]]:
    signatures = {}
    for name in names:
        status = (root / name).stat()
        signatures[name] = (status.st_size, status.st_mtime_ns, status.st_ino)
    return signatures


def _package_version() -> str:
    """The installed edgeadapt version, from the package metadata (the device never imports the host package)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("edgeadapt")
    except PackageNotFoundError:
        return "unknown"
