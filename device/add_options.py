"""How a class is added to a head: the methods, :class:`AddClassOptions` and :func:`choose_method` (numpy-free).

Shared by the head math (:mod:`edgeadapt.device.incremental`), its solvers
(:mod:`edgeadapt.device.ridge`, :mod:`edgeadapt.device.fewshot`) and their callers, so that
the solvers need not import the module that calls them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from edgeadapt.device.errors import IncompatibleModelError, InputError

if TYPE_CHECKING:  # pragma: no cover
    from edgeadapt.device.head import ClassStats

#: Calibration methods, best first (see the module docstring and docs/INCREMENTAL.md).
METHODS = ("claim", "ridge", "center_l2", "imprint_calibrated", "weight_align", "imprint", "none")
#: Chosen by the few-shot benchmark (``edgeadapt bench fewshot``); see docs/INCREMENTAL.md. Works with
#: or without class statistics (:mod:`edgeadapt.device.fewshot`).
DEFAULT_METHOD = "claim"
#: Methods that need class statistics with a Gram matrix for every operation.
STATISTICS_METHODS = ("ridge",)
#: What callers use when a head has no class statistics and the user did not choose a method:
#: needs no statistics and works with any feature normalisation (the default does).
STATISTICS_FREE_METHOD = "claim"
#: Methods that train new columns by gradient descent.
TRAINED_METHODS = ("weight_align", "none")


@dataclass(frozen=True)
class AddClassOptions:
    """How new columns are computed.

    ``method``: one of :data:`METHODS`.
    ``shrinkage`` (ridge, discriminant part): weight ``a`` in [0, 1] of the scaled
    identity in the shared covariance; more shrinkage trusts the stored covariance less.
    ``small_sample_correction`` (ridge, discriminant part): fraction ``g`` in [0, 1] of the
    small-sample bias correction ``d/n_c`` applied to each class's bias; 1 removes the whole
    expected inflation of ``m S^-1 m`` by a mean estimated from ``n_c`` examples, 0 none.
    ``regularization`` (ridge, least-squares part): ridge added to the class-moment
    matrix, relative to its mean diagonal.
    ``few_shot_examples`` (ridge): a class with n examples takes ``n / (n + this)`` of its
    column from the least-squares solution, the rest from the discriminant (0: only
    least squares).
    ``training_steps``, ``learning_rate``, ``weight_decay`` (weight_align, none): full-batch
    Adam on the new examples (and replay examples when the caller has some).
    ``own_example_quantile`` (imprint_calibrated): fraction q in [0, 1) of a new class's own
    examples on which it may lose to the head's other columns; the bias is set so that it
    wins on the other 1 - q (smaller q: higher bias, the new class claims more).
    ``claim_budget`` (claim): the operating knob. The largest fraction of the calibration
    embeddings (samples drawn from the old classes' statistics, background photos, references,
    earlier device examples) a new class may take from the existing classes: smaller keeps
    the old classes safer, larger recognises more of the new class.
    ``claim_shrinkage`` (claim, with statistics): weight of the scaled identity in the shared
    covariance of the discriminant direction.
    ``basis_refresh_fraction``, ``basis_refresh_minimum`` (ridge): the cached solver state
    (:class:`RidgeBasis`) serves ``max(minimum, fraction x its classes)`` updates before it is
    rebuilt from the current statistics (1000 classes: every 250 added classes); a fraction
    of 0 rebuilds it for every update (exact but O(D^3 + D^2 C) each time).
    """

    method: str = DEFAULT_METHOD
    shrinkage: float = 0.2
    small_sample_correction: float = 0.25
    regularization: float = 1e-3
    few_shot_examples: float = 50.0
    training_steps: int = 300
    learning_rate: float = 0.05
    weight_decay: float = 1e-4
    own_example_quantile: float = 0.05
    basis_refresh_fraction: float = 0.25
    basis_refresh_minimum: int = 4
    claim_budget: float = 0.02
    claim_shrinkage: float = 0.7

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InputError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if not 0.0 <= self.shrinkage <= 1.0:
            raise InputError(f"shrinkage must be in [0, 1], got {self.shrinkage}")
        if not self.regularization > 0:
            raise InputError(f"regularization must be positive, got {self.regularization}")
        if self.few_shot_examples < 0:
            raise InputError(f"few_shot_examples must be non-negative, got {self.few_shot_examples}")
        if not 0.0 <= self.small_sample_correction <= 1.0:
            raise InputError(f"small_sample_correction must be in [0, 1], got {self.small_sample_correction}")
        if self.training_steps < 1:
            raise InputError(f"training_steps must be at least 1, got {self.training_steps}")
        if not self.learning_rate > 0:
            raise InputError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.weight_decay < 0:
            raise InputError(f"weight_decay must be non-negative, got {self.weight_decay}")
        if not 0.0 <= self.own_example_quantile < 1.0:
            raise InputError(f"own_example_quantile must be in [0, 1), got {self.own_example_quantile}")
        if not 0.0 <= self.basis_refresh_fraction <= 1e6:
            raise InputError(f"basis_refresh_fraction must be non-negative, got {self.basis_refresh_fraction}")
        if self.basis_refresh_minimum < 1:
            raise InputError(f"basis_refresh_minimum must be at least 1, got {self.basis_refresh_minimum}")
        if not 0.0 < self.claim_budget < 1.0:
            raise InputError(f"claim_budget must lie in (0, 1), got {self.claim_budget}")
        if not 0.0 <= self.claim_shrinkage <= 1.0:
            raise InputError(f"claim_shrinkage must be in [0, 1], got {self.claim_shrinkage}")


def needs_statistics(method: str) -> bool:
    """Whether ``method`` needs :class:`ClassStats` with a Gram matrix to add a class."""
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return method in STATISTICS_METHODS


def choose_method(stats: ClassStats | None, has_calibration: bool, requested: str | None) -> str:
    """The method an update uses on a head with ``stats``: ``requested``, or the best one the head supports.

    Args:
        stats: the head's class statistics, or None when the bundle carries none (e.g. imported
            without ``--data``, or a headless import).
        has_calibration: whether calibration embeddings (the bundle's background and/or
            reference embeddings) are available to the update.
        requested: the method the user chose (one of :data:`METHODS`), or None for the automatic
            choice.

    Returns:
        ``requested`` when given and supported; otherwise :data:`DEFAULT_METHOD` when ``stats``
        hold a Gram matrix, else :data:`STATISTICS_FREE_METHOD`.

    Raises:
        InputError: ``requested`` is not one of :data:`METHODS`.
        IncompatibleModelError: ``requested`` needs class statistics (with a Gram matrix) that
            the bundle does not carry; the message says what it needs and what to do.
    """
    del has_calibration  # no method of this module needs it to be chosen; the few-shot method will
    if requested is not None:
        if not isinstance(requested, str) or requested not in METHODS:
            raise InputError(f"unknown method {requested!r}; choose one of {', '.join(METHODS)}")
        if requested in STATISTICS_METHODS and (stats is None or stats.gram is None):
            what = "class statistics with a Gram matrix" if stats is None else "a Gram matrix in its class statistics"
            raise IncompatibleModelError(
                f"method {requested!r} needs {what} (per-class sums and counts of the existing classes and "
                f"sum(e e^T)), and this bundle has {'none' if stats is None else 'no Gram matrix'}. Import or export "
                "the model with class statistics (`edgeadapt import ... --data DIR`), or leave the method out to "
                f"use the automatic choice ({STATISTICS_FREE_METHOD} here), or choose one of "
                f"{', '.join(name for name in METHODS if name not in STATISTICS_METHODS)}"
            )
        return requested
    if stats is not None and stats.gram is not None:
        return DEFAULT_METHOD
    return STATISTICS_FREE_METHOD
