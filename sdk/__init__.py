"""edgeadapt: adapt image classifiers on and for edge devices (host side).

Everything a host user needs is one import away::

    from edgeadapt import synthetic_dataset, train_classifier, split_classifier, export_bundle

Data (:func:`load_image_folder`, :func:`synthetic_dataset`), training (:func:`train_classifier`,
:func:`fine_tune`), the backbone/head split (:func:`split_classifier`), bundles
(:func:`export_bundle`, :func:`import_classifier`, :func:`add_classes`, :func:`merge_heads`,
:func:`merge_deltas`), input adaptation (:func:`adapt_input`), the option dataclasses they take,
the device runtime (:class:`Runtime`, :class:`HeadUpdater`) and every error type
(:class:`EdgeAdaptError` and its subclasses, from :mod:`edgeadapt.device.errors`).

Nothing heavy is imported here: names load on first use, and TensorFlow loads only when a
host function that needs it runs, so ``import edgeadapt.device`` works without TensorFlow.
"""

from __future__ import annotations

from edgeadapt.device.lazy_exports import lazy_attributes

__version__ = "0.1.0"

_ERRORS = ("EdgeAdaptError", "BundleError", "InputError", "IncompatibleModelError", "DatasetError",
           "ConversionError", "BackendUnavailableError", "UpdateError", "ConcurrentUpdateError")

#: public name -> module that defines it (imported on first access)
_EXPORTS: dict[str, str] = {
    # data
    "load_image_folder": "edgeadapt.data.image_folders",
    "SplitOptions": "edgeadapt.data.image_folders",
    "Dataset": "edgeadapt.data.image_folders",
    "synthetic_dataset": "edgeadapt.data.synthetic",
    "SyntheticOptions": "edgeadapt.data.synthetic",
    # training and fine-tuning
    "train_classifier": "edgeadapt.training.classifier",
    "ClassifierTrainingOptions": "edgeadapt.training.classifier",
    "fine_tune": "edgeadapt.training.finetune",
    "FineTuneOptions": "edgeadapt.training.finetune",
    "split_classifier": "edgeadapt.training.model_split",
    "load_keras_model": "edgeadapt.training.model_split",
    "compute_embeddings": "edgeadapt.data.embeddings",
    "adapt_input": "edgeadapt.training.input_adaptation",
    # bundles
    "export_bundle": "edgeadapt.converters.bundle_export",
    "BundleExportOptions": "edgeadapt.converters.bundle_export",
    "import_classifier": "edgeadapt.bundles.importing",
    "ImportSettings": "edgeadapt.bundles.importing",
    "add_classes": "edgeadapt.bundles.incremental",
    "merge_heads": "edgeadapt.bundles.incremental",
    "merge_deltas": "edgeadapt.bundles.deltas",
    "MergeDeltasOptions": "edgeadapt.bundles.deltas",
    "run_demo": "edgeadapt.pipeline",
    "DemoOptions": "edgeadapt.pipeline",
    # the device side, re-exported
    "InputSpec": "edgeadapt.device.manifest",
    "ClassStats": "edgeadapt.device.head",
    "Head": "edgeadapt.device.head",
    "Bundle": "edgeadapt.device.bundle",
    "Runtime": "edgeadapt.device.runtime",
    "HeadUpdater": "edgeadapt.device.updater",
    **{name: "edgeadapt.device.errors" for name in _ERRORS},
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS, globals())
