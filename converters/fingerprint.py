"""Backbone fingerprints: the identity a head is bound to."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import keras


def backbone_fingerprint(backbone: "keras.Model") -> str:
    """sha256 over the backbone's input shape, weight shapes and float32 weight values.

    Two backbones with the same weights get the same fingerprint whatever file format they
    are exported to, so a head trained on one fits every export of it.

    Args:
        backbone: The Keras backbone.

    Returns:
        ``"sha256:<hex>"``.
    """
    digest = hashlib.sha256()
    digest.update(repr([tuple(tensor.shape) for tensor in backbone.inputs]).encode())
    for weight in backbone.weights:
        value = np.ascontiguousarray(np.asarray(weight), dtype=np.float32)
        digest.update(repr(value.shape).encode())
        digest.update(value.tobytes())
    return "sha256:" + digest.hexdigest()


def file_fingerprint(content: bytes) -> str:
    """Fingerprint of a third-party model file (used for imported backbones)."""
    return "sha256:" + hashlib.sha256(content).hexdigest()
