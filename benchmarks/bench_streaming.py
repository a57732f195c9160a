"""Benchmark: peak memory and wall time of fine-tuning from memory vs streaming from files.

    python benchmarks/bench_streaming.py --data ../shared/data/flowers [--image-size 128]
        [--strategies head_only,top_layers:1] [--epochs 1] [--base model.keras] [--json-out out.json]

Every row is its own subprocess, so its peak resident memory (``ru_maxrss``) belongs to that
run alone (the launcher never imports TensorFlow: Linux carries a process's peak RSS over
``fork`` and ``exec``, so a big launcher would inflate every child's figure):

- ``baseline``: import TensorFlow, load the model, embed one batch — no dataset;
- ``memory``: ``load_image_folder`` (every image decoded into one uint8 array) + ``fine_tune``;
- ``stream``: ``stream_image_folder`` (paths and labels only) + ``fine_tune`` reading files
  batch by batch with tf.data (TensorFlow decoder).

The first strategy runs twice per mode, on the first half of the classes and on all of
them: the in-memory path's peak grows with the number of images, the streaming path's
does not (its overhead over the baseline is tf.data and Keras ``predict`` on a dataset,
a constant).

Test accuracy is measured the same way for both paths (in memory / streamed). Without
``--base`` the model is the built-in classifier trained for ``--pretrain-epochs`` (default 3)
on the first half of the classes, in a process of its own (not measured), and saved once:
a weak base, so the accuracies only show that both paths learn the same thing. Wall times
depend on the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("baseline", "memory", "stream")
CHILDREN = MODES + ("pretrain",)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def child(arguments: argparse.Namespace) -> dict:
    """One measured run (in its own process)."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    if arguments.child == "pretrain":
        return pretrain(arguments)
    start = time.perf_counter()
    from edgeadapt.data.image_folders import SplitOptions, load_image_folder
    from edgeadapt.training.finetune import FineTuneOptions, fine_tune
    from edgeadapt.training.input_adaptation import input_spec_for_model
    from edgeadapt.training.model_split import load_keras_model
    from edgeadapt.data.streaming import stream_image_folder

    model = load_keras_model(arguments.base)
    spec = input_spec_for_model(model)
    row: dict = {"mode": arguments.child, "strategy": arguments.strategy}
    classes = arguments.classes.split(",") if arguments.classes else None
    if arguments.child == "baseline":
        import numpy as np

        model.predict(np.zeros((arguments.batch_size,) + spec.shape, np.float32), verbose=0)
        row.update(load_s=0.0, train_s=0.0, eval_s=0.0, images=0, accuracy=float("nan"))
    else:
        split = SplitOptions(seed=arguments.seed)
        loading = time.perf_counter()
        if arguments.child == "memory":
            dataset = load_image_folder(arguments.data, spec, split, classes=classes, progress=False)
        else:
            dataset = stream_image_folder(arguments.data, spec, split, classes=classes)
        row["load_s"] = time.perf_counter() - loading
        options = FineTuneOptions.from_string(arguments.strategy, epochs=arguments.epochs,
                                              head_epochs=arguments.head_epochs, batch_size=arguments.batch_size,
                                              seed=arguments.seed, verbose=0)
        training = time.perf_counter()
        result = fine_tune(model, dataset, options)
        row["train_s"] = time.perf_counter() - training
        evaluating = time.perf_counter()
        if arguments.child == "memory":
            row["accuracy"] = result.evaluate(dataset.test.images, dataset.test.labels)
        else:
            row["accuracy"] = result.evaluate_stream(dataset, "test")
        row["eval_s"] = time.perf_counter() - evaluating
        row["images"] = len(dataset.train) + len(dataset.validation) + len(dataset.test)
    row["total_s"] = time.perf_counter() - start
    row["peak_rss_mb"] = _peak_rss_mb()
    return row


