"""Host figure: head training on cached embeddings vs model.fit with the frozen backbone.

    python benchmarks/bench_head_training.py --data ../shared/data/flowers [--image-size 96] [--epochs 10]

A base classifier is trained once (built-in backbone). Then the same head (Dense, same
optimizer, batch size and epochs) is trained two ways on the same images:
  cached : backbone runs once per image (edgeadapt.data.embeddings), head trains on the embeddings
  graph  : keras Model(backbone frozen -> Dense).fit on the images, the backbone runs every epoch
Both are timed end to end (the cached path includes computing the embeddings once).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="image folder (default: built-in synthetic data)")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=10, help="head epochs for both paths")
    parser.add_argument("--base-epochs", type=int, default=8, help="epochs to train the base backbone")
    parser.add_argument("--json-out", dest="json", type=Path, metavar="FILE", help="also write the figures as JSON")
    arguments = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import numpy as np

    from edgeadapt.data.image_folders import load_image_folder
    from edgeadapt.device.manifest import InputSpec
    from edgeadapt.data.embeddings import compute_embeddings
    from edgeadapt.training.head_training import HeadTrainingOptions, train_head
    from edgeadapt.training.model_split import split_classifier
    from edgeadapt.data.synthetic import SyntheticOptions, synthetic_dataset
    from edgeadapt.training.classifier import ClassifierTrainingOptions, make_tf_dataset, train_classifier

    if arguments.data:
        dataset = load_image_folder(arguments.data, InputSpec(arguments.image_size, arguments.image_size))
    else:
        dataset = synthetic_dataset(SyntheticOptions(image_size=32, images_per_class=200))
    spec = dataset.spec
    classes = len(dataset.class_names)
    model = train_classifier(dataset, ClassifierTrainingOptions(epochs=arguments.base_epochs, verbose=0))
    backbone = split_classifier(model).backbone
    backbone.trainable = False
    options = HeadTrainingOptions(epochs=arguments.epochs, batch_size=32, patience=10**6)

    start = time.perf_counter()
    train_embeddings = compute_embeddings(backbone, dataset.train.images, spec, progress=False)
    embed_seconds = time.perf_counter() - start
    head = train_head(train_embeddings, dataset.train.labels, classes, options)
    cached_seconds = time.perf_counter() - start
    test_embeddings = compute_embeddings(backbone, dataset.test.images, spec, progress=False)
    cached_accuracy = float(np.mean(head.logits(test_embeddings).argmax(1) == dataset.test.labels))

    keras.utils.set_random_seed(options.seed)
    inputs = keras.Input(spec.shape)
    outputs = keras.layers.Dense(classes, kernel_regularizer=keras.regularizers.l2(options.weight_decay))(
        backbone(inputs, training=False))
    graph_model = keras.Model(inputs, outputs)
    graph_model.compile(optimizer=keras.optimizers.Adam(options.learning_rate),
                        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    train = make_tf_dataset(dataset.train.images, dataset.train.labels, spec, options.batch_size, True, 0)
    start = time.perf_counter()
    graph_model.fit(train, epochs=arguments.epochs, verbose=0)
    graph_seconds = time.perf_counter() - start
    test = make_tf_dataset(dataset.test.images, dataset.test.labels, spec, 128, False, 0)
    graph_accuracy = float(graph_model.evaluate(test, verbose=0)[1])

    report = {
        "images": len(dataset.train), "epochs": arguments.epochs, "input": list(spec.shape),
        "cached_seconds": cached_seconds, "cached_embedding_seconds": embed_seconds,
        "cached_head_only_seconds": cached_seconds - embed_seconds, "cached_accuracy": cached_accuracy,
        "graph_seconds": graph_seconds, "graph_accuracy": graph_accuracy,
        "speedup_end_to_end": graph_seconds / cached_seconds,
        "speedup_head_training": graph_seconds / (cached_seconds - embed_seconds),
    }
    print(f"{len(dataset.train)} training images {spec.height}x{spec.width}, {arguments.epochs} epochs, batch 32")
    print(f"{'path':<44}{'seconds':>9}{'test acc':>10}")
    print(f"{'cached embeddings (embed once + head fit)':<44}{cached_seconds:>9.2f}{cached_accuracy:>10.3f}")
    print(f"{'  of which embedding pass':<44}{embed_seconds:>9.2f}")
    print(f"{'model.fit, frozen backbone in the graph':<44}{graph_seconds:>9.2f}{graph_accuracy:>10.3f}")
    print(f"speed-up end to end {report['speedup_end_to_end']:.1f}x (head training alone "
          f"{report['speedup_head_training']:.1f}x); accuracy difference "
          f"{100 * (cached_accuracy - graph_accuracy):+.1f} points (goal: >= 10x, within 1 point)")
    if arguments.json:
        arguments.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
