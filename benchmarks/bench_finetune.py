"""Benchmark: fine-tuning strategies and input-shape adaptation on a real image folder.

    python benchmarks/bench_finetune.py --data ../shared/data/flowers [--image-size 64] [--large-size 128]

Part 1 — the built-in backbone is pretrained on the first two classes of the folder,
then adapted to all of them with head_only, top_layers:N and full, against training the
same architecture from scratch on all classes. Test accuracy and wall time per row.

Part 2 — input adaptation of a model trained on all classes:
- resolution SIZE -> LARGE (RGB): accuracy right after adapt_input (no training), after a
  short fine-tune, and training the adapted architecture from scratch for the same time;
- gray -> RGB at SIZE: a model trained on grayscale images, adapted to 3 channels ("equal"
  and "luma" kernel spreading), evaluated on colour images the same way.

Everything runs on the CPU; with the defaults (64 -> 128) it takes about 10-15 minutes
on 2 cores. Numbers vary by a few points between seeds (small test split).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class Row:
    section: str
    method: str
    accuracy: float
    seconds: float
    note: str = ""


@dataclass
class Results:
    rows: list[Row] = field(default_factory=list)

    def add(self, section: str, method: str, accuracy: float, seconds: float, note: str = "") -> None:
        row = Row(section, method, float(accuracy), float(seconds), note)
        self.rows.append(row)
        print(f"[bench] {section:<22} {method:<34} acc {accuracy:.3f}  {seconds:6.1f} s  {note}", flush=True)

    def table(self) -> str:
        lines = [f"{'section':<22} {'method':<34} {'test acc':>8} {'wall s':>8}  note",
                 "-" * 100]
        section = None
        for row in self.rows:
            if section is not None and row.section != section:
                lines.append("")
            section = row.section
            lines.append(f"{row.section:<22} {row.method:<34} {row.accuracy:>8.3f} {row.seconds:>8.1f}  {row.note}")
        return "\n".join(lines)


def _classifier_accuracy(model, dataset) -> float:
    """Test accuracy of a Keras classifier through its split backbone + head (as the device would run it)."""
    from edgeadapt.data.embeddings import compute_embeddings
    from edgeadapt.training.model_split import split_classifier

    split = split_classifier(model)
    embeddings = compute_embeddings(split.backbone, dataset.test.images, dataset.spec, progress=False)
    return float(np.mean(split.head.logits(embeddings).argmax(1) == dataset.test.labels))


def _timed(function, *args, **kwargs):
    start = time.perf_counter()
    value = function(*args, **kwargs)
    return value, time.perf_counter() - start


class _Bench:
    """The benchmark's settings and rows, and its three steps: load a folder, train from scratch, fine-tune."""

    def __init__(self, arguments: argparse.Namespace):
        from edgeadapt.training.backbones import BackboneOptions
        from edgeadapt.data.image_folders import SplitOptions

        self.arguments = arguments
        self.seed = arguments.seed
        self.split = SplitOptions(seed=arguments.seed)
        self.results = Results()
        self.backbone = BackboneOptions()

    def load(self, height: int, channels: int = 3):
        from edgeadapt.data.image_folders import load_image_folder
        from edgeadapt.device.manifest import InputSpec

        arguments = self.arguments
        spec = InputSpec(height=height, width=height, channels=channels, color_order="RGB" if channels == 3 else "GRAY")
        dataset, seconds = _timed(load_image_folder, arguments.data, spec, self.split, progress=False)
        if arguments.max_per_class:
            dataset.train = dataset.train.per_class(arguments.max_per_class, self.seed)
        print(f"[bench] loaded {arguments.data} at {spec.shape}: {len(dataset.train)}/{len(dataset.validation)}/"
              f"{len(dataset.test)} images in {seconds:.1f} s", flush=True)
        return dataset

    def scratch(self, dataset, epochs: int, seconds: float | None = None):
        from edgeadapt.training.finetune_keras import time_budget
        from edgeadapt.training.classifier import ClassifierTrainingOptions, train_classifier

        options = ClassifierTrainingOptions(epochs=epochs, seed=self.seed, verbose=self.arguments.verbose,
                                            backbone=self.backbone)
        callbacks = [time_budget(seconds)] if seconds else []
        return _timed(train_classifier, dataset, options, callbacks)

    def tune(self, model, dataset, strategy: str, epochs: int):
        from edgeadapt.training.finetune import FineTuneOptions, fine_tune

        arguments = self.arguments
        options = FineTuneOptions.from_string(strategy, epochs=epochs, augment=strategy != "head_only",
                                              head_learning_rate=arguments.learning_rate, seed=self.seed,
                                              verbose=arguments.verbose, patience=arguments.patience)
        return _timed(fine_tune, model, dataset, options)


def run(arguments: argparse.Namespace) -> Results:
    bench = _Bench(arguments)
    rgb = bench.load(arguments.image_size)
    tuned = _strategies(bench, rgb)
    _resolution(bench, rgb, tuned[f"top_layers:{arguments.top_blocks}"].model)
    _gray_to_rgb(bench, rgb)
    return bench.results