def pretrain(arguments: argparse.Namespace) -> dict:
    """The default base model: the built-in classifier briefly trained on half the classes, saved to --base."""
    import keras

    from edgeadapt.training.backbones import build_classifier
    from edgeadapt.data.image_folders import SplitOptions, load_image_folder
    from edgeadapt.device.manifest import InputSpec
    from edgeadapt.training.classifier import ClassifierTrainingOptions, train_classifier

    names = _class_names(arguments.data)
    keras.utils.set_random_seed(arguments.seed)
    if arguments.pretrain_epochs > 0 and len(names) >= 4:
        spec = InputSpec(height=arguments.image_size, width=arguments.image_size)
        pretraining = load_image_folder(arguments.data, spec, SplitOptions(seed=arguments.seed),
                                        classes=names[:len(names) // 2], progress=False)
        model = train_classifier(pretraining, ClassifierTrainingOptions(epochs=arguments.pretrain_epochs,
                                                                        seed=arguments.seed, verbose=0))
    else:
        model = build_classifier((arguments.image_size, arguments.image_size, 3), max(len(names), 2))
    model.save(arguments.base)
    return {"base": str(arguments.base)}


def _base_model(arguments: argparse.Namespace, folder: Path) -> Path:
    """The given --base, or the default base model made by a child process (every run loads this file)."""
    if arguments.base is not None:
        return arguments.base
    path = folder / "base.keras"
    command = [sys.executable, __file__, "--child", "pretrain", "--base", str(path), "--data", str(arguments.data),
               "--image-size", str(arguments.image_size), "--pretrain-epochs", str(arguments.pretrain_epochs),
               "--seed", str(arguments.seed)]
    completed = subprocess.run(command, capture_output=True, text=True,
                               env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    if completed.returncode != 0:
        raise RuntimeError(f"pretraining the base model failed:\n{completed.stderr[-3000:]}")
    return path


def _class_names(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if path.is_dir() and not path.name.startswith("."))


def _run(arguments: argparse.Namespace, mode: str, strategy: str, base: Path, classes: list[str]) -> dict:
    command = [sys.executable, __file__, "--child", mode, "--strategy", strategy, "--base", str(base),
               "--classes", ",".join(classes),
               "--data", str(arguments.data), "--epochs", str(arguments.epochs), "--head-epochs",
               str(arguments.head_epochs), "--batch-size", str(arguments.batch_size), "--seed", str(arguments.seed)]
    environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    completed = subprocess.run(command, capture_output=True, text=True, env=environment)
    if completed.returncode != 0:
        raise RuntimeError(f"{mode} {strategy} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="image folder, one sub-folder per class")
    parser.add_argument("--image-size", type=int, default=128, help="model input size without --base (default 128)")
    parser.add_argument("--base", type=Path, help="pretrained .keras model (default: the built-in classifier, "
                        "pretrained here on half the classes)")
    parser.add_argument("--pretrain-epochs", type=int, default=3,
                        help="epochs of that pretraining without --base (default 3; 0: freshly initialised)")
    parser.add_argument("--strategies", default="head_only,top_layers:1",
                        help="comma-separated strategies (default head_only,top_layers:1)")
    parser.add_argument("--epochs", type=int, default=1, help="backbone-stage epochs (default 1)")
    parser.add_argument("--head-epochs", type=int, default=20, help="head-stage epochs (default 20)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-out", dest="json", type=Path, metavar="FILE", help="also write the rows as JSON")
    parser.add_argument("--child", choices=CHILDREN, help=argparse.SUPPRESS)
    parser.add_argument("--strategy", default="head_only", help=argparse.SUPPRESS)
    parser.add_argument("--classes", help=argparse.SUPPRESS)
    arguments = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if arguments.child:
        print(json.dumps(child(arguments)))
        return 0

    rows = []
    with tempfile.TemporaryDirectory(prefix="edgeadapt-bench-streaming-") as folder:
        base = _base_model(arguments, Path(folder))
        names = _class_names(arguments.data)
        strategies = arguments.strategies.split(",")
        plan = [("baseline", "-", names)]
        if len(names) >= 4:
            plan += [(mode, strategies[0], names[:len(names) // 2]) for mode in ("memory", "stream")]
        plan += [(mode, strategy, names) for strategy in strategies for mode in ("memory", "stream")]
        for mode, strategy, classes in plan:
            row = _run(arguments, mode, strategy if strategy != "-" else "head_only", base, classes)
            row["strategy"], row["classes"] = strategy, len(classes) if mode != "baseline" else 0
            rows.append(row)
            print(f"[bench] {mode:<8} {strategy:<13} {row['images']:>6} images  peak RSS {row['peak_rss_mb']:7.0f} MB  "
                  f"total {row['total_s']:6.1f} s  acc {row['accuracy']:.3f}", flush=True)
    header = (f"{'mode':<9}{'strategy':<14}{'classes':>8}{'images':>7}{'peak RSS MB':>13}{'load s':>8}{'train s':>9}"
              f"{'eval s':>8}{'total s':>9}{'test acc':>10}")
    print()
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['mode']:<9}{row['strategy']:<14}{row['classes']:>8}{row['images']:>7}{row['peak_rss_mb']:>13.0f}"
              f"{row['load_s']:>8.1f}"
              f"{row['train_s']:>9.1f}{row['eval_s']:>8.1f}{row['total_s']:>9.1f}{row['accuracy']:>10.3f}")
    if arguments.json:
        arguments.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
