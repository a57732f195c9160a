"""edgeadapt: adapt image classifiers on and for edge devices (host side).

Nothing heavy is imported here: TensorFlow loads only when a host function that needs
it is called, so ``import edgeadapt.device`` works without TensorFlow installed.
"""

from __future__ import annotations

__version__ = "0.1.0"
