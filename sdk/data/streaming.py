"""Stream an image folder with tf.data: files are decoded batch by batch, never all at once.

:func:`stream_image_folder` lists a dataset folder (``root/<class name>/<image file>``) with
the same scan, de-duplication and deterministic stratified split as
:func:`edgeadapt.data.image_folders.load_image_folder`, but keeps only file paths and labels in memory.
:meth:`StreamingImageFolder.dataset` builds the tf.data pipeline: shuffle the paths
(seeded), read + decode + convert channels + resize in a parallel map, batch, cast to
float pixels 0..255, optional augmentation, normalisation, prefetch.

Pixels: the default ``decoder="tensorflow"`` decodes JPEGs with the accurate integer DCT
(the same as Pillow), converts channels with the same luma weights and rounding as
:mod:`edgeadapt.device.preprocessing`, and resizes with TensorFlow's antialiased filters,
which match Pillow's to within 1 grey level (bilinear). ``decoder="pillow"`` runs
:func:`edgeadapt.device.preprocessing.prepare_image` itself in the pipeline: identical
pixels to the in-memory loader and the device, slower (it holds Python's GIL part of the time).

Scale-out: :meth:`FileSet.shard` gives each worker its own disjoint share of the files and
:class:`PerWorkerInput` is an input function for
``strategy.distribute_datasets_from_function`` in which every worker reads only its shard.

A file that cannot be decoded stops the pipeline; :meth:`StreamingImageFolder.reading`
turns TensorFlow's error into a :class:`~edgeadapt.device.errors.DatasetError` naming the
file(s) (found with :meth:`StreamingImageFolder.find_unreadable`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeadapt.data.image_folders import ImageSet, SplitOptions, scan_image_folder, split_entries
from edgeadapt.device.errors import DatasetError, InputError
from edgeadapt.device.manifest import InputSpec
from edgeadapt.device.preprocessing import prepare_image

if TYPE_CHECKING:  # pragma: no cover
    import keras
    import tensorflow as tf

logger = logging.getLogger(__name__)

DECODERS = ("tensorflow", "pillow")
SPLITS = ("train", "validation", "test")
_TF_RESIZE_METHODS = {"bilinear": "bilinear", "bicubic": "bicubic", "lanczos": "lanczos3", "nearest": "nearest"}
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as edgeadapt.device.preprocessing
_MAX_NAMED_FILES = 5


@dataclass(frozen=True)
class StreamOptions:
    """How images are read.

    ``decoder`` is "tensorflow" (native ops, parallel, pixels within 1 grey level of Pillow's)
    or "pillow" (``prepare_image`` in the pipeline: identical pixels, slower).
    ``parallel_calls`` (decode map) and ``prefetch`` default to tf.data.AUTOTUNE.
    ``shuffle_buffer`` defaults to the whole file list of the split or shard: only
    paths are shuffled, so a full shuffle costs memory for the paths, not the images.
    """

    decoder: str = "tensorflow"
    parallel_calls: int | None = None
    prefetch: int | None = None
    shuffle_buffer: int | None = None

    def __post_init__(self) -> None:
        if self.decoder not in DECODERS:
            raise InputError(f"decoder must be one of {DECODERS}, got {self.decoder!r}")
        for name in ("parallel_calls", "prefetch", "shuffle_buffer"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InputError(f"{name} must be at least 1 (or None for automatic), got {value}")


@dataclass(frozen=True, eq=False)
class FileSet:
    """One split as files: paths with (N,) int64 labels and the files' sha256 digests."""

    paths: tuple[str, ...]
    labels: np.ndarray = field(repr=False)
    digests: tuple[str, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "paths", tuple(str(path) for path in self.paths))
        object.__setattr__(self, "labels", np.asarray(self.labels, dtype=np.int64).reshape(-1))
        object.__setattr__(self, "digests", tuple(self.digests))
        if len(self.paths) != len(self.labels):
            raise InputError(f"{len(self.paths)} paths but {len(self.labels)} labels")
        if self.digests and len(self.digests) != len(self.paths):
            raise InputError(f"{len(self.digests)} digests for {len(self.paths)} paths")

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, indices: Sequence[int] | np.ndarray) -> "FileSet":
        """The files at ``indices`` (in that order)."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        digests = tuple(self.digests[i] for i in indices) if self.digests else ()
        return FileSet(tuple(self.paths[i] for i in indices), self.labels[indices], digests)

    def shard(self, num_shards: int, index: int) -> "FileSet":
        """Shard ``index`` of ``num_shards``: every num_shards-th file starting at ``index``.

        Shards are disjoint, cover the set, differ in size by at most one file and, because
        files are ordered by class, each holds about the same share of every class.
        """
        if num_shards < 1 or not 0 <= index < num_shards:
            raise InputError(f"shard index must be in 0..num_shards-1 with num_shards >= 1, "
                             f"got {index} of {num_shards}")
        return self.subset(np.arange(index, len(self), num_shards))


@dataclass
class StreamingImageFolder:
    """A dataset folder split three ways, read from disk on demand.

    The counterpart of :class:`edgeadapt.data.image_folders.Dataset` for folders bigger than memory:
    ``train``, ``validation`` and ``test`` are :class:`FileSet` s (the same files as the
    in-memory loader's splits), ``spec`` the input spec images are prepared for.
    """

    root: Path
    class_names: list[str]
    train: FileSet
    validation: FileSet
    test: FileSet
    spec: InputSpec
    options: StreamOptions = field(default_factory=StreamOptions)

    def files(self, split: str | FileSet) -> FileSet:
        """The :class:`FileSet` of a split name ("train", "validation", "test"), or ``split`` itself."""
        if isinstance(split, FileSet):
            return split
        if split not in SPLITS:
            raise InputError(f"split must be one of {SPLITS} or a FileSet, got {split!r}")
        return getattr(self, split)

    # -- tf.data --------------------------------------------------------------------
    def decode(self, path: "tf.Tensor") -> "tf.Tensor":
        """Read and prepare one image (a scalar string tensor) into a (H, W, C) uint8 tensor for ``spec``."""
        if self.options.decoder == "pillow":
            return _decode_with_pillow(path, self.spec)
        return decode_image_tf(path, self.spec)

    def dataset(
        self,
        split: str | FileSet,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        augment: Any = None,
        normalize: bool = True,
        labels: bool = True,
        repeat: bool = False,
        drop_remainder: bool = False,
    ) -> "tf.data.Dataset":
        """A tf.data pipeline over the files of ``split``: batches of (images, labels), or images only.

        Images are float32: normalised with ``spec`` (``pixel * scale + offset``), or pixel
        values 0..255 with ``normalize=False``. ``augment`` (a Keras layer, e.g.
        :func:`edgeadapt.training.classifier.augmentation_layers`) runs on 0..255 pixel batches before
        normalisation, exactly as in :func:`edgeadapt.training.classifier.make_tf_dataset`, one batch at a
        time so that a seeded run is reproducible. The paths are shuffled (``shuffle``,
        seeded, reshuffled every epoch) before decoding.
        Auto-sharding is off: the caller shards by files (:meth:`FileSet.shard`).
        """
        import tensorflow as tf

        if batch_size < 1:
            raise InputError(f"batch_size must be at least 1, got {batch_size}")
        files = self.files(split)
        autotune = tf.data.AUTOTUNE
        paths = np.array(files.paths, dtype=object) if len(files) else np.zeros(0, dtype=object)
        dataset = tf.data.Dataset.from_tensor_slices((tf.constant(paths, dtype=tf.string),
                                                      tf.constant(files.labels, dtype=tf.int64)))
        if shuffle and len(files) > 1:
            dataset = dataset.shuffle(self.options.shuffle_buffer or len(files), seed=seed,
                                      reshuffle_each_iteration=True)
        if repeat:
            dataset = dataset.repeat()
        dataset = dataset.map(lambda path, label: (self.decode(path), label),
                              num_parallel_calls=self.options.parallel_calls or autotune)
        dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
        dataset = dataset.map(lambda x, y: (tf.cast(x, tf.float32), y), num_parallel_calls=autotune)
        if augment is not None:  # one batch at a time: the seeded random draws reach the batches in order
            dataset = dataset.map(lambda x, y: (augment(x, training=True), y))
        if normalize:
            scale, offset = np.float32(self.spec.scale), np.float32(self.spec.offset)
            dataset = dataset.map(lambda x, y: (x * scale + offset, y), num_parallel_calls=autotune)
        if not labels:
            dataset = dataset.map(lambda x, y: x)
        return _without_auto_shard(dataset.prefetch(self.options.prefetch or autotune))

    def per_worker_input(self, split: str | FileSet, global_batch_size: int, *, training: bool, seed: int = 0,
                         augment: Any = None) -> "PerWorkerInput":
        """An input function for ``strategy.distribute_datasets_from_function`` over ``split``.

        Worker i of n reads only ``files.shard(n, i)``, in batches of the per-replica size.
        Training inputs shuffle the shard (``seed``), repeat it and give every worker the
        same number of full batches per epoch (:class:`PerWorkerInput`); otherwise each
        worker reads its shard once.
        """
        files = self.files(split)

        def build(num_workers: int, index: int, batch_size: int) -> "tf.data.Dataset":
            shard = files.shard(num_workers, index)
            if training:
                return self.dataset(shard, batch_size, shuffle=True, seed=seed, augment=augment, repeat=True,
                                    drop_remainder=True)
            return self.dataset(shard, batch_size)

        return PerWorkerInput(build, len(files), global_batch_size, training)

    # -- materialising a few images -------------------------------------------------
    def load(self, split: str | FileSet, indices: Sequence[int] | np.ndarray | None = None) -> ImageSet:
        """Decode the files at ``indices`` of ``split`` (all when None) into memory with ``prepare_image``.

        For small samples (calibration, parity, tests): the pixels are exactly the in-memory loader's.
        """
        files = self.files(split)
        if indices is not None:
            files = files.subset(indices)
        images = np.empty((len(files),) + self.spec.shape, dtype=np.uint8)
        for index, path in enumerate(files.paths):
            try:
                images[index] = prepare_image(path, self.spec)
            except InputError as error:
                raise DatasetError(f"cannot decode {path!r}: {error}; fix or delete that file") from error
        return ImageSet(images, files.labels, list(files.paths))

    # -- unreadable files -----------------------------------------------------------
    def find_unreadable(self, split: str | FileSet) -> list[tuple[str, str]]:
        """(path, reason) of every file of ``split`` that the pipeline cannot read or decode.

        One parallel pass over the files (decode only, nothing kept). Run it up front on a
        cluster: a bad file stops training on the worker that reads it.
        """
        import tensorflow as tf

        files = self.files(split)
        if not len(files):
            return []
        paths = tf.constant(np.array(files.paths, dtype=object), dtype=tf.string)

        def probe(index):
            image = self.decode(tf.gather(paths, index))
            return index, tf.reduce_max(image)  # a value of the pixels: the decode cannot be optimised away

        good = tf.data.Dataset.range(len(files)).map(probe, num_parallel_calls=tf.data.AUTOTUNE)
        good = good.ignore_errors()
        readable = {int(index) for index, _ in good.as_numpy_iterator()}
        bad = [index for index in range(len(files)) if index not in readable]
        return [(files.paths[index], self._reason(files.paths[index])) for index in bad]

    def _reason(self, path: str) -> str:
        import tensorflow as tf

        try:
            self.decode(tf.constant(path))
        except Exception as error:  # TensorFlow raises several OpError types for one bad file
            message = getattr(error, "message", None) or str(error)
            first_line = message.splitlines()[0] if message else ""
            message = re.sub(r"\{\{[^}]*\}\}|\[Op:[^\]]*\].*|\bname:\s*$", " ", first_line)  # TF's node names
            return " ".join(message.split()) or type(error).__name__
        return "read failed once, then succeeded (file changed while reading?)"

    @contextlib.contextmanager
    def reading(self, *splits: str | FileSet) -> Iterator[None]:
        """Turn a decode failure inside the block into a :class:`DatasetError` naming the bad file(s).

        ``splits`` are the files the block's pipelines read. Errors that no unreadable file
        explains are re-raised unchanged.
        """
        import tensorflow as tf

        try:
            yield
        except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError, tf.errors.DataLossError,
                tf.errors.UnknownError) as error:
            bad: list[tuple[str, str]] = []
            for split in splits:
                bad.extend(self.find_unreadable(split))
            if not bad:
                raise
            raise DatasetError(_unreadable_message(bad)) from error


def _unreadable_message(bad: list[tuple[str, str]]) -> str:
    named = "; ".join(f"{path!r} ({reason})" for path, reason in bad[:_MAX_NAMED_FILES])
    more = f" and {len(bad) - _MAX_NAMED_FILES} more" if len(bad) > _MAX_NAMED_FILES else ""
    what = "that file" if len(bad) == 1 else "those files"
    return (f"cannot decode {len(bad)} image file(s): {named}{more}; fix or delete {what} (JPEG, PNG or BMP), "
            "then run again (StreamingImageFolder.find_unreadable(split) lists every bad file of a split)")


def stream_image_folder(
    root: str | Path,
    spec: InputSpec,
    split: SplitOptions = SplitOptions(),
    classes: Sequence[str] | None = None,
    options: StreamOptions = StreamOptions(),
) -> StreamingImageFolder:
    """List and split a dataset folder for streaming; no image is decoded here.

    The scan (:func:`edgeadapt.data.image_folders.scan_image_folder`: sorted classes, exact duplicates
    dropped) and the split (:func:`edgeadapt.data.image_folders.split_entries`) are the in-memory
    loader's, so ``train``/``validation``/``test`` hold exactly the files of
    ``load_image_folder(root, spec, split, classes)``. Raises :class:`DatasetError` for a
    missing or empty folder or a class with fewer than 2 images.
    """
    class_names, entries = scan_image_folder(root, classes)
    everything = FileSet(tuple(str(entry.path) for entry in entries),
                         np.array([entry.label for entry in entries], dtype=np.int64),
                         tuple(entry.digest for entry in entries))
    train, validation, test = split_entries(everything.labels, split)
    logger.info("streaming %d images of %d classes from %s: %d train, %d validation, %d test", len(everything),
                len(class_names), root, len(train), len(validation), len(test))
    return StreamingImageFolder(root=Path(root), class_names=class_names, train=everything.subset(train),
                                validation=everything.subset(validation), test=everything.subset(test), spec=spec,
                                options=options)


# ----------------------------------------------------------------------------- decoding
def decode_image_tf(path: "tf.Tensor", spec: InputSpec) -> "tf.Tensor":
    """Read one JPEG/PNG/BMP file with TensorFlow ops and prepare it like ``prepare_image``.

    Decode (JPEG with the accurate integer DCT, as Pillow) -> channels (gray <-> RGB with
    ITU-R 601-2 luma rounded half to even, alpha dropped, BGR order) -> crop (``center_crop``)
    -> resize with ``spec.resample`` (antialiased) -> round, clip -> (H, W, C) uint8.
    """
    import tensorflow as tf

    contents = tf.io.read_file(path)
    image = tf.cond(
        tf.io.is_jpeg(contents),
        lambda: tf.io.decode_jpeg(contents, channels=0, dct_method="INTEGER_ACCURATE"),
        lambda: tf.io.decode_image(contents, channels=0, dtype=tf.uint8, expand_animations=False),
    )
    gray_source = tf.shape(image)[-1] <= 2  # gray or gray + alpha
    if spec.channels == 3:
        image = tf.cond(gray_source, lambda: tf.tile(image[..., :1], [1, 1, 3]), lambda: image[..., :3])
        if spec.color_order == "BGR":
            image = image[..., ::-1]
    else:
        image = tf.cond(gray_source, lambda: image[..., :1], lambda: _luma(image[..., :3]))
    image.set_shape([None, None, spec.channels])
    if spec.resize == "center_crop":
        image = _center_crop(image, spec.height / spec.width)
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    same_size = tf.logical_and(tf.equal(height, spec.height), tf.equal(width, spec.width))
    image = tf.cond(same_size, lambda: image, lambda: _resized(image, spec))
    return tf.ensure_shape(image, spec.shape)


def _luma(rgb: "tf.Tensor") -> "tf.Tensor":
    """RGB -> (H, W, 1) gray exactly as the device: float64 luma, rounded half to even."""
    import tensorflow as tf

    pixels = tf.cast(rgb, tf.float64)
    gray = pixels[..., 0] * _LUMA[0] + pixels[..., 1] * _LUMA[1] + pixels[..., 2] * _LUMA[2]
    return tf.cast(tf.clip_by_value(tf.math.rint(gray), 0.0, 255.0), tf.uint8)[..., None]


def _center_crop(image: "tf.Tensor", ratio_height_by_width: float) -> "tf.Tensor":
    """The largest centred crop with the target's aspect ratio (the same box as Pillow's path)."""
    import tensorflow as tf

    height, width = tf.shape(image)[0], tf.shape(image)[1]
    target = tf.constant(1.0 / ratio_height_by_width, tf.float64)  # width / height
    source = tf.cast(width, tf.float64) / tf.cast(height, tf.float64)
    new_width = tf.maximum(1, tf.cast(tf.math.round(tf.cast(height, tf.float64) * target), tf.int32))
    new_height = tf.maximum(1, tf.cast(tf.math.round(tf.cast(width, tf.float64) / target), tf.int32))
    return tf.cond(
        source > target,
        lambda: image[:, (width - new_width) // 2:(width - new_width) // 2 + new_width],
        lambda: tf.cond(source < target,
                        lambda: image[(height - new_height) // 2:(height - new_height) // 2 + new_height],
                        lambda: image),
    )


def _resized(image: "tf.Tensor", spec: InputSpec) -> "tf.Tensor":
    import tensorflow as tf

    method = _TF_RESIZE_METHODS[spec.resample]
    resized = tf.image.resize(tf.cast(image, tf.float32), (spec.height, spec.width), method=method,
                              antialias=method != "nearest")
    return tf.cast(tf.clip_by_value(tf.math.round(resized), 0.0, 255.0), tf.uint8)


def _decode_with_pillow(path: "tf.Tensor", spec: InputSpec) -> "tf.Tensor":
    """``prepare_image`` inside the graph (tf.numpy_function): the device's pixels exactly."""
    import tensorflow as tf

    def prepare(raw: Any) -> np.ndarray:
        raw = raw.item() if isinstance(raw, np.ndarray) else raw  # eager calls pass a 0-d array
        return prepare_image(raw.decode("utf-8") if isinstance(raw, bytes) else str(raw), spec)

    image = tf.numpy_function(prepare, [path], tf.uint8, stateful=False)
    return tf.ensure_shape(image, spec.shape)


