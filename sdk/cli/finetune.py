"""``edgeadapt adapt-input`` and ``edgeadapt train``: change a model's input shape; fine-tune it on a folder."""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from edgeadapt.device.cli_common import (
    add_deprecated_alias,
    add_json_options,
    emit_report,
    keras_verbosity,
    parse_image_size,
    verbosity_of,
)
from edgeadapt.device.errors import InputError

logger = logging.getLogger(__name__)
DISTRIBUTIONS = ("none", "mirrored", "multi-worker")


#: "128x96" -> (128, 96) (height x width); "128" -> (128, 128).
parse_size = parse_image_size


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``adapt-input`` and ``train`` sub-commands.

    Args:
        subparsers: The sub-parser group of the main parser.

    Returns:
        None.
    """
    _register_adapt_input(subparsers)
    _register_train(subparsers)


def _register_adapt_input(subparsers: argparse._SubParsersAction) -> None:
    adapt = subparsers.add_parser(
        "adapt-input",
        help="give a Keras model a new input size and/or channel count, reusing its weights",
        description="Rebuild MODEL (.keras) for a new input size (HxW) and/or channel count (1 or 3) and copy its "
        "weights: a fully convolutional model with global pooling keeps every weight at a new size; a grayscale "
        "first layer is spread over RGB (w/3, or luma weights with --spread luma) and an RGB first layer is summed "
        "for grayscale, checked numerically. A Dense layer after Flatten cannot follow a size change: the command "
        "stops and names it, unless --replace-flatten swaps the Flatten for global average pooling (then retrain "
        "the head, e.g. `edgeadapt train --strategy head_only`). MODEL is never modified.",
    )
    adapt.add_argument("model", type=Path, help="Keras model file (.keras)")
    adapt.add_argument("--image-size", type=parse_size, dest="size", metavar="HxW",
                       help="new input size HxW, e.g. 128x128 (default: unchanged)")
    add_deprecated_alias(adapt, "--size", "--image-size", dest="size", type=parse_size)
    adapt.add_argument("--channels", type=int, help="new channel count: 1 (grayscale) or 3 (RGB) (default: unchanged)")
    adapt.add_argument("--out", type=Path, required=True, help="new model file (.keras)")
    adapt.add_argument("--replace-flatten", action="store_true",
                       help="swap Flatten for GlobalAveragePooling2D when a Dense layer depends on the input size")
    adapt.add_argument("--spread", choices=("equal", "luma"), default="equal",
                       help="gray->RGB rule for the first kernel: equal (w/3 per channel, default) or luma weights")
    adapt.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    adapt.set_defaults(handler=run_adapt_input)


def _register_train(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser(
        "train",
        help="fine-tune a Keras model on an image folder: head_only, top_layers:N or full",
        description="Fine-tune MODEL on --data (one sub-folder of images per class) with one of three strategies: "
        "head_only (frozen backbone, head trained on cached embeddings: fast, keeps the backbone fingerprint), "
        "top_layers:N (head first, then the top N blocks unfrozen at a 10x lower learning rate, BatchNorm frozen) "
        "or full (head first, then every layer). Validation split with early stopping and best-weights restore. "
        "--out ending in .keras saves the fine-tuned classifier; anything else (e.g. OUT.eab) is exported as a "
        "bundle. After top_layers/full the backbone fingerprint changes: heads and device-added classes of older "
        "bundles no longer fit the new backbone. By default the whole folder is decoded into memory first; with "
        "--stream images are read from disk batch by batch instead (for folders bigger than memory), and with "
        "--distribute multi-worker each worker then reads only its own shard of the training files.",
    )
    train.add_argument("--data", type=Path, required=True, help="image folder: one sub-folder per class")
    train.add_argument("--model", type=Path, required=True, help="pretrained Keras classifier or backbone (.keras)")
    train.add_argument("--strategy", default="head_only", help="head_only | top_layers:N | full")
    train.add_argument("--out", type=Path, required=True, help="OUT.keras (model) or a bundle directory, e.g. OUT.eab")
    train.add_argument("--image-size", type=parse_size, dest="size", metavar="HxW",
                       help="adapt the model to this input size HxW first")
    add_deprecated_alias(train, "--size", "--image-size", dest="size", type=parse_size)
    train.add_argument("--channels", type=int, help="adapt the model to 1 or 3 channels first")
    train.add_argument("--classes", help="comma-separated subset of class folders (default: all)")
    train.add_argument("--stream", action="store_true",
                       help="stream --data from disk with tf.data instead of loading every image into memory: for "
                       "folders bigger than RAM. Same split; pixels within 1 grey level of the in-memory loader "
                       "(identical with --stream-decoder pillow); only calibration and parity images are loaded for "
                       "a bundle. With --distribute multi-worker each worker reads only its shard of the files")
    train.add_argument("--stream-decoder", choices=("tensorflow", "pillow"), default="tensorflow",
                       help="with --stream: decode with TensorFlow ops (fast) or with the device's Pillow "
                       "preprocessing (identical pixels, slower)")
    train.add_argument("--epochs", type=int, default=10, help="backbone-stage epochs (top_layers/full)")
    train.add_argument("--head-epochs", type=int, default=40, help="head-stage epochs")
    train.add_argument("--learning-rate", type=float, default=1e-3, help="head learning rate")
    train.add_argument("--backbone-learning-rate", type=float,
                       help="backbone learning rate (default: head learning rate / 10)")
    train.add_argument("--batch-size", type=int, default=32, help="images per training step")
    train.add_argument("--patience", type=int, default=3, help="early-stopping patience of the backbone stage")
    train.add_argument("--augment", action="store_true", help="random flip/zoom/shift/brightness/contrast (backbone stage)")
    train.add_argument("--validation-fraction", type=float, default=0.15, help="validation share per class")
    train.add_argument("--test-fraction", type=float, default=0.15, help="held-out test share per class")
    train.add_argument("--embedding-cache", type=Path, help="folder to cache embeddings in (head stage)")
    train.add_argument("--distribute", choices=DISTRIBUTIONS, default="none",
                       help="tf.distribute strategy: none, mirrored (all local devices) or multi-worker (TF_CONFIG)")
    train.add_argument("--formats", default="tflite,onnx", help="bundle formats, comma-separated")
    train.add_argument("--ridge-solver-state", action="store_true",
                       help="bundle --out: also store the ridge method's cached solver state with the class "
                       "statistics (heads/v1/ridge_*.npy, about 3 D^2 + 2 D x C floats: ~30 MB at 1000 classes x "
                       "1280-d); only ridge updates use it, and without it the first one on a device builds it")
    train.add_argument("--save-model", type=Path, help="also save the fine-tuned classifier here (.keras)")
    train.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    train.add_argument("--seed", type=int, default=0, help="seed of the split, the initialisation and the augmentation")
    train.add_argument("--keras-verbose", type=int, choices=(0, 1, 2),
                       help="Keras progress output: 0 none, 1 bar, 2 one line per epoch (default: a bar on a "
                       "terminal, nothing in a redirected log, one line per epoch with -v)")
    add_json_options(train)
    train.set_defaults(handler=run_train)


def _check_output(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise InputError(f"{path} already exists; pass --overwrite to replace it")


def run_adapt_input(arguments: argparse.Namespace) -> int:
    """Run ``edgeadapt adapt-input``.

    Args:
        arguments: The parsed command line.

    Returns:
        0.

    Raises:
        EdgeAdaptError: When the model cannot take the new input shape or --out exists.
    """
    from edgeadapt.training.input_adaptation import adapt_input_with_report

    if arguments.out.suffix != ".keras":
        raise InputError(f"--out must be a .keras file, got {arguments.out.name}")
    if arguments.size is None and arguments.channels is None:
        raise InputError("nothing to change: give --image-size HxW and/or --channels N")
    _check_output(arguments.out, arguments.overwrite)
    height, width = arguments.size if arguments.size else (None, None)
    model, report = adapt_input_with_report(arguments.model, height=height, width=width,
                                            channels=arguments.channels, replace_flatten=arguments.replace_flatten,
                                            spread=arguments.spread)
    arguments.out.parent.mkdir(parents=True, exist_ok=True)
    model.save(arguments.out)
    print(report.summary())
    print(f"saved {arguments.out}")
    if report.reinitialised_layers:
        print("next: retrain the head, e.g. edgeadapt train --model "
              f"{arguments.out} --data DIR --strategy head_only --out NEW.eab")
    return 0


def _distribution(name: str):
    if name == "none":
        return None
    import tensorflow as tf

    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if "TF_CONFIG" not in os.environ:
        raise InputError("--distribute multi-worker needs TF_CONFIG (cluster and task) in the environment; "
                         "see docs/FINETUNING.md and examples/multiworker_two_process.py")
    return tf.distribute.MultiWorkerMirroredStrategy()


def is_chief() -> bool:
    """True unless TF_CONFIG names this process a non-chief worker (only the chief writes outputs)."""
    config = json.loads(os.environ.get("TF_CONFIG", "{}") or "{}")
    task = config.get("task", {})
    cluster = config.get("cluster", {})
    if not task:
        return True
    if task.get("type") == "chief":
        return True
    return task.get("type") == "worker" and int(task.get("index", 0)) == 0 and "chief" not in cluster


def run_train(arguments: argparse.Namespace) -> int:
    """Run ``edgeadapt train``.

    Args:
        arguments: The parsed command line.

    Returns:
        0.

    Raises:
        EdgeAdaptError: When the data, the model, the training or the export fails.
    """
    # A multi-worker strategy must exist before any other TensorFlow work.
    distribution = _distribution(arguments.distribute)
    from edgeadapt.training.finetune import fine_tune
    from edgeadapt.training.input_adaptation import adapt_input, input_spec_for_model
    from edgeadapt.training.model_split import load_keras_model

    options = _fine_tune_options(arguments)
    chief = is_chief()
    if chief:
        _check_output(arguments.out, arguments.overwrite)
    model = load_keras_model(arguments.model)
    if arguments.size or arguments.channels:
        height, width = arguments.size if arguments.size else (None, None)
        model = adapt_input(model, height=height, width=width, channels=arguments.channels)
    spec = input_spec_for_model(model)
    dataset = _training_data(arguments, spec)
    result = fine_tune(model, dataset, options, distribution_strategy=distribution)
    if not arguments.stream:
        accuracy = result.evaluate(dataset.test.images, dataset.test.labels)
    elif chief:  # streamed: only the chief reads the test files
        accuracy = result.evaluate_stream(dataset, "test")
    else:
        accuracy = float("nan")
    report = {
        "strategy": options.label,
        "classes": result.class_names,
        "streamed": arguments.stream,
        "test_accuracy": accuracy,
        "test_images": len(dataset.test),
        "seconds": result.seconds,
        "backbone_fingerprint": result.backbone_fingerprint,
        "previous_backbone_fingerprint": result.previous_backbone_fingerprint,
        "backbone_changed": result.backbone_changed,
        "input": spec.to_dict(),
        "output": str(arguments.out),
    }
    tested = f"test accuracy {accuracy:.3f}" if accuracy == accuracy else "test split evaluated by the chief"
    lines = [f"strategy {options.label}: {tested} on {len(dataset.test)} images ({result.total_seconds:.0f} s)"]
    if result.backbone_changed:
        lines.append(f"the backbone changed: fingerprint {result.backbone_fingerprint[:19]}... (was "
              f"{result.previous_backbone_fingerprint[:19]}...). Heads and device-added classes of bundles made "
              "from the old backbone are not compatible with it; ship this new bundle instead.")
    if not chief:
        lines.append("not the chief worker: nothing written")
        print(json.dumps(report, indent=2) if arguments.json else "\n".join(lines))
        return 0
    lines += _write_outputs(arguments, result, dataset, report)
    emit_report(arguments, "\n".join(lines), report)
    return 0


def _fine_tune_options(arguments: argparse.Namespace):
    """The :class:`~edgeadapt.training.finetune.FineTuneOptions` of ``edgeadapt train``'s command line."""
    from edgeadapt.training.finetune import FineTuneOptions

    return FineTuneOptions.from_string(
        arguments.strategy,
        epochs=arguments.epochs,
        head_epochs=arguments.head_epochs,
        head_learning_rate=arguments.learning_rate,
        backbone_learning_rate=arguments.backbone_learning_rate,
        batch_size=arguments.batch_size,
        patience=arguments.patience,
        augment=arguments.augment,
        validation_fraction=arguments.validation_fraction,
        embedding_cache=arguments.embedding_cache,
        seed=arguments.seed,
        verbose=(keras_verbosity(verbosity_of(arguments)) if arguments.keras_verbose is None
                 else arguments.keras_verbose),
    )


