"""The class-incremental benchmark behind ``edgeadapt bench incremental``.

For each class order (fixed seeds):

1. the backbone: by default the built-in classifier is trained on the BASE classes only and
   split into backbone + head; with ``backbone_bundle`` a pretrained backbone is read from a
   bundle (e.g. an imported ImageNet MobileNet, ``edgeadapt import``) and run by the device
   :class:`~edgeadapt.device.runtime.Runtime` at the bundle's own input size. The embeddings
   of every split are computed once (and cached with ``cache``);
2. the base head is trained on the base classes' embeddings with the default normalisation
   (centred on the stored base mean); the class statistics of the base classes are kept;
3. for each shot count (examples per new class) and each method, the new classes are added
   with :func:`edgeadapt.device.incremental.add_classes` and the result is measured on the
   test split of all seen classes.

Baselines: ``joint`` retrains the whole head on all training data of every class (the
upper bound), ``joint (old data + shots)`` retrains it on all old data plus the same shots,
``resolve_all`` re-fits every column from the statistics, ``none`` is the uncalibrated lower
bound and ``imprint`` plain imprinting. ``center_l2`` is run on a cosine base head (centred +
L2-normalised features, temperature 0.1) trained on the same embeddings, because it needs one.

Columns (the fair measure, :mod:`edgeadapt.benchmarks.fewshot_measure`): old-class accuracy (mean over
the old classes of each one's accuracy, predictions over all seen classes), new-class recall
(mean over the new classes), their harmonic mean and its ratio to the joint retrain's in the
same order; old-class drop against the base model before the step (old test images, old
classes only; positive = lost); new-class false-positive rate on old-class test images; time
of the update; bytes stored per class; whether old-class logits stayed bit-identical. The
all-class accuracy is not reported: old-class photos dominate a test set, so a head that
never predicts a new class already scored 0.8 of the joint on it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeadapt.benchmarks.incremental_data import BundleBackbone, class_orders, load_dataset, order_embeddings
from edgeadapt.benchmarks.incremental_measure import ALL_SHOTS, measure_order
from edgeadapt.benchmarks.incremental_report import IncrementalBenchmarkReport, aggregate_rows, benchmark_figures
from edgeadapt.device.errors import InputError
from edgeadapt.device.incremental import METHODS, AddClassOptions

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class IncrementalBenchmarkOptions:
    """What :func:`run_incremental_benchmark` measures.

    ``data``: a folder with one sub-folder per class (None: the built-in synthetic shapes).
    ``base`` classes first, then ``step`` new classes, in ``orders`` class orders.
    ``shots``: examples per new class; 0 means all. ``methods``: from
    :data:`edgeadapt.device.incremental.METHODS`. ``add_options``: knobs for every method
    (its ``method`` field is replaced per row). ``cache``: folder where each order's
    backbone embeddings are kept, so a second run skips training.

    ``backbone_bundle``: a bundle whose pretrained backbone embeds every image instead of the
    built-in CNN trained on the base classes (None, the default). It runs through the device
    Runtime with ``backbone_backend`` ("auto": LiteRT first) at the bundle's input size;
    ``image_size``, ``epochs`` and ``backbone`` (which configure the built-in training) must
    then be left unset. The base head is still trained on the base classes' embeddings.
    """

    data: Path | None = None
    base: int = 2
    step: int = 2
    shots: tuple[int, ...] = (1, 5, 20, ALL_SHOTS)
    orders: int = 3
    methods: tuple[str, ...] = METHODS
    image_size: int | None = None
    epochs: int | None = None
    seed: int = 0
    cache: Path | None = None
    add_options: AddClassOptions = AddClassOptions()
    backbone: Any = None  # edgeadapt.training.backbones.BackboneOptions, None = default
    synthetic_classes: int = 6
    synthetic_images_per_class: int = 120
    verbose: int = 0
    backbone_bundle: Path | None = None
    backbone_backend: str = "auto"

    def __post_init__(self) -> None:
        if self.base < 2:
            raise InputError(f"base must be at least 2 classes (a classifier needs two), got {self.base}")
        if self.step < 1:
            raise InputError(f"step must be at least 1 new class, got {self.step}")
        if self.orders < 1:
            raise InputError(f"orders must be at least 1, got {self.orders}")
        if not self.shots or any(shot < 0 for shot in self.shots):
            raise InputError(f"shots must be positive counts or 0 for all, got {self.shots}")
        unknown = [method for method in self.methods if method not in METHODS]
        if unknown:
            raise InputError(f"unknown methods {unknown}; choose from {METHODS}")
        if self.backbone_bundle is not None:
            self._check_bundle_options()

    def _check_bundle_options(self) -> None:
        built_in = {"epochs": self.epochs, "backbone": self.backbone}
        given = [name for name, value in built_in.items() if value is not None]
        if given:
            raise InputError(
                f"{' and '.join(given)} only apply to training the built-in backbone, but backbone_bundle "
                f"({self.backbone_bundle}) uses a pretrained backbone as it is: leave {' and '.join(given)} unset"
            )



def run_incremental_benchmark(options: IncrementalBenchmarkOptions, dataset=None) -> IncrementalBenchmarkReport:
    """Run the benchmark; ``dataset`` overrides ``options.data`` (an :class:`edgeadapt.data.image_folders.Dataset`)."""
    if options.backbone_bundle is None:
        return _run(options, dataset, None)
    bundle = BundleBackbone.open(options.backbone_bundle, options.backbone_backend)
    try:
        return _run(options, dataset, bundle)
    finally:
        bundle.close()


def _run(options: IncrementalBenchmarkOptions, dataset, bundle: BundleBackbone | None) -> IncrementalBenchmarkReport:
    start = time.perf_counter()
    dataset = dataset if dataset is not None else load_dataset(options, bundle.spec if bundle is not None else None)
    orders = class_orders(len(dataset.class_names), options.base, options.step, options.orders, options.seed)
    per_order: list[dict] = []
    descriptions: list[dict] = []
    size = 0
    for order, (seed_index, classes) in enumerate(orders):
        data = order_embeddings(options, dataset, order, classes, seed_index, bundle)
        size = data.embedding_size
        measurements, description = measure_order(data, options)
        per_order.append(measurements)
        descriptions.append(description)
        logger.info("order %d measured", order)
    rows = aggregate_rows(per_order, options.shots, options.methods)
    name = "built-in synthetic shapes" if options.data is None and dataset is not None else str(options.data)
    if options.data is not None:
        name = f"{Path(options.data).name} ({len(dataset.class_names)} classes)"
    resolved_options = dataclasses.asdict(options)
    resolved_options["image_size"] = dataset.spec.height
    return IncrementalBenchmarkReport(options=resolved_options, dataset=name, embedding_size=size,
                                      backbone=bundle.describe() if bundle is not None else {"kind": "built-in"},
                                      orders=descriptions, rows=rows, figures=benchmark_figures(rows, options.shots),
                                      seconds=time.perf_counter() - start)
