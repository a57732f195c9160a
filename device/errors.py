"""Error types shared by every layer of edgeadapt.

All errors derive from :class:`EdgeAdaptError`, so callers can catch one type.
Messages say what was wrong and what to do about it.
"""

from __future__ import annotations


class EdgeAdaptError(Exception):
    """Base class of every error raised by edgeadapt."""


class BundleError(EdgeAdaptError):
    """A bundle is missing, corrupted, tampered with, or of an unknown schema."""


class InputError(EdgeAdaptError, ValueError):
    """An image or argument given by the caller is unusable (shape, dtype, mode, value)."""


class IncompatibleModelError(EdgeAdaptError):
    """A model or head does not fit the operation (wrong backbone, shape, structure)."""


class DatasetError(EdgeAdaptError, ValueError):
    """A dataset folder is empty, unreadable, or too small to split."""


class ConversionError(EdgeAdaptError):
    """Exporting or importing a model failed (unsupported ops, quantization failure)."""


class BackendUnavailableError(EdgeAdaptError):
    """No interpreter backend that can run the bundle, or another optional package an operation needs, is installed.

    The message names the ``pip install 'edgeadapt[extra]'`` that brings it.
    """


class UpdateError(EdgeAdaptError):
    """A head update was refused or could not be committed; nothing was changed."""


class ConcurrentUpdateError(UpdateError):
    """Another writer holds the bundle's lock."""


class StorageError(EdgeAdaptError):
    """A file could not be written: the disk is full, the folder is read-only or not writable."""


class SignatureError(BundleError):
    """A signature check failed (see :mod:`edgeadapt.device.signing`); ``reason`` names which check."""

    reason = "signature"


class UnsignedError(SignatureError):
    """Trusted keys are configured but the bundle or delta carries no signature."""

    reason = "unsigned"


class BadSignatureError(SignatureError):
    """The signature does not verify with the key it names: the signed statement was altered."""

    reason = "bad-signature"


class UnknownSignerError(SignatureError):
    """The signature was made by a key that is not among the trusted keys."""

    reason = "unknown-signer"


class ChangedAfterSigningError(SignatureError):
    """A file (or the manifest) differs from what was signed."""

    reason = "changed-after-signing"


class MalformedSignatureError(SignatureError):
    """The signature file is truncated, garbage, or not an edgeadapt DSSE envelope."""

    reason = "malformed-signature"


class KeyFileError(SignatureError):
    """A key file is unusable: wrong kind (private where public is expected), open permissions, unreadable."""

    reason = "key-file"
