"""Fine-tune a pretrained classifier on a new dataset: ``head_only``, ``top_layers(n)`` or ``full``.

One trainer, :func:`fine_tune`, with its settings in :class:`FineTuneOptions`:

- ``head_only`` — the backbone is frozen: embeddings are computed once (optionally
  cached on disk) and a linear head is trained on them. Fast; the backbone fingerprint,
  and so every existing head bound to it, stays valid.
- ``top_layers`` (n blocks) — staged: the head is trained first on cached embeddings,
  then the top n blocks of the backbone are unfrozen and trained together with the head,
  the backbone at a learning rate about 10x below the head's. BatchNorm layers stay in
  inference mode (moving statistics and scale/offset frozen).
- ``full`` — the same two stages with every backbone layer unfrozen (BatchNorm keeps
  learning its statistics unless ``batch_norm="inference"``).

Training uses tf.data pipelines (augmentation from :mod:`edgeadapt.training.classifier` as an
option), a validation split with early stopping on validation loss and best-weights
restore (the head-only result counts as a candidate, so fine-tuning never ends worse on
validation than its first stage), Keras progress output, and a seed. A ``tf.distribute``
strategy (MirroredStrategy, MultiWorkerMirroredStrategy) can be passed: the same code
then trains on several devices or machines.

The data are an in-memory :class:`edgeadapt.data.image_folders.Dataset` or, for folders bigger than
memory, a :class:`edgeadapt.data.streaming.StreamingImageFolder`: images are then read from disk
batch by batch in every stage (embeddings, backbone training, class statistics), and under
MultiWorkerMirroredStrategy each worker reads only its own shard of the files.

After the backbone has changed, the class statistics are recomputed with the new
backbone and the result carries a new backbone fingerprint: heads, class statistics and
device-added classes bound to the old backbone are no longer compatible with it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeadapt.device.errors import IncompatibleModelError, InputError
from edgeadapt.device.head import ClassStats, Head
from edgeadapt.device.manifest import InputSpec
from edgeadapt.training.finetune_backbone import train_backbone
from edgeadapt.training.finetune_data import MemoryData, StreamData, all_reduce_stats, export_samples, is_stream
from edgeadapt.training.finetune_keras import (
    backbone_blocks,
    backbone_of,
    classifier_model,
    copy_model,
    fit_head,
    is_multi_worker,
    validation_split,
)

if TYPE_CHECKING:  # pragma: no cover
    import keras

    from edgeadapt.data.image_folders import Dataset
    from edgeadapt.data.streaming import FileSet, StreamingImageFolder

logger = logging.getLogger(__name__)

STRATEGIES = ("head_only", "top_layers", "full")
BATCH_NORM_MODES = ("auto", "inference", "train")


@dataclass(frozen=True)
class FineTuneOptions:
    """Settings of :func:`fine_tune`.

    ``strategy`` is "head_only", "top_layers" (with ``unfreeze_blocks`` = n) or "full";
    :meth:`from_string` reads the CLI form "top_layers:2". ``backbone_learning_rate``
    defaults to ``head_learning_rate / 10``. ``head_epochs`` bound the first stage (head on
    cached embeddings), ``epochs`` the backbone stage; both stop early on validation loss
    (``head_patience`` / ``patience`` epochs without improvement) and restore the best
    weights. ``max_seconds`` caps the backbone stage's wall time. ``batch_norm`` "auto"
    keeps BatchNorm in inference mode for head_only/top_layers and lets it learn in full.
    ``validation_fraction`` of the training split is held out when the dataset has no
    validation split. ``verbose`` is Keras' progress output (0 silent, 1 bar, 2 one line
    per epoch).
    """

    strategy: str = "head_only"
    unfreeze_blocks: int = 2
    head_learning_rate: float = 1e-3
    backbone_learning_rate: float | None = None
    head_epochs: int = 40
    epochs: int = 10
    batch_size: int = 32
    validation_fraction: float = 0.15
    head_patience: int = 8
    patience: int = 3
    augment: bool = False
    head_dropout: float = 0.2
    head_weight_decay: float = 1e-4
    batch_norm: str = "auto"
    max_seconds: float | None = None
    embedding_layer: str | None = None
    embedding_cache: str | Path | None = None
    seed: int = 0
    verbose: int = 2

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise InputError(f"strategy must be one of {STRATEGIES} (or 'top_layers:N'), got {self.strategy!r}")
        if self.strategy == "top_layers" and self.unfreeze_blocks < 1:
            raise InputError(f"top_layers needs at least 1 block to unfreeze, got {self.unfreeze_blocks}")
        for name in ("head_learning_rate",):
            if not getattr(self, name) > 0:
                raise InputError(f"{name} must be positive, got {getattr(self, name)}")
        if self.backbone_learning_rate is not None and not self.backbone_learning_rate > 0:
            raise InputError(f"backbone_learning_rate must be positive, got {self.backbone_learning_rate}")
        for name in ("head_epochs", "epochs", "head_patience", "patience", "seed"):
            if getattr(self, name) < 0:
                raise InputError(f"{name} must be non-negative, got {getattr(self, name)}")
        if self.batch_size < 1:
            raise InputError(f"batch_size must be at least 1, got {self.batch_size}")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise InputError(f"validation_fraction must be in [0, 1), got {self.validation_fraction}")
        if not 0.0 <= self.head_dropout < 1.0:
            raise InputError(f"head_dropout must be in [0, 1), got {self.head_dropout}")
        if self.batch_norm not in BATCH_NORM_MODES:
            raise InputError(f"batch_norm must be one of {BATCH_NORM_MODES}, got {self.batch_norm!r}")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise InputError(f"max_seconds must be positive, got {self.max_seconds}")

    # -- constructors -----------------------------------------------------------------
    @classmethod
    def from_string(cls, text: str, **overrides: Any) -> "FineTuneOptions":
        """Options from "head_only", "full", "top_layers" or "top_layers:N" plus keyword overrides."""
        name, _, count = text.strip().partition(":")
        if name == "top_layers" and count:
            try:
                overrides["unfreeze_blocks"] = int(count)
            except ValueError:
                raise InputError(f"'top_layers:N' needs a whole number N, got {text!r}") from None
        elif count:
            raise InputError(f"only top_layers takes a block count (top_layers:N), got {text!r}")
        return cls(strategy=name, **overrides)

    @classmethod
    def head_only(cls, **overrides: Any) -> "FineTuneOptions":
        return cls(strategy="head_only", **overrides)

    @classmethod
    def top_layers(cls, blocks: int, **overrides: Any) -> "FineTuneOptions":
        return cls(strategy="top_layers", unfreeze_blocks=blocks, **overrides)

    @classmethod
    def full(cls, **overrides: Any) -> "FineTuneOptions":
        return cls(strategy="full", **overrides)

    # -- derived values ---------------------------------------------------------------
    @property
    def label(self) -> str:
        """The strategy as the CLI spells it: head_only, top_layers:N or full."""
        return f"top_layers:{self.unfreeze_blocks}" if self.strategy == "top_layers" else self.strategy

    @property
    def effective_backbone_learning_rate(self) -> float:
        return self.backbone_learning_rate if self.backbone_learning_rate is not None else self.head_learning_rate / 10

    @property
    def batch_norm_inference(self) -> bool:
        if self.batch_norm == "auto":
            return self.strategy != "full"
        return self.batch_norm == "inference"


@dataclass
class FineTuneResult:
    """What :func:`fine_tune` produced.

    ``model`` is a plain Keras classifier (image -> softmax scores); ``backbone`` (image ->
    embedding) and ``head`` are its two halves, ready for :meth:`export_bundle`.
    ``class_stats`` were computed with the final backbone on the training images.
    ``worker_shard`` is (number of workers, this worker's index) when a streamed folder was
    read in shards under MultiWorkerMirroredStrategy, (1, 0) otherwise.
    """

    model: "keras.Model"
    backbone: "keras.Model"
    head: Head
    class_names: list[str]
    input_spec: InputSpec
    class_stats: ClassStats
    backbone_fingerprint: str
    previous_backbone_fingerprint: str
    options: FineTuneOptions
    trainable_layers: list[str] = field(default_factory=list)
    history: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    worker_shard: tuple[int, int] = (1, 0)

    @property
    def backbone_changed(self) -> bool:
        """True when the backbone's weights changed: old heads no longer fit it."""
        return self.backbone_fingerprint != self.previous_backbone_fingerprint

    @property
    def total_seconds(self) -> float:
        return float(sum(self.seconds.values()))

    def embeddings(self, images: np.ndarray) -> np.ndarray:
        from edgeadapt.data.embeddings import compute_embeddings

        return compute_embeddings(self.backbone, images, self.input_spec, progress=False)

    def evaluate(self, images: np.ndarray, labels: np.ndarray) -> float:
        """Top-1 accuracy of backbone + head on uint8 images prepared for ``input_spec``."""
        if len(labels) == 0:
            return float("nan")
        predictions = self.head.logits(self.embeddings(images)).argmax(axis=1)
        return float(np.mean(predictions == np.asarray(labels)))

    def evaluate_stream(self, stream: "StreamingImageFolder", split: "str | FileSet" = "test",
                        batch_size: int = 128) -> float:
        """Top-1 accuracy on the files of ``split`` of a streamed folder, read batch by batch."""
        from edgeadapt.data.streaming import stream_embeddings

        if stream.spec.shape != self.input_spec.shape:
            raise IncompatibleModelError(f"the folder is streamed at {stream.spec.shape} but the model takes "
                                         f"{self.input_spec.shape} images: stream it with the model's input spec")
        files = stream.files(split)
        if not len(files):
            return float("nan")
        predictions = self.head.logits(stream_embeddings(self.backbone, stream, files, batch_size)).argmax(axis=1)
        return float(np.mean(predictions == files.labels))

    def save_model(self, path: str | Path) -> Path:
        """Save the classifier as a ``.keras`` file (no optimizer state)."""
        path = Path(path)
        if path.suffix != ".keras":
            raise InputError(f"a Keras model file must end in .keras, got {path.name}")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.model.save(path)
        return path

    def export_bundle(self, output: str | Path, dataset: "Dataset | StreamingImageFolder", options=None,
                      max_evaluation_images: int = 2000):
        """Write a bundle (int8 TFLite/ONNX backbone, this head, class statistics, new fingerprint).

        ``dataset`` gives calibration images (train split) and parity images (test split).
        From a streamed folder only those images are loaded: the calibration images the
        in-memory path would pick, and the test split, or a stratified sample of
        ``max_evaluation_images`` of it when it is larger.
        Returns :class:`edgeadapt.converters.bundle_export.BundleExport`.
        """
        from edgeadapt.converters.bundle_export import BundleExportOptions, export_bundle

        options = options or BundleExportOptions()
        if is_stream(dataset):
            train, test = export_samples(dataset, options.calibration_samples, max_evaluation_images)
        else:
            train, test = dataset.train, dataset.test
        has_test = len(test) > 0
        return export_bundle(
            output,
            backbone=self.backbone,
            head=self.head,
            input_spec=self.input_spec,
            class_names=self.class_names,
            calibration_images=train.images,
            calibration_labels=train.labels,
            evaluation_images=test.images if has_test else None,
            evaluation_labels=test.labels if has_test else None,
            class_stats=self.class_stats,
            backbone_fingerprint=self.backbone_fingerprint,
            options=options,
        )


# ----------------------------------------------------------------------------- the trainer
def fine_tune(
    model: Any,
    dataset: "Dataset | StreamingImageFolder",
    options: FineTuneOptions = FineTuneOptions(),
    distribution_strategy: Any = None,
) -> FineTuneResult:
    """Adapt a pretrained ``model`` (Keras classifier, backbone, or ``.keras`` file) to ``dataset``.

    ``dataset`` is an :class:`edgeadapt.data.image_folders.Dataset` prepared at the model's input size
    (see :func:`edgeadapt.training.input_adaptation.adapt_input` to change it), or a
    :class:`edgeadapt.data.streaming.StreamingImageFolder` (:func:`edgeadapt.data.streaming.stream_image_folder`)
    whose images are read from disk batch by batch and never held in memory all at once.
    The head is new (one row per class of ``dataset``). ``distribution_strategy`` is an
    optional ``tf.distribute.Strategy``; with MultiWorkerMirroredStrategy every worker runs
    this same call (and, on a streamed folder, reads only its own shard of the files).
    ``model`` is never modified.

    Args:
        model: A Keras classifier or backbone, or a ``.keras`` file.
        dataset: In-memory dataset or streamed folder at the model's input size.
        options: Strategy (head_only, top_layers:N, full), epochs, learning rates, seed.
        distribution_strategy: Optional ``tf.distribute.Strategy``.

    Returns:
        The fine-tuned backbone and head with timings and fingerprints; it exports bundles.

    Raises:
        InputError: When the options do not fit the model or the data.
        IncompatibleModelError: When the model cannot be split into backbone and head.
    """
    import keras

    from edgeadapt.converters.fingerprint import backbone_fingerprint

    if isinstance(options, str):
        options = FineTuneOptions.from_string(options)
    if options.max_seconds is not None and is_multi_worker(distribution_strategy):
        raise InputError("max_seconds cannot be used with a multi-worker strategy: workers would stop after "
                         "different numbers of steps and wait for each other forever; bound epochs instead")
    keras.utils.set_random_seed(options.seed)
    source, backbone = _private_backbone(model, dataset.spec, options)
    data = _training_data(dataset, backbone, options, distribution_strategy)
    num_classes = len(dataset.class_names)
    previous_fingerprint = backbone_fingerprint(backbone)
    seconds: dict[str, float] = {}
    history: dict[str, dict] = {}
    logger.info("fine-tuning %s with strategy %s: %d classes, %d train / %d validation images%s", source.name,
                options.label, num_classes, data.count("train"), data.count("validation"), data.description)
    head, train_embeddings = _head_stage(backbone, data, num_classes, previous_fingerprint, options,
                                         distribution_strategy, seconds, history)
    trainable_layers: list[str] = []
    if options.strategy != "head_only" and options.epochs > 0:
        start = time.perf_counter()
        backbone, head, trainable_layers, history["backbone"] = train_backbone(
            backbone, head, data, dataset.spec, options, distribution_strategy)
        seconds["backbone"] = time.perf_counter() - start
        start = time.perf_counter()
        train_embeddings = data.embeddings(backbone, "train", None, None, options.verbose == 1)
        seconds["statistics"] = time.perf_counter() - start
    class_stats = ClassStats.from_embeddings(train_embeddings, data.labels("train"), num_classes)
    if data.sharded_totals is not None:
        class_stats = all_reduce_stats(class_stats, distribution_strategy)
    fingerprint = backbone_fingerprint(backbone)
    if fingerprint != previous_fingerprint:
        logger.warning(
            "the backbone changed (%s): new fingerprint %s (was %s). Heads, class statistics and device-added "
            "classes bound to the old backbone are no longer compatible: export a new bundle from this result "
            "(class statistics were recomputed with the new backbone)",
            options.label, fingerprint[:19], previous_fingerprint[:19])
    return FineTuneResult(
        model=classifier_model(backbone, head), backbone=backbone, head=head, class_names=list(dataset.class_names),
        input_spec=dataset.spec, class_stats=class_stats, backbone_fingerprint=fingerprint,
        previous_backbone_fingerprint=previous_fingerprint, options=options, trainable_layers=trainable_layers,
        history=history, seconds=seconds, worker_shard=data.shard)


def _private_backbone(model: Any, spec: InputSpec, options: FineTuneOptions) -> tuple["keras.Model", "keras.Model"]:
    """(the loaded source model, a private copy of its backbone), checked against the data's input shape."""
    from edgeadapt.training.model_split import load_keras_model

    source = load_keras_model(model)
    backbone, _ = backbone_of(source, options.embedding_layer)
    backbone = copy_model(backbone)  # a private copy: the caller's model is never touched
    model_shape = tuple(int(value) for value in backbone.inputs[0].shape[1:])
    if model_shape != spec.shape:
        raise IncompatibleModelError(
            f"the dataset is prepared at {spec.shape} but {source.name} takes {model_shape} images: load the data "
            f"at the model's size, or adapt the model first (adapt_input / edgeadapt adapt-input)"
        )
    return source, backbone


def _training_data(dataset: "Dataset | StreamingImageFolder", backbone: "keras.Model", options: FineTuneOptions,
                   distribution_strategy: Any) -> MemoryData | StreamData:
    """The train/validation split of ``dataset`` as a data source, after checking it fits ``options``."""
    num_classes = len(dataset.class_names)
    if num_classes < 2:
        raise InputError(f"fine-tuning needs at least 2 classes, got {dataset.class_names}")
    train_set, validation_set = validation_split(dataset, options.validation_fraction, options.seed)
    missing = sorted(set(range(num_classes)) - set(np.unique(train_set.labels).tolist()))
    if missing:
        raise InputError(f"classes {[dataset.class_names[i] for i in missing]} have no training images")
    if options.strategy == "top_layers":
        available = len(backbone_blocks(backbone))
        if options.unfreeze_blocks > available:
            raise InputError(f"top_layers:{options.unfreeze_blocks} asks for more blocks than the backbone has "
                             f"({available}); use top_layers:1..{available} or full")
    if options.augment and options.strategy == "head_only":
        logger.warning("augment=True has no effect with head_only: the head trains on cached embeddings of the "
                       "original images (use top_layers:N or full to train on augmented images)")
    if is_stream(dataset):
        return StreamData(dataset, train_set, validation_set, options, distribution_strategy)
    return MemoryData(train_set, validation_set, dataset.spec)


def _head_stage(backbone: "keras.Model", data: MemoryData | StreamData, num_classes: int, fingerprint: str,
                options: FineTuneOptions, distribution_strategy: Any, seconds: dict[str, float],
                history: dict[str, dict]) -> tuple[Head, np.ndarray]:
    """Stage 1: the head on embeddings of the frozen backbone (computed once, cached if asked).

    Returns the head and the training embeddings; records the stage's timings in ``seconds``
    and its Keras history in ``history``.
    """
    start = time.perf_counter()
    progress = options.verbose == 1
    cache = options.embedding_cache
    train_embeddings = data.embeddings(backbone, "train", fingerprint, cache, progress)
    validation_embeddings = data.embeddings(backbone, "validation", fingerprint, cache, progress)
    seconds["embeddings"] = time.perf_counter() - start
    start = time.perf_counter()
    head, history["head"] = fit_head(train_embeddings, data.labels("train"), validation_embeddings,
                                     data.labels("validation"), num_classes, options, distribution_strategy,
                                     sharded_totals=data.sharded_totals)
    seconds["head"] = time.perf_counter() - start
    return head, train_embeddings
