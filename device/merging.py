"""Whole-head operations on statistics: merge two heads, re-solve every column, attach solver state.

Unlike adding a class (:mod:`edgeadapt.device.incremental`), :func:`resolve_all` changes the
old classes' outputs, and :func:`merge_heads` computes a second head's classes in the first
head's space. numpy only.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

import numpy as np

from edgeadapt.device.add_options import AddClassOptions
from edgeadapt.device.columns import align_weights, appended, mean_norm, unit_columns
from edgeadapt.device.errors import IncompatibleModelError, InputError
from edgeadapt.device.head import ClassStats, Head
from edgeadapt.device.head_checks import check_options, check_stats, require_cosine_head, require_statistics
from edgeadapt.device.ridge import resolve_columns, ridge_merge_columns
from edgeadapt.device.ridge_basis import build_ridge_basis
from edgeadapt.device.stats_extras import EXTRA_KEY

if TYPE_CHECKING:  # pragma: no cover
    from edgeadapt.device.manifest import Manifest

logger = logging.getLogger(__name__)


def merge_heads(
    a: Head,
    a_stats: ClassStats | None,
    b: Head,
    b_stats: ClassStats | None,
    options: AddClassOptions = AddClassOptions(),
) -> tuple[Head, ClassStats | None]:
    """Append the classes of head ``b`` to head ``a`` (a's columns stay bit-identical).

    Both heads must come from the same backbone: the caller compares the backbone
    fingerprints; here only the embedding size is checked. How b's columns enter a:

    - ``ridge``: recomputed from ``b_stats`` (class means) with the shared covariance of the
      combined statistics and calibrated against a's columns, exactly as :func:`add_classes`
      would from b's examples. Needs ``a_stats`` with a Gram matrix and ``b_stats``.
    - ``center_l2`` / ``imprint``: from b's class means when ``b_stats`` is given, otherwise
      from b's own columns (normalised, scaled to a's mean norm; center_l2 only), which then
      needs b to normalise features exactly like a.
    - ``claim``: with ``b_stats``, each of b's classes is added from its class mean as with
      :func:`add_classes` (direction and claim-budget bias against a's columns); without,
      b's own columns as with ``weight_align`` (same normalisation needed).
    - ``weight_align``: b's own columns rescaled to a's mean column norm, biases recentred
      on a's mean bias (same normalisation needed).
    - ``none``: b's columns copied unchanged (plain concatenation; same normalisation needed).

    Returns the merged head and statistics (``a_stats`` rows then ``b_stats`` rows, Gram
    matrices added; b's Gram is estimated from a's shared covariance when b has none), or
    None statistics when either side has none.
    """
    options = check_options(options)
    if a.embedding_size != b.embedding_size:
        raise IncompatibleModelError(
            f"head a takes {a.embedding_size}-d embeddings and head b {b.embedding_size}-d: they come from different "
            "backbones and cannot be merged; train head b on embeddings of a's backbone"
        )
    check_stats(a, a_stats, "statistics of head a")
    check_stats(b, b_stats, "statistics of head b")
    merged_stats = None if a_stats is None or b_stats is None else a_stats.merged(b_stats)
    new_weights, new_bias = _merged_columns(a, a_stats, b, b_stats, merged_stats, options)
    return appended(a, new_weights, new_bias), merged_stats


def _merged_columns(a: Head, a_stats: ClassStats | None, b: Head, b_stats: ClassStats | None,
                    merged_stats: ClassStats | None, options: AddClassOptions) -> tuple[np.ndarray, np.ndarray]:
    """The columns of b's classes in a, by ``options.method`` (see :func:`merge_heads`)."""
    method = options.method

    def need_same_normalisation(reason: str) -> None:
        if not a.same_normalisation(b):
            raise IncompatibleModelError(
                f"heads a and b normalise features differently (feature mean, L2, temperature), so {reason}; "
                "give b's class statistics and use method 'ridge' (its columns are then recomputed in a's space)"
            )

    if method == "ridge":
        require_statistics(a_stats, method, "merge heads")
        if b_stats is None:
            raise IncompatibleModelError(
                "method 'ridge' merges head b through its class statistics, and b has none; export b with class "
                "statistics, or merge with method 'weight_align' (rescales b's own columns)"
            )
        if np.any(b_stats.counts <= 0):
            raise InputError("head b's statistics hold a class with zero examples; every merged class needs examples")
        assert merged_stats is not None and a_stats is not None  # (require_statistics / the check above)
        new_weights, new_bias = ridge_merge_columns(a, a_stats, b_stats, merged_stats, options)
    elif method in ("center_l2", "imprint"):
        if method == "center_l2":
            require_cosine_head(a, method)
        if b_stats is not None:
            if np.any(b_stats.counts <= 0):
                raise InputError("head b's statistics hold a class with zero examples; every merged class needs examples")
            means = b_stats.means()
            if a.feature_mean is not None:
                means = means - a.feature_mean.astype(np.float64)
            directions = unit_columns(means.T)
        else:
            need_same_normalisation(f"b's own columns cannot be used by method {method!r}")
            directions = unit_columns(b.weights.astype(np.float64))
        if method == "imprint":
            new_weights, new_bias = directions, np.zeros(b.num_classes)
        else:
            new_weights = directions * mean_norm(a.weights)
            new_bias = np.full(b.num_classes, float(np.mean(a.bias)))
    elif method == "claim" and b_stats is not None:
        from edgeadapt.device.fewshot import claim_columns

        if np.any(b_stats.counts <= 0):
            raise InputError("head b's statistics hold a class with zero examples; every merged class needs examples")
        new_weights, new_bias = claim_columns(a, a_stats, [mean[None, :] for mean in b_stats.means()], None, options)
    elif method == "claim":
        need_same_normalisation("b's columns cannot be weight-aligned into a (method 'claim' without b's statistics)")
        new_weights, new_bias = align_weights(b.weights.astype(np.float64), b.bias.astype(np.float64), a.weights, a.bias)
    elif method == "imprint_calibrated":
        raise IncompatibleModelError(
            "method 'imprint_calibrated' calibrates each new bias on the new class's own examples, and a merge has "
            "only head b's columns and statistics; merge with 'ridge' (with statistics) or 'weight_align', or add b's "
            "classes from their examples with add_classes"
        )
    elif method == "weight_align":
        need_same_normalisation("b's columns cannot be weight-aligned into a")
        new_weights, new_bias = align_weights(b.weights.astype(np.float64), b.bias.astype(np.float64), a.weights, a.bias)
    else:
        need_same_normalisation("b's columns cannot be concatenated to a")
        new_weights, new_bias = b.weights.astype(np.float64), b.bias.astype(np.float64)
    return new_weights, new_bias


def resolve_all(head: Head, stats: ClassStats | None, options: AddClassOptions = AddClassOptions()) -> Head:
    """Re-fit ALL columns jointly from the class statistics. CHANGES OLD-CLASS OUTPUTS.

    The upper-bound-quality closed form: the shrinkage discriminant of every class from
    the statistics (``options.shrinkage``, ``options.small_sample_correction``; the
    method name is not used), put on the current head's logit scale (the same calibration
    as ridge, fitted over all columns) and keeping the head's feature normalisation. Use
    it when old outputs may change, e.g. after many classes were added one at a time.
    Needs statistics with a Gram matrix and examples for every class.
    """
    options = check_options(options)
    check_stats(head, stats)
    stats = require_statistics(stats, "ridge", "re-solve the head")
    empty = np.flatnonzero(stats.counts <= 0)
    if empty.size:
        raise IncompatibleModelError(
            f"the class statistics hold no examples for class(es) {empty.tolist()}; a joint re-fit needs examples of "
            "every class"
        )
    new_weights, new_bias = resolve_columns(head, stats, options)
    return head.with_columns(new_weights.astype(np.float32), new_bias.astype(np.float32))


def with_ridge_basis(head: Head, stats: ClassStats | None, options: AddClassOptions = AddClassOptions()) -> ClassStats | None:
    """``stats`` with the ridge solver state attached (built when it has none), for writing a bundle.

    A bundle that carries its :class:`RidgeBasis` lets the device add a class to a large head
    in milliseconds from the first update on. Statistics without a Gram matrix, or whose basis
    cannot be built (no examples, degenerate), are returned unchanged.
    """
    if stats is None or stats.gram is None or stats.ridge_basis is not None:
        return stats
    check_stats(head, stats)
    try:
        basis = build_ridge_basis(head, stats, check_options(options))
    except IncompatibleModelError as error:
        logger.warning("no ridge solver state written with the statistics: %s", error)
        return stats
    return dataclasses.replace(stats, ridge_basis=basis)


def with_ridge_basis_if(keep: bool, head: Head, stats: ClassStats | None,
                        options: AddClassOptions = AddClassOptions()) -> ClassStats | None:
    """``stats`` as a host writer stores them: with the ridge solver state when ``keep``, else without it.

    The state (about 3 D^2 + 2 D x C float32 values) serves only ``method="ridge"``; a bundle
    without it builds it on the device at the first ridge update, whose commit then stores it.
    Host exports and imports keep it when asked; host updates keep it when the parent carried
    it (:func:`with_ridge_basis_like`).

    Args:
        keep: store the solver state (built when ``stats`` have none).
        head: the head the statistics belong to.
        stats: the class statistics, or None.
        options: the ridge settings the state is built for.

    Returns:
        The statistics to write (None when ``stats`` is None).
    """
    if keep:
        if stats is None or stats.gram is None:
            logger.warning("no ridge solver state written: it needs class statistics with a Gram matrix")
        return with_ridge_basis(head, stats, options)
    if stats is None or stats.ridge_basis is None:
        return stats
    return dataclasses.replace(stats, ridge_basis=None)


def carries_ridge_basis(manifest: "Manifest") -> bool:
    """Whether the current version of a bundle stores the ridge solver state with its statistics.

    Args:
        manifest: the bundle's manifest.

    Returns:
        True when its head statistics list a ``ridge_basis`` entry.
    """
    statistics = manifest.data.get("head", {}).get("statistics")
    return isinstance(statistics, dict) and statistics.get(EXTRA_KEY) is not None


def with_ridge_basis_like(parent: "Manifest", head: Head, stats: ClassStats | None) -> ClassStats | None:
    """``stats`` for a host-made new version of ``parent``: with the ridge solver state only when the parent carried it.

    So a bundle exported with the state keeps it through host updates, and one exported
    without it stays without.

    Args:
        parent: the manifest of the version the new one derives from.
        head: the new version's head.
        stats: the new version's class statistics, or None.

    Returns:
        The statistics to write.
    """
    return with_ridge_basis_if(carries_ridge_basis(parent), head, stats)
