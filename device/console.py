"""Console output rules shared by the library and the command lines (no TensorFlow).

- progress bars only on a terminal and not in quiet mode (:func:`progress_enabled`);
- native libraries' start-up chatter on file descriptor 2 (TensorFlow's absl ``I``/``W`` lines,
  LiteRT's "Created TensorFlow Lite XNNPACK delegate") is held back (:func:`filtered_native_stderr`)
  unless :func:`set_output_mode` asked for native logs (``-vv``).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

# Native (C++/absl) start-up log lines TensorFlow writes to file descriptor 2 while it is imported,
# before TF_CPP_MIN_LOG_LEVEL takes effect: "I0000 00:00:1796104956.131802    7148 port.cc:153] ...".
_NATIVE_NOISE = (
    re.compile(r"^[IW]\d{4} [\d:.]+\s+\d+ [\w./-]+:\d+\]"),
    re.compile(r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"),
    re.compile(r"^To enable the following instructions: .*rebuild TensorFlow with the appropriate compiler flags\."),
    re.compile(r"^INFO: Created TensorFlow Lite XNNPACK delegate for CPU\."),
)

_state = {"quiet": False, "native_logs": False}


def set_output_mode(*, quiet: bool, native_logs: bool) -> None:
    """Set the process-wide output mode (the command lines call it from their verbosity).

    Args:
        quiet: No progress bars (``-q``).
        native_logs: Let native libraries' start-up logs through (``-vv``).

    Returns:
        None.
    """
    _state["quiet"] = bool(quiet)
    _state["native_logs"] = bool(native_logs)


def progress_enabled(stream: Any = None) -> bool:
    """Whether to draw a progress bar on ``stream`` (default ``sys.stderr``).

    Only on a terminal and not with ``-q``: redirected logs get no carriage returns or
    colour codes.

    Args:
        stream: The stream the bar writes to.

    Returns:
        True when a progress bar may be drawn.
    """
    if _state["quiet"]:
        return False
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def is_native_noise(line: str) -> bool:
    """Whether ``line`` is one of TensorFlow's native start-up info/warning log lines.

    Args:
        line: One line of text written to stderr.

    Returns:
        True for absl ``I``/``W`` lines and the banner lines that go with them.
    """
    return any(pattern.match(line) for pattern in _NATIVE_NOISE)


@contextlib.contextmanager
def filtered_native_stderr() -> Iterator[None]:
    """Hold back TensorFlow's native start-up log lines written to file descriptor 2.

    What is written to fd 2 inside the block is collected and written back afterwards
    without the lines :func:`is_native_noise` recognises; nothing else is lost.

    Yields:
        None.
    """
    if _state["native_logs"]:
        yield
        return
    try:
        saved = os.dup(2)
    except OSError:  # no usable stderr descriptor: nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as sink:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            kept = [line for line in sink.read().decode("utf-8", "replace").splitlines(keepends=True)
                    if not is_native_noise(line)]
            if kept:
                os.write(2, "".join(kept).encode("utf-8"))
