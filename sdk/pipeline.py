"""The end-to-end pipeline behind ``edgeadapt demo``: train, split, export, run on the device runtime."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from edgeadapt.device.head import ClassStats, Head

logger = logging.getLogger(__name__)
#: Held-out test images per class that the demo writes to OUT/samples/ (for trying the bundle).
SAMPLES_PER_CLASS = 3


@dataclass(frozen=True)
class DemoOptions:
    """Settings of :func:`run_demo`. ``data`` None means the built-in synthetic dataset."""

    output: Path
    data: Path | None = None
    image_size: int | None = None
    epochs: int | None = None
    formats: tuple[str, ...] = ("tflite", "onnx")
    seed: int = 0
    verbose: int = 2
    overwrite: bool = True


@dataclass
class FormatResult:
    format: str
    float_accuracy: float
    int8_accuracy: float
    top1_agreement: float
    float_size: int
    int8_size: int
    runtime_accuracy: float
    latency_ms: float
    backend: str


@dataclass
class DemoReport:
    """What the demo measured."""

    class_names: list[str]
    bundle_path: Path
    keras_accuracy: float
    train_images: int
    test_images: int
    bundle_size: int
    float_bundle_size: int
    train_seconds: float
    formats: list[FormatResult] = field(default_factory=list)
    samples_path: Path | None = None

    def table(self) -> str:
        """A short human-readable table of the results."""
        lines = [
            f"classes            : {', '.join(self.class_names)}",
            f"images train/test  : {self.train_images}/{self.test_images}",
            f"keras test accuracy: {self.keras_accuracy:.3f}  (trained in {self.train_seconds:.0f} s)",
            f"bundle             : {self.bundle_path}  ({self.bundle_size / 1024:.0f} KiB int8; "
            f"float32 backbones would be {self.float_bundle_size / 1024:.0f} KiB)",
            *([f"sample images      : {self.samples_path}/<class>/0000.png ... (held-out test images)"]
              if self.samples_path else []),
            "",
            f"{'format':<8}{'float acc':>10}{'int8 acc':>10}{'agree':>8}{'float KiB':>11}{'int8 KiB':>10}"
            f"{'device acc':>12}{'ms/image':>10}  backend",
        ]
        for row in self.formats:
            lines.append(
                f"{row.format:<8}{row.float_accuracy:>10.3f}{row.int8_accuracy:>10.3f}{row.top1_agreement:>8.3f}"
                f"{row.float_size / 1024:>11.0f}{row.int8_size / 1024:>10.0f}{row.runtime_accuracy:>12.3f}"
                f"{row.latency_ms:>10.2f}  {row.backend}"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict:
        from dataclasses import asdict

        data = asdict(self)
        data["bundle_path"] = str(self.bundle_path)
        data["samples_path"] = None if self.samples_path is None else str(self.samples_path)
        return data


def load_demo_dataset(options: DemoOptions):
    """The built-in synthetic dataset, or a folder of class sub-folders resized to ``image_size``."""
    from edgeadapt.data.image_folders import SplitOptions, load_image_folder
    from edgeadapt.device.manifest import InputSpec
    from edgeadapt.data.synthetic import SyntheticOptions, synthetic_dataset

    split = SplitOptions(seed=options.seed)
    if options.data is None:
        size = options.image_size or 32
        return synthetic_dataset(SyntheticOptions(image_size=size, images_per_class=200, seed=options.seed), split)
    size = options.image_size or 64
    return load_image_folder(options.data, InputSpec(height=size, width=size), split)


def measure_latency(runtime, images: np.ndarray, repeats: int = 50) -> float:
    """Median milliseconds of ``runtime.predict`` on single images (after one warm-up call)."""
    runtime.predict(images[0])
    timings = []
    for index in range(repeats):
        start = time.perf_counter()
        runtime.predict(images[index % len(images)])
        timings.append(time.perf_counter() - start)
    return float(np.median(timings) * 1000.0)


def _write_samples(folder: Path, dataset, per_class: int = SAMPLES_PER_CLASS) -> Path:
    """A few held-out test images per class as PNG files, to try the bundle on (README)."""
    from edgeadapt.data.image_folders import write_image_folder

    chosen = np.concatenate([np.flatnonzero(dataset.test.labels == label)[:per_class]
                             for label in range(len(dataset.class_names))])
    return write_image_folder(folder, dataset.class_names, dataset.test.images[chosen], dataset.test.labels[chosen])


def run_demo(options: DemoOptions) -> DemoReport:
    """Train the built-in classifier, export an int8 TFLite + ONNX bundle, classify with the device runtime.

    Args:
        options: Output folder, data (default: built-in), image size, epochs, formats, seed.

    Returns:
        Accuracy, sizes and latency of each format, with the bundle path.

    Raises:
        DatasetError: When ``options.data`` cannot be loaded.
        ConversionError: When an export fails.
    """
    from edgeadapt.converters.bundle_export import BundleExportOptions, export_bundle
    from edgeadapt.device.bundle import Bundle
    from edgeadapt.device.reference_embeddings import ReferenceEmbeddings
    from edgeadapt.training.model_split import split_classifier
    from edgeadapt.training.classifier import ClassifierTrainingOptions, train_classifier

    output = Path(options.output)
    dataset = load_demo_dataset(options)
    logger.info("dataset: %d classes, %d/%d/%d images", len(dataset.class_names), len(dataset.train),
                len(dataset.validation), len(dataset.test))
    epochs = options.epochs or 15
    start = time.perf_counter()
    model = train_classifier(dataset, ClassifierTrainingOptions(epochs=epochs, seed=options.seed, verbose=options.verbose))
    train_seconds = time.perf_counter() - start

    split = split_classifier(model)
    refined = _refine_head(split, dataset, output, options.seed)
    stats = ClassStats.from_embeddings(refined.train_embeddings, dataset.train.labels, len(dataset.class_names))

    bundle_path = output / "model.eab"
    export = export_bundle(
        bundle_path,
        backbone=split.backbone,
        head=refined.head,
        input_spec=dataset.spec,
        class_names=dataset.class_names,
        calibration_images=dataset.train.images,
        calibration_labels=dataset.train.labels,
        evaluation_images=dataset.test.images,
        evaluation_labels=dataset.test.labels,
        class_stats=stats,
        backbone_fingerprint=refined.fingerprint,
        reference_embeddings=ReferenceEmbeddings.select(refined.train_embeddings, dataset.train.labels, per_class=5),
        options=BundleExportOptions(formats=options.formats, name="demo", overwrite=options.overwrite),
    )
    bundle = Bundle.open(bundle_path, trusted_keys=False)  # just written, not signed yet (edgeadapt sign)
    head_bytes = bundle.total_size() - sum(export.quantized_sizes.values())
    report = DemoReport(
        class_names=list(dataset.class_names),
        bundle_path=bundle_path,
        keras_accuracy=refined.keras_accuracy,
        train_images=len(dataset.train),
        test_images=len(dataset.test),
        bundle_size=bundle.total_size(),
        float_bundle_size=head_bytes + sum(export.float_sizes.values()),
        train_seconds=train_seconds,
        samples_path=_write_samples(output / "samples", dataset),
    )
    report.formats.extend(_format_results(options.formats, bundle_path, export, dataset))
    return report


@dataclass
class _RefinedHead:
    """The demo head refined on cached embeddings, the backbone's fingerprint and the training embeddings."""

    head: Head
    fingerprint: str
    train_embeddings: np.ndarray
    keras_accuracy: float


