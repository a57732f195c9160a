"""Bundle operations on the host: import third-party models, add classes, merge heads, merge
device deltas, background embeddings.

Modules: ``importing``, ``import_headless``, ``import_report``, ``incremental``, ``deltas``, ``background``, ``incremental_inputs``, ``version_writing``, ``import_inputs``, ``import_preparation``, ``import_verification``. The public names are re-exported lazily by :mod:`edgeadapt`.
"""
