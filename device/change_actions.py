"""The ``change.action`` values a bundle version records (one enum; no imports, so every module can use it)."""

from __future__ import annotations

import enum


class ChangeAction(str, enum.Enum):
    """The ``change.action`` of a bundle version."""

    EXPORT = "export"
    ADD_CLASS = "add-class"
    ADD_EXAMPLES = "add-examples"
    REMOVE_CLASS = "remove-class"
    RENAME_CLASS = "rename-class"
    SET_REFERENCES = "set-references"
    CALIBRATE_UNKNOWN = "calibrate-unknown"
    ROLLBACK = "rollback"
    COMPACT = "compact"
    EXPORT_HEAD = "export-head"
    HOST_ADD_CLASSES = "host-add-classes"
    HOST_RESOLVE = "host-resolve"
    HOST_MERGE_HEADS = "host-merge-heads"
    MERGE_DELTAS = "merge-deltas"

    def __str__(self) -> str:
        return self.value
