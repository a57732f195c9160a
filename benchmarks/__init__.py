"""The benchmarks: the library behind ``edgeadapt bench`` and the ``bench_*.py`` scripts.

Every ``bench_*.py`` here runs as a script (``python benchmarks/bench_x.py --help``); the other
modules hold the measured loops, baselines and reports that ``edgeadapt bench`` imports.
"""
