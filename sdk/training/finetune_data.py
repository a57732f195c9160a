"""Where fine-tuning reads its images: in memory or streamed from files, sharded per worker.

Owns the two data sources of :func:`edgeadapt.training.finetune.fine_tune` (:class:`MemoryData`,
:class:`StreamData`: labels, embeddings of a split, the backbone stage's input pipelines),
the on-disk cache of streamed embeddings, summing class statistics over workers, and
:func:`export_samples` (the few images a bundle export loads from a streamed folder).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeadapt.device.errors import InputError
from edgeadapt.device.head import ClassStats
from edgeadapt.device.manifest import InputSpec
from edgeadapt.device.safefs import durable_write
from edgeadapt.training.finetune_keras import distribute_options, is_multi_worker, multiple_of

if TYPE_CHECKING:  # pragma: no cover
    from edgeadapt.training.finetune import FineTuneOptions
    from edgeadapt.data.streaming import FileSet, StreamingImageFolder

logger = logging.getLogger("edgeadapt.training.finetune")


def is_stream(dataset: Any) -> bool:
    """Whether ``dataset`` is a streamed folder (:class:`edgeadapt.data.streaming.StreamingImageFolder`).

    Args:
        dataset: an in-memory dataset or a streamed folder.

    Returns:
        True for a streamed folder.
    """
    from edgeadapt.data.streaming import StreamingImageFolder

    return isinstance(dataset, StreamingImageFolder)


def export_samples(stream: "StreamingImageFolder", calibration_count: int, max_evaluation_images: int):
    """Load from a streamed folder only the images a bundle export uses.

    The calibration images are the ones the in-memory path would pick, so both calibrate alike.

    Args:
        stream: The streamed folder.
        calibration_count: Calibration images to pick (stratified by class).
        max_evaluation_images: Most test images for the parity check (a stratified sample).

    Returns:
        ``(calibration ImageSet, evaluation ImageSet)``.

    Raises:
        InputError: When there are no training images or ``max_evaluation_images`` < 1.
    """
    from edgeadapt.converters.calibration import select_calibration_images

    if max_evaluation_images < 1:
        raise InputError(f"max_evaluation_images must be at least 1, got {max_evaluation_images}")
    if not len(stream.train):
        raise InputError("the streamed folder has no training images to calibrate the int8 model with")
    # select_calibration_images only indexes its first argument: on positions it returns the positions it
    # would pick from the in-memory images, so both paths calibrate on the same images.
    chosen = select_calibration_images(np.arange(len(stream.train)), stream.train.labels, count=calibration_count,
                                       seed=0)
    calibration = stream.load("train", np.sort(chosen))
    test_indices = np.arange(len(stream.test))
    if len(stream.test) > max_evaluation_images:
        logger.info("parity on a stratified sample of %d of %d test images", max_evaluation_images, len(stream.test))
        test_indices = np.sort(select_calibration_images(test_indices, stream.test.labels, count=max_evaluation_images,
                                                         seed=0))
    return calibration, stream.load("test", test_indices)



class MemoryData:
    """Training data held in memory: two :class:`edgeadapt.data.image_folders.ImageSet` s."""

    description = ""
    sharded_totals = None
    shard = (1, 0)

    def __init__(self, train_set, validation_set, spec: InputSpec):
        self.sets = {"train": train_set, "validation": validation_set}
        self.spec = spec

    def count(self, split: str) -> int:
        """Images in ``split``."""
        return len(self.sets[split])

    def labels(self, split: str) -> np.ndarray:
        return self.sets[split].labels

    def embeddings(self, backbone, split: str, fingerprint: str | None, cache, progress: bool) -> np.ndarray:
        """Embeddings of a split's images; cached on disk when ``cache`` (a folder) and ``fingerprint`` are given."""
        from edgeadapt.data.embeddings import EmbeddingCache, compute_embeddings

        images = self.sets[split].images
        if cache is not None and fingerprint is not None:
            return EmbeddingCache(cache).embeddings(backbone, fingerprint, images, self.spec, progress=progress)
        return compute_embeddings(backbone, images, self.spec, progress=progress)

    def backbone_inputs(self, options: FineTuneOptions, augment, distribution_strategy):
        """(train, validation) tf.data pipelines of the backbone stage; sharded per element by TensorFlow."""
        from edgeadapt.training.classifier import make_tf_dataset

        train_set, validation_set = self.sets["train"], self.sets["validation"]
        train = make_tf_dataset(train_set.images, train_set.labels, self.spec, options.batch_size, True,
                                options.seed, augment)
        train = distribute_options(train, distribution_strategy)
        validation = None
        if len(validation_set):
            validation = make_tf_dataset(validation_set.images, validation_set.labels, self.spec,
                                         max(options.batch_size, 64), False, options.seed)
            validation = distribute_options(validation, distribution_strategy)
        return train, validation

    def reading(self):
        import contextlib

        return contextlib.nullcontext()


