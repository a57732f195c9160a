"""Embeddings of image files by a bundle's backbone, computed once and kept on disk.

Each image is embedded by the device :class:`~edgeadapt.device.runtime.Runtime` (exactly what a
device computes) and stored under a key made of the file's absolute path, size and
modification time, in a store per backbone identity (fingerprint, model file checksum,
interpreter, input spec). A changed file, another backbone or another interpreter never
reads a stale embedding.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edgeadapt.device.errors import InputError
from edgeadapt.device.safefs import durable_write

logger = logging.getLogger(__name__)

#: Where embeddings are kept unless the caller says otherwise.
DEFAULT_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgeadapt" / "embeddings"
BATCH_SIZE = 32


def file_key(path: str | Path) -> str:
    """The cache key of one image file: its absolute path, size and modification time."""
    resolved = Path(path).resolve()
    status = resolved.stat()
    return hashlib.sha256(f"{resolved}|{status.st_size}|{status.st_mtime_ns}".encode()).hexdigest()[:32]


def backbone_identity(runtime: Any) -> dict:
    """What a bundle's embeddings depend on: backbone fingerprint, model file and checksum, interpreter, input."""
    model_file = runtime.describe()["model_file"]
    return {
        "fingerprint": runtime.manifest.backbone_fingerprint,
        "model_file": model_file,
        "model_sha256": runtime.manifest.files.get(model_file, {}).get("sha256"),
        "backend": runtime.backend_name,
        "input": runtime.input_spec.to_dict(),
    }


def show_progress(verbose: int) -> bool:
    """Progress bars go to stderr only when it is a terminal or the user asked for -v."""
    return verbose > 0 or sys.stderr.isatty()


class EmbeddingCache:
    """Embed image files with ``runtime``, reading and writing the on-disk store in ``folder``.

    Args:
        runtime: an open device Runtime whose backbone embeds the images.
        folder: the cache folder (None: :data:`DEFAULT_CACHE_DIR`).
        progress: show a tqdm bar on stderr while embedding.
    """

    def __init__(self, runtime: Any, folder: str | Path | None = None, progress: bool = False):
        self.runtime = runtime
        self.identity = backbone_identity(runtime)
        digest = hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode()).hexdigest()[:24]
        self.store = Path(folder if folder is not None else DEFAULT_CACHE_DIR) / f"{digest}.npz"
        self.progress = progress
        self._entries: dict[str, np.ndarray] | None = None
        self.hits = 0
        self.computed = 0

    def _load(self) -> dict[str, np.ndarray]:
        if self._entries is None:
            self._entries = {}
            if self.store.is_file():
                try:
                    with np.load(self.store, allow_pickle=False) as stored:
                        keys, values = stored["keys"], stored["embeddings"]
                    self._entries = {str(key): value for key, value in zip(keys, values)}
                except (OSError, ValueError, KeyError) as error:
                    logger.warning("ignoring unreadable embedding cache %s (%s); recomputing", self.store, error)
        return self._entries

    def _save(self) -> None:
        entries = self._load()
        if not entries:
            return
        try:
            keys = np.array(sorted(entries))
            durable_write(self.store, lambda stream: np.savez(
                stream, keys=keys, embeddings=np.stack([entries[key] for key in keys])))
        except OSError as error:
            logger.warning("cannot write the embedding cache %s (%s); embeddings are recomputed next time",
                           self.store, error)

    def embed(self, paths: Sequence[str | Path], description: str = "embedding") -> np.ndarray:
        """Embeddings (N, D) float32 of the image files ``paths``, in order (cached ones are read).

        Raises:
            InputError: when a file cannot be read or decoded (says which).
        """
        entries = self._load()
        keys = [file_key(path) for path in paths]
        missing = [index for index, key in enumerate(keys) if key not in entries]
        self.hits += len(keys) - len(missing)
        if missing:
            batches = [missing[start:start + BATCH_SIZE] for start in range(0, len(missing), BATCH_SIZE)]
            bar = None
            if self.progress:
                from tqdm import tqdm

                bar = tqdm(total=len(missing), desc=description, unit="img", file=sys.stderr)
            try:
                for batch in batches:
                    try:
                        values = self.runtime.embed([str(paths[index]) for index in batch])
                    except InputError:
                        for index in batch:  # name the file that fails
                            try:
                                self.runtime.embed(str(paths[index]))
                            except InputError as error:
                                raise InputError(f"cannot embed {paths[index]}: {error}; fix or remove that file") \
                                    from error
                        raise
                    for index, value in zip(batch, values):
                        entries[keys[index]] = np.asarray(value, dtype=np.float32)
                    self.computed += len(batch)
                    if bar is not None:
                        bar.update(len(batch))
            finally:
                if bar is not None:
                    bar.close()
            self._save()  # only after every image was embedded: on an error the store is unchanged
        if not keys:
            return np.zeros((0, self.runtime.manifest.embedding_size), np.float32)
        return np.stack([entries[key] for key in keys]).astype(np.float32)