def _training_data(arguments: argparse.Namespace, spec):
    """The --data folder at the model's input spec: loaded into memory, or streamed with --stream."""
    from edgeadapt.data.image_folders import SplitOptions, load_image_folder
    from edgeadapt.data.streaming import StreamOptions, stream_image_folder

    classes = [name.strip() for name in arguments.classes.split(",")] if arguments.classes else None
    split = SplitOptions(validation_fraction=arguments.validation_fraction, test_fraction=arguments.test_fraction,
                         seed=arguments.seed)
    if arguments.stream:
        return stream_image_folder(arguments.data, spec, split, classes=classes,
                                   options=StreamOptions(decoder=arguments.stream_decoder))
    return load_image_folder(arguments.data, spec, split, classes=classes)


def _write_outputs(arguments: argparse.Namespace, result, dataset, report: dict) -> list[str]:
    """Save the model (--out .keras) or export a bundle, and --save-model; returns the lines to print."""
    lines = []
    if arguments.out.suffix == ".keras":
        result.save_model(arguments.out)
        lines.append(f"saved {arguments.out}")
    else:
        from edgeadapt.converters.bundle_export import BundleExportOptions

        formats = tuple(name.strip() for name in arguments.formats.split(",") if name.strip())
        export = result.export_bundle(arguments.out, dataset, BundleExportOptions(
            formats=formats, name=arguments.out.stem, overwrite=arguments.overwrite,
            ridge_solver_state=arguments.ridge_solver_state))
        report["parity"] = {name: parity.to_dict() for name, parity in export.parity.items()}
        lines.append(f"bundle written: {arguments.out}")
    if arguments.save_model:
        result.save_model(arguments.save_model)
        lines.append(f"saved {arguments.save_model}")
    return lines
