"""The device runtime: open a bundle, classify images, compute embeddings."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from edgeadapt.device.backends import create_backend
from edgeadapt.device.bundle import Bundle
from edgeadapt.device.errors import BundleError
from edgeadapt.device.head import Head, softmax
from edgeadapt.device.manifest import InputSpec
from edgeadapt.device.preprocessing import InputQuantizer, is_single_image, prepare_batch

logger = logging.getLogger(__name__)


def _shape_fits(model: tuple, spec: tuple) -> bool:
    return all(want is None or want == got for want, got in zip(model, spec))


class Prediction(NamedTuple):
    """One ranked class: its label, softmax score and index in the head."""

    label: str
    score: float
    index: int


class Runtime:
    """Classifies images with a bundle's backbone (LiteRT / tflite-runtime / ONNX Runtime) and head.

    Use :meth:`open`. Images are paths, PIL images, or uint8 arrays (H, W[, C]); a list of
    them or a 4-D uint8 array is a batch.
    """

    def __init__(self, bundle: Bundle, backend: str = "auto", num_threads: int | None = None, batch_size: int = 32):
        #: the temporary unpacked copy of a packed bundle, removed by :meth:`close`
        self._unpacked = bundle.unpacked
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.input_spec: InputSpec = bundle.manifest.input_spec
        # The head and its class names change together (device updates): keep them as one
        # snapshot so a prediction never pairs one version's scores with another's labels.
        self._snapshot: tuple[Head, list[str]] = (bundle.load_head(), bundle.manifest.class_names)
        self.batch_size = batch_size
        self._backend, self._model_entry = create_backend(bundle, backend, num_threads=num_threads)
        self.backend_name: str = self._backend.name
        self._check_model_shapes()
        info = self._backend.input
        self._quantizer = InputQuantizer(self.input_spec, info.dtype, info.scale, info.zero_point)

    @classmethod
    def open(
        cls,
        path: str | Path,
        backend: str = "auto",
        num_threads: int | None = None,
        verify: bool = True,
        batch_size: int = 32,
        trusted_keys: Any = None,
    ) -> "Runtime":
        """Verify and open a bundle directory or packed bundle.

        ``backend`` is "auto" (LiteRT, else tflite-runtime, else ONNX Runtime), or one name.
        ``trusted_keys``: public key files (or ``TrustedKeys``) the bundle must be signed by;
        default: ``$EDGEADAPT_TRUST_DIR`` if set, else no signature check (docs/SIGNING.md).
        """
        bundle = Bundle.open(path, verify=verify, trusted_keys=trusted_keys)
        try:
            return cls(bundle, backend=backend, num_threads=num_threads, batch_size=batch_size)
        except BaseException:
            bundle.close()
            raise

    @property
    def head(self) -> Head:
        """The current head (replaced atomically with the class names by :meth:`set_head`)."""
        return self._snapshot[0]

    @property
    def class_names(self) -> list[str]:
        return self._snapshot[1]

    def set_head(self, head: Head, class_names: list[str]) -> None:
        """Swap in a new head and its class names as one step (used by the head updater)."""
        if head.num_classes != len(class_names):
            raise BundleError(f"head has {head.num_classes} classes but {len(class_names)} names were given")
        self._snapshot = (head, list(class_names))

    def _check_model_shapes(self) -> None:
        shape = tuple(getattr(self._backend, "input_shape", ()) or ())
        spec = self.input_spec.shape
        if len(shape) == 3 and not _shape_fits(shape, spec) and not _shape_fits(shape, (spec[2], spec[0], spec[1])):
            raise BundleError(
                f"{self._model_entry['file']} takes {tuple('?' if value is None else value for value in shape)} input "
                f"but the manifest's input spec says {spec[0]}x{spec[1]}x{spec[2]}; the bundle is inconsistent: "
                "re-export it"
            )
        recorded = self._model_entry.get("input") or {}
        if recorded.get("dtype") and recorded["dtype"] != self._backend.input.dtype:
            raise BundleError(
                f"{self._model_entry['file']} takes {self._backend.input.dtype} input but the manifest records "
                f"{recorded['dtype']}; the bundle is inconsistent: re-export it"
            )

    # ------------------------------------------------------------------ inference
    def model_input(self, images: Any) -> np.ndarray:
        """The backbone input tensor for ``images`` (prepared, normalised, quantized)."""
        return self._quantizer(prepare_batch(images, self.input_spec))

    def embed(self, images: Any) -> np.ndarray:
        """Embeddings (N, D) float32 of one image or a batch."""
        batch = prepare_batch(images, self.input_spec)
        if batch.shape[0] <= self.batch_size:
            return self._backend.run(self._quantizer(batch))
        parts = [
            self._backend.run(self._quantizer(batch[start : start + self.batch_size]))
            for start in range(0, batch.shape[0], self.batch_size)
        ]
        return np.concatenate(parts)

    def logits(self, images: Any) -> np.ndarray:
        """Head logits (N, C) of one image or a batch."""
        return self.head.logits(self.embed(images))

    def probabilities(self, images: Any) -> np.ndarray:
        """Softmax scores (N, C); :class:`BundleError` when the bundle has no classes yet."""
        head = self.head
        _require_classes(head, self.bundle.path)
        return softmax(head.logits(self.embed(images)))

    def predict(self, images: Any, top_k: int = 5) -> list[Prediction] | list[list[Prediction]]:
        """Top-k predictions: a list for one image, a list of lists for a batch.

        Raises:
            BundleError: the bundle has no classes yet (a headless import before its first class).
        """
        head, names = self._snapshot
        _require_classes(head, self.bundle.path)
        scores = softmax(head.logits(self.embed(images)))
        ranked = self.rank(scores, top_k, names)
        return ranked[0] if is_single_image(images) else ranked

    def rank(self, scores: np.ndarray, top_k: int = 5, class_names: list[str] | None = None) -> list[list[Prediction]]:
        """Turn (N, C) scores into ranked predictions (highest first, ties by class index)."""
        count = scores.shape[1]
        top_k = max(1, min(int(top_k), count))
        names = self.class_names if class_names is None else class_names
        ranked = []
        for row in scores:
            if top_k == 1:
                order = (int(row.argmax()),)
            elif count <= 256:
                order = np.argsort(-row, kind="stable")[:top_k].tolist()
            else:
                part = np.argpartition(-row, top_k - 1)[:top_k]
                order = part[np.argsort(-row[part], kind="stable")].tolist()
            ranked.append([Prediction(names[index], float(row[index]), index) for index in order])
        return ranked

    # ------------------------------------------------------------------ housekeeping
    def describe(self) -> dict[str, Any]:
        """A short JSON-ready description: backend, model file, input, classes."""
        return {
            "bundle": str(self.bundle.path),
            "backend": self.backend_name,
            "model_file": self._model_entry["file"],
            "input": self.input_spec.to_dict(),
            "embedding_size": self.head.embedding_size,
            "classes": len(self.class_names),
        }

    def close(self) -> None:
        """Release the interpreter and remove the temporary unpacked copy of a packed bundle."""
        self._backend = None  # type: ignore[assignment]
        if self._unpacked is not None:
            self._unpacked.close()

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _require_classes(head: Head, path: Any) -> None:
    if head.num_classes == 0:
        raise BundleError(
            f"the bundle {path} has no classes yet, so there is nothing to predict; teach it one with "
            "`edgeadapt-device add-class BUNDLE NAME PHOTO...` (or HeadUpdater(runtime).add_class(name, photos))"
        )