def _without_auto_shard(dataset: "tf.data.Dataset") -> "tf.data.Dataset":
    import tensorflow as tf

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return dataset.with_options(options)


# ----------------------------------------------------------------------------- scale-out
def worker_shard(strategy: Any = None) -> tuple[int, int]:
    """(number of workers, this worker's index) under ``strategy``; (1, 0) on one machine.

    The index is TensorFlow's input-pipeline id (the chief first, then the workers), the
    one ``strategy.distribute_datasets_from_function`` hands to input functions.
    """
    resolver = getattr(strategy, "cluster_resolver", None) if strategy is not None else None
    if resolver is None:
        return 1, 0
    cluster = resolver.cluster_spec().as_dict()
    chiefs, workers = len(cluster.get("chief", [])), len(cluster.get("worker", []))
    if chiefs + workers <= 1:
        return 1, 0
    task_type, task_id = resolver.task_type, int(resolver.task_id or 0)
    if task_type == "chief":
        return chiefs + workers, 0
    if task_type == "worker":
        return chiefs + workers, chiefs + task_id
    raise InputError(f"task type {task_type!r} does not read training data; run fine-tuning on workers only")


@dataclass
class PerWorkerInput:
    """An input function for ``strategy.distribute_datasets_from_function``: each worker reads its own data.

    ``build(num_workers, worker_index, per_replica_batch_size)`` returns this worker's batched
    tf.data pipeline — for training an endless one (shuffled, repeated, full batches only),
    otherwise one pass over the worker's share. ``total`` is the number of examples over
    all workers. Training inputs stop after :meth:`steps` steps on every worker, enough for
    the largest shard to be read once, so workers whose shards differ by a file stay in step
    (collective all-reduces need every worker at every step).
    """

    build: Callable[[int, int, int], "tf.data.Dataset"]
    total: int
    global_batch_size: int
    training: bool

    def steps(self, num_workers: int) -> int:
        """Steps per epoch of a training input: the largest shard, in full global batches."""
        largest = math.ceil(self.total / num_workers)
        per_worker = self.global_batch_size // num_workers
        return max(1, math.ceil(largest / max(per_worker, 1)))

    def __call__(self, context: Any) -> "tf.data.Dataset":
        per_replica = context.get_per_replica_batch_size(self.global_batch_size)
        local_replicas = max(1, context.num_replicas_in_sync // context.num_input_pipelines)
        dataset = self.build(context.num_input_pipelines, context.input_pipeline_id, per_replica)
        if self.training:
            per_worker = per_replica * local_replicas
            steps = max(1, math.ceil(math.ceil(self.total / context.num_input_pipelines) / per_worker))
            dataset = dataset.take(steps * local_replicas)
        return dataset


def stream_embeddings(backbone: "keras.Model", stream: StreamingImageFolder, split: str | FileSet,
                      batch_size: int = 128, progress: bool = False) -> np.ndarray:
    """Run ``backbone`` over the files of ``split``, streamed in file order; (N, D) float32.

    Only one batch of images is in memory at a time (plus tf.data's prefetch); the (N, D)
    embeddings are. A file that cannot be decoded raises :class:`DatasetError` naming it.
    """
    files = stream.files(split)
    if not len(files):
        return np.zeros((0, int(backbone.outputs[0].shape[-1])), np.float32)
    dataset = stream.dataset(files, batch_size, labels=False)
    from edgeadapt.device.console import progress_enabled

    verbose = 1 if progress and len(files) > 4 * batch_size and progress_enabled(sys.stdout) else 0
    with stream.reading(files):
        return np.asarray(backbone.predict(dataset, verbose=verbose), dtype=np.float32)