def _strategies(bench: _Bench, rgb) -> dict:
    """Part 1: pretrain on two classes, then each strategy on all classes, against training from scratch."""
    arguments, results = bench.arguments, bench.results
    names = rgb.class_names
    base_classes = names[:2]
    section = f"{arguments.image_size}px, {len(base_classes)}->{len(names)} classes"
    base, seconds = bench.scratch(rgb.select_classes(base_classes), arguments.pretrain_epochs)
    results.add(section, f"pretrain on {'+'.join(base_classes)}", _classifier_accuracy(base, rgb.select_classes(base_classes)),
                seconds, f"{len(base_classes)}-class test accuracy, {arguments.pretrain_epochs} epochs")
    tuned = {}
    for strategy in ("head_only", f"top_layers:{arguments.top_blocks}", "full"):
        result, seconds = bench.tune(base, rgb, strategy, arguments.epochs)
        tuned[strategy] = result
        epochs_run = len(result.history.get("backbone", {}).get("loss", []))
        note = "head on cached embeddings" if strategy == "head_only" else (
            f"head stage + {epochs_run} backbone epoch(s), backbone lr {result.options.effective_backbone_learning_rate:g}")
        results.add(section, strategy, result.evaluate(rgb.test.images, rgb.test.labels), seconds, note)
    model, seconds = bench.scratch(rgb, arguments.pretrain_epochs)
    results.add(section, "from scratch (all classes)", _classifier_accuracy(model, rgb), seconds,
                f"{arguments.pretrain_epochs} epochs, random init")
    return tuned


def _resolution(bench: _Bench, rgb, source) -> None:
    """Part 2a: adapt the top_layers model to the large size, with and without a short fine-tune."""
    from edgeadapt.training.input_adaptation import adapt_input

    arguments, results = bench.arguments, bench.results
    size, large = arguments.image_size, arguments.large_size
    section = f"resolution {size}->{large}"
    results.add(section, f"source model at {size}", _classifier_accuracy(source, rgb), 0.0,
                f"top_layers:{arguments.top_blocks} result of part 1")
    big = bench.load(large)
    adapted, seconds = _timed(adapt_input, source, large, large)
    results.add(section, "adapted, no training", _classifier_accuracy(adapted, big), seconds, "every weight reused")
    result, tune_seconds = bench.tune(adapted, big, arguments.short_strategy, arguments.short_epochs)
    results.add(section, f"adapted + short {arguments.short_strategy}", result.evaluate(big.test.images, big.test.labels),
                tune_seconds, f"{arguments.short_epochs} epoch(s) max")
    model, seconds = bench.scratch(big, 100, tune_seconds)
    results.add(section, "from scratch, same time", _classifier_accuracy(model, big), seconds, "random init, time-capped")


def _gray_to_rgb(bench: _Bench, rgb) -> None:
    """Part 2b: a grayscale model adapted to RGB, with and without a short fine-tune."""
    from edgeadapt.training.input_adaptation import adapt_input

    arguments, results = bench.arguments, bench.results
    section = f"gray->RGB at {arguments.image_size}"
    gray = bench.load(arguments.image_size, channels=1)
    gray_model, seconds = bench.scratch(gray, arguments.pretrain_epochs)
    results.add(section, "gray model on gray images", _classifier_accuracy(gray_model, gray), seconds,
                f"trained from scratch, {arguments.pretrain_epochs} epochs")
    for spread in ("equal", "luma"):
        adapted, seconds = _timed(adapt_input, gray_model, channels=3, spread=spread)
        results.add(section, f"adapted ({spread}), no training", _classifier_accuracy(adapted, rgb), seconds,
                    "on colour images")
    adapted = adapt_input(gray_model, channels=3, spread=arguments.spread)
    result, tune_seconds = bench.tune(adapted, rgb, arguments.short_strategy, arguments.short_epochs)
    results.add(section, f"adapted ({arguments.spread}) + short {arguments.short_strategy}",
                result.evaluate(rgb.test.images, rgb.test.labels), tune_seconds, f"{arguments.short_epochs} epoch(s) max")
    model, seconds = bench.scratch(rgb, 100, tune_seconds)
    results.add(section, "from scratch, same time", _classifier_accuracy(model, rgb), seconds, "random init, time-capped")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="image folder, one sub-folder per class")
    parser.add_argument("--image-size", type=int, default=64, help="base resolution (default 64)")
    parser.add_argument("--large-size", type=int, default=128, help="resolution to adapt to (default 128)")
    parser.add_argument("--pretrain-epochs", type=int, default=20, help="epochs of from-scratch training (default 20)")
    parser.add_argument("--epochs", type=int, default=10, help="backbone-stage epochs of top_layers/full (default 10)")
    parser.add_argument("--learning-rate", type=float, default=1e-3,
                        help="head learning rate; the backbone learns 10x slower (default 1e-3)")
    parser.add_argument("--patience", type=int, default=3, help="early-stopping patience of the backbone stage")
    parser.add_argument("--top-blocks", type=int, default=3, help="N of top_layers:N (default 3)")
    parser.add_argument("--short-strategy", default="full", help="strategy of the short fine-tune after adaptation")
    parser.add_argument("--short-epochs", type=int, default=3, help="epochs of the short fine-tune (default 3)")
    parser.add_argument("--spread", default="equal", choices=("equal", "luma"),
                        help="gray->RGB kernel rule used before the short fine-tune (default equal)")
    parser.add_argument("--max-per-class", type=int, help="use at most this many training images per class")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", type=int, default=0, help="Keras progress output (0, 1 or 2)")
    parser.add_argument("--json-out", dest="json", type=Path, metavar="FILE", help="also write the rows as JSON")
    arguments = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    results = run(arguments)
    total = time.perf_counter() - start
    print()
    print(results.table())
    print(f"\ntotal benchmark time: {total / 60:.1f} min")
    if arguments.json:
        arguments.json.write_text(json.dumps([row.__dict__ for row in results.rows], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