def _refine_head(split, dataset, output: Path, seed: int) -> _RefinedHead:
    """Refine the split classifier's head on cached embeddings: the backbone does not run during head training."""
    from edgeadapt.data.embeddings import EmbeddingCache
    from edgeadapt.training.head_training import DEFAULT_NORMALIZATION, HeadTrainingOptions, train_head
    from edgeadapt.training.model_split import backbone_fingerprint

    fingerprint = backbone_fingerprint(split.backbone)
    cache = EmbeddingCache(output / "embedding-cache")
    spec = dataset.spec
    train_embeddings = cache.embeddings(split.backbone, fingerprint, dataset.train.images, spec)
    validation_embeddings = cache.embeddings(split.backbone, fingerprint, dataset.validation.images, spec)
    test_embeddings = cache.embeddings(split.backbone, fingerprint, dataset.test.images, spec)
    head = train_head(
        train_embeddings, dataset.train.labels, len(dataset.class_names),
        # Centred on the stored base mean: class additions keep it, so old logits stay bit-identical.
        HeadTrainingOptions(seed=seed, normalization=DEFAULT_NORMALIZATION),
        validation=(validation_embeddings, dataset.validation.labels),
        initial=split.head,
    )
    keras_accuracy = float(np.mean(head.logits(test_embeddings).argmax(1) == dataset.test.labels))
    return _RefinedHead(head, fingerprint, train_embeddings, keras_accuracy)


def _format_results(formats: Sequence[str], bundle_path: Path, export, dataset) -> list[FormatResult]:
    """Accuracy, sizes and latency of each exported format, run by the device Runtime on the test split."""
    from edgeadapt.device.runtime import Runtime

    results: list[FormatResult] = []
    backend_for = {"tflite": "auto", "onnx": "onnxruntime"}
    for model_format in formats:
        runtime = Runtime.open(bundle_path, backend=backend_for[model_format], trusted_keys=False)
        if model_format == "tflite" and runtime.backend_name == "onnxruntime":
            continue
        predictions = runtime.logits(dataset.test.images).argmax(1)
        parity = export.parity[model_format]
        results.append(
            FormatResult(
                format=model_format,
                float_accuracy=parity.float_accuracy,
                int8_accuracy=parity.quantized_accuracy,
                top1_agreement=parity.top1_agreement,
                float_size=parity.float_size,
                int8_size=parity.quantized_size,
                runtime_accuracy=float(np.mean(predictions == dataset.test.labels)),
                latency_ms=measure_latency(runtime, dataset.test.images),
                backend=runtime.backend_name,
            )
        )
    return results
