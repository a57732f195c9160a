"""edgeadapt.detection: add classes to SSD-style TFLite detectors, keeping the old classes bit-identical.

Modules (nothing heavy is imported here):

- :mod:`~edgeadapt.detection.structure`: find the class predictors, anchors and post-process options.
- :mod:`~edgeadapt.detection.annotations`: Pascal VOC / COCO readers, labelmaps.
- :mod:`~edgeadapt.detection.features`: per-anchor embeddings (predictor inputs), cached.
- :mod:`~edgeadapt.detection.training`: anchor matching, numpy training of the new rows.
- :mod:`~edgeadapt.detection.rewrite`: interleaved rows, quantization, NMS mode, labels metadata.
- :mod:`~edgeadapt.detection.add_classes`: the whole ``edgeadapt detector add-classes`` run.
- :mod:`~edgeadapt.benchmarks.detection`: ``edgeadapt bench detection``.

See docs/DETECTION.md.
"""
