"""Data for host training: image folders, the built-in synthetic set, tf.data streaming, embeddings.

Modules: ``image_folders``, ``synthetic``, ``streaming``, ``embeddings``, ``embedding_cache``. The public names are re-exported lazily by :mod:`edgeadapt`.
"""