class StreamData:
    """Training data streamed from files; under MultiWorkerMirroredStrategy each worker has its own shard."""

    def __init__(self, stream: "StreamingImageFolder", train_files: "FileSet", validation_files: "FileSet",
                 options: FineTuneOptions, distribution_strategy):
        from edgeadapt.data.streaming import worker_shard

        self.stream = stream
        self.files = {"train": train_files, "validation": validation_files}
        self.shard = worker_shard(distribution_strategy) if is_multi_worker(distribution_strategy) else (1, 0)
        num_workers, index = self.shard
        self.sharded_totals = (len(train_files), len(validation_files)) if num_workers > 1 else None
        self.local = {name: files.shard(num_workers, index) for name, files in self.files.items()}
        self.description = f" (streamed from {stream.root}, {stream.options.decoder} decoder)"
        if num_workers > 1:
            replicas = distribution_strategy.num_replicas_in_sync
            if options.batch_size % replicas:
                raise InputError(f"batch_size {options.batch_size} must be a multiple of the {replicas} replicas to "
                                 "stream shards to every worker in full batches; use e.g. "
                                 f"{multiple_of(options.batch_size, replicas)}")
            if len(train_files) < num_workers:
                raise InputError(f"{len(train_files)} training images cannot be shared by {num_workers} workers: "
                                 "every worker needs at least one")
            self.description += f", this worker reads shard {index} of {num_workers}: {len(self.local['train'])} " \
                                f"train / {len(self.local['validation'])} validation files"

    def count(self, split: str) -> int:
        """Files in ``split`` (every worker's)."""
        return len(self.files[split])

    def labels(self, split: str) -> np.ndarray:
        """Labels of this worker's files of ``split`` (all files on one machine)."""
        return self.local[split].labels

    def embeddings(self, backbone, split: str, fingerprint: str | None, cache, progress: bool) -> np.ndarray:
        """Embeddings of this worker's files of ``split``, streamed in file order (cached when asked)."""
        from edgeadapt.data.streaming import stream_embeddings

        files = self.local[split]
        compute = lambda: stream_embeddings(backbone, self.stream, files, progress=progress)  # noqa: E731
        if cache is None or fingerprint is None or not files.digests:
            return compute()
        return _cached_embeddings(Path(cache), _stream_cache_key(fingerprint, files, self.stream), compute)

    def backbone_inputs(self, options: FineTuneOptions, augment, distribution_strategy):
        """(train, validation) of the backbone stage: tf.data pipelines, or per-worker inputs reading own shards."""
        stream, train_files, validation_files = self.stream, self.files["train"], self.files["validation"]
        validation_batch = max(options.batch_size, 64)
        if self.sharded_totals is None:
            train = stream.dataset(train_files, options.batch_size, shuffle=True, seed=options.seed, augment=augment)
            validation = stream.dataset(validation_files, validation_batch) if len(validation_files) else None
            return train, validation
        train = stream.per_worker_input(train_files, options.batch_size, training=True, seed=options.seed,
                                        augment=augment)
        validation = None
        if len(validation_files):
            replicas = distribution_strategy.num_replicas_in_sync
            validation = stream.per_worker_input(validation_files, multiple_of(validation_batch, replicas),
                                                 training=False)
        return train, validation

    def reading(self):
        return self.stream.reading(self.local["train"], self.local["validation"])


def _stream_cache_key(fingerprint: str, files: "FileSet", stream: "StreamingImageFolder") -> str:
    """Cache key of streamed embeddings: backbone, input spec, decoder and the files' content digests, in order."""
    import hashlib

    digest = hashlib.sha256(fingerprint.encode())
    digest.update(repr((sorted(stream.spec.to_dict().items()), stream.options.decoder, len(files))).encode())
    for file_digest in files.digests:
        digest.update(file_digest.encode())
    return "stream-" + digest.hexdigest()[:32]


def _cached_embeddings(directory: Path, key: str, compute) -> np.ndarray:
    """``directory/key.npy`` if present, else ``compute()`` written there (temp file + rename)."""
    path = directory / f"{key}.npy"
    if path.is_file():
        logger.info("embedding cache hit: %s", path.name)
        return np.load(path, allow_pickle=False)
    result = compute()
    durable_write(path, lambda handle: np.save(handle, result, allow_pickle=False))
    return result


def all_reduce_stats(stats: ClassStats, distribution_strategy) -> ClassStats:
    """Sum every worker's class statistics (each computed on its own shard): the statistics of all files."""
    import tensorflow as tf

    from edgeadapt.data.streaming import worker_shard

    num_workers, _ = worker_shard(distribution_strategy)
    local_replicas = max(1, distribution_strategy.num_replicas_in_sync // num_workers)
    parts = [stats.sums, stats.counts.astype(np.float64)] + ([stats.gram] if stats.gram is not None else [])
    totals = []
    for part in parts:
        local, zeros = tf.constant(part, tf.float64), tf.zeros(part.shape, tf.float64)
        # one contribution per worker: its first local replica carries the worker's sums
        values = distribution_strategy.experimental_distribute_values_from_function(
            lambda context, local=local, zeros=zeros: local if context.replica_id_in_sync_group % local_replicas == 0
            else zeros)
        totals.append(np.asarray(distribution_strategy.reduce(tf.distribute.ReduceOp.SUM, values, axis=None)))
    return ClassStats(sums=totals[0], counts=np.rint(totals[1]).astype(np.int64),
                      gram=totals[2] if len(totals) > 2 else None)
