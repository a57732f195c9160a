"""The calibration embeddings of a head version, kept in one growing buffer between updates.

The few-shot math calibrates a new class against every embedding the bundle carries: its
background, its gate references and the examples learned on the device, in that order
(:func:`edgeadapt.device.update_plans.calibration_embeddings`). At 1000 classes x 1280-d that
is 25 MB of float32 rows. Joined afresh for every update, it costs a 25 MB allocation and its
page faults (about 24 ms of a 150 ms commit). Between two updates in one process only the device
examples grow (at the end), so :class:`CalibrationRows` keeps the joined rows in a buffer with
spare room and appends the new examples.
"""

from __future__ import annotations

import numpy as np

from edgeadapt.device.head_state import HeadState
from edgeadapt.device.update_plans import calibration_embeddings

#: Spare rows allocated beyond what is needed when the buffer is (re)built or grown.
_SPARE_FRACTION = 0.25
_SPARE_MINIMUM = 256


class CalibrationRows:
    """The calibration embeddings of successive head versions, reusing the rows they share.

    Reuse needs the very same background array and reference object as the last call (a
    state reloaded from disk has new ones: the rows are joined again) and device examples that
    start with the rows seen last time (compared, as they are small). The returned array is a
    read-only view; later calls never change the rows it shows.
    """

    def __init__(self) -> None:
        self._buffer: np.ndarray | None = None
        self._rows = 0
        self._fixed: tuple = (None, None)  # (background, references) objects of the buffer's first rows
        self._fixed_rows = 0
        self._examples = np.zeros((0, 0), np.float32)  # the device-example rows in the buffer

    def rows(self, state: HeadState) -> np.ndarray | None:
        """The calibration embeddings of ``state`` (float32 (N, D), read-only), or None when it has none.

        Args:
            state: The head version being updated.

        Returns:
            The same rows as :func:`~edgeadapt.device.update_plans.calibration_embeddings`.
        """
        background = state.background if state.background is not None and len(state.background) else None
        references = state.references if state.references is not None and len(state.references) else None
        examples = state.device_examples.as_float32() if state.device_examples is not None \
            and len(state.device_examples) else np.zeros((0, state.head.embedding_size), np.float32)
        seen = self._examples.shape[0]
        if (self._buffer is not None and self._fixed[0] is background and self._fixed[1] is references
                and examples.shape[0] >= seen and examples.shape[1] == self._buffer.shape[1]
                and np.array_equal(examples[:seen], self._examples)):
            self._append(examples[seen:])
        else:
            joined = calibration_embeddings(state)
            if joined is None:
                self._buffer = None
                return None
            self._rebuild(joined, (background, references), joined.shape[0] - examples.shape[0])
        self._examples = examples  # never written in place (device examples are replaced, not changed)
        view = self._buffer[: self._rows]
        view.flags.writeable = False
        return view

    def _rebuild(self, joined: np.ndarray, fixed: tuple, fixed_rows: int) -> None:
        spare = max(_SPARE_MINIMUM, int(joined.shape[0] * _SPARE_FRACTION))
        self._buffer = np.empty((joined.shape[0] + spare, joined.shape[1]), np.float32)
        self._buffer[: joined.shape[0]] = joined
        self._rows = joined.shape[0]
        self._fixed, self._fixed_rows = fixed, fixed_rows

    def _append(self, new_rows: np.ndarray) -> None:
        needed = self._rows + new_rows.shape[0]
        if needed > self._buffer.shape[0]:
            grown = np.empty((needed + max(_SPARE_MINIMUM, int(needed * _SPARE_FRACTION)), self._buffer.shape[1]),
                             np.float32)
            grown[: self._rows] = self._buffer[: self._rows]
            self._buffer = grown
        self._buffer[self._rows : needed] = new_rows
        self._rows = needed
