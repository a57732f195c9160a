"""``edgeadapt import`` and ``edgeadapt export-fused``: third-party classifiers in, app-ready files out."""

from __future__ import annotations

import argparse
from pathlib import Path

from edgeadapt.device.cli_common import add_deprecated_alias, add_json_options, emit_report, parse_image_size
from edgeadapt.device.errors import InputError


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(value) for value in text.split(",") if value.strip())
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from error


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from error
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1, got {value}")
    return value



def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``import`` and ``export-fused`` sub-commands.

    Args:
        subparsers: The sub-parser group of the main parser.

    Returns:
        None.
    """
    parser = subparsers.add_parser(
        "import",
        help="import a third-party .tflite/.onnx/.keras classifier (or a headless .tflite/.keras extractor) into a bundle",
        description="Cut a classifier into backbone (image -> embedding) and a float32 linear head, write a bundle "
        "(TFLite imports also get an ONNX backbone), and check that the bundle's top-1 equals the original's on "
        "probe images (generated + --probe-images). Without --labels the model must be a feature extractor whose "
        "output is the embedding (e.g. it ends in a global average pooling): the bundle gets zero classes, and "
        "the device learns its first classes from a few photos each (edgeadapt-device add-class).",
    )
    parser.add_argument("model", type=Path, help="classifier file: .tflite, .onnx or .keras")
    parser.add_argument("--labels", type=Path,
                        help="labels file: one class name per line, output order; leave it out for a headless "
                        "feature extractor (.tflite or .keras): a bundle with zero classes")
    parser.add_argument("--out", type=Path, required=True, help="bundle directory to write (NAME.eab)")
    parser.add_argument("--data", type=Path,
                        help="folder of images of existing classes (sub-folders named like labels): class statistics "
                        "for later updates; for .keras also the int8 calibration images")
    parser.add_argument("--background", type=Path, metavar="DIR",
                        help="folder of ordinary, unlabelled photos (searched recursively): their embeddings are "
                        "stored with the head (float16) so that new classes can be calibrated to claim only what is "
                        "theirs; headless .keras extractors also use them as int8 calibration images")
    parser.add_argument("--background-limit", type=_positive, default=1000, metavar="N",
                        help="embed at most N background photos, a fixed subsample (default 1000)")
    parser.add_argument("--probe-images", type=Path, nargs="+", default=(), metavar="IMAGE",
                        help="images to check the import on (besides generated probes)")
    parser.add_argument("--probes", type=int, default=32, help="number of generated probe images")
    parser.add_argument("--name", help="bundle name (default: the model file name)")
    parser.add_argument("--input-scale", type=float, help="float models: model input = pixel * SCALE + OFFSET")
    parser.add_argument("--input-offset", type=float, help="float models: see --input-scale")
    parser.add_argument("--mean", type=_floats, help="ONNX: per-channel mean applied after scale/offset, e.g. 0.485,0.456,0.406")
    parser.add_argument("--std", type=_floats, help="ONNX: per-channel std, e.g. 0.229,0.224,0.225")
    parser.add_argument("--color-order", choices=("RGB", "BGR"), default="RGB", help="colour order the model expects")
    parser.add_argument("--resize", choices=("stretch", "center_crop"), default="stretch",
                        help="how the device fits images to the input size")
    parser.add_argument("--resample", choices=("lanczos", "bilinear", "bicubic", "nearest"), default="lanczos",
                        help="resize filter the device uses for images of another size (default lanczos, as in "
                             "model-zoo reference pipelines; bilinear is cheaper)")
    parser.add_argument("--image-size", type=parse_image_size, dest="input_size", metavar="HxW",
                        help="input size for models with a dynamic input size, e.g. 224x224")
    add_deprecated_alias(parser, "--input-size", "--image-size", dest="input_size", type=parse_image_size)
    parser.add_argument("--no-onnx", action="store_true", help="TFLite imports: do not add an ONNX backbone")
    parser.add_argument("--min-agreement", type=float,
                        help="fail below this top-1 agreement with the original (default 1.0; 0.9 for int8 Keras)")
    parser.add_argument("--ridge-solver-state", action="store_true",
                        help="with --data: also store the ridge method's cached solver state with the class "
                        "statistics (heads/v1/ridge_*.npy, about 3 D^2 + 2 D x C floats: ~30 MB at 1000 classes x "
                        "1280-d); only ridge updates use it, and without it the first one on a device builds it")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing bundle at --out")
    add_json_options(parser)
    parser.set_defaults(handler=run_import)

    fused = subparsers.add_parser(
        "export-fused",
        help="write one model file (backbone + head + softmax, labels embedded) for phone apps",
        description="Fuse the bundle's backbone (int8 where it is int8), current head and softmax into one .tflite "
        "(TFLite Metadata + labels.txt packed in) or .onnx (metadata_props) file that takes uint8 pixels and returns "
        "probabilities, and check it against the split bundle on probe images (100% top-1 agreement required).",
    )
    fused.add_argument("bundle", type=Path, help="bundle directory (NAME.eab) or packed bundle (.zip)")
    fused.add_argument("--format", choices=("tflite", "onnx"), required=True, help="fused file format")
    fused.add_argument("--out", type=Path, required=True, help="file to write (.tflite or .onnx)")
    fused.add_argument("--probe-images", type=Path, nargs="+", default=(), metavar="IMAGE",
                       help="images to check the fused file on (besides generated probes)")
    fused.add_argument("--probes", type=int, default=16, help="number of generated probe images")
    fused.add_argument("--sign-key", type=Path, metavar="PRIVATE_KEY",
                       help="also sign the fused file with this private key: writes OUT.dsse.json beside it "
                       "(docs/SIGNING.md, 'Apps')")
    add_json_options(fused, "the result")
    fused.set_defaults(handler=run_export_fused)


def run_import(arguments: argparse.Namespace) -> int:
    """Run ``edgeadapt import``.

    Args:
        arguments: The parsed command line.

    Returns:
        0.

    Raises:
        EdgeAdaptError: When the model cannot be imported or fails the agreement check.
    """
    from edgeadapt.converters.tflite_import import ImportOptions
    from edgeadapt.bundles.importing import ImportSettings, import_classifier

    if (arguments.input_scale is None) != (arguments.input_offset is None):
        raise InputError("give both --input-scale and --input-offset, or neither")
    settings = ImportSettings(
        name=arguments.name,
        model=ImportOptions(
            input_scale=arguments.input_scale, input_offset=arguments.input_offset,
            channel_mean=arguments.mean, channel_std=arguments.std, color_order=arguments.color_order,
            resize=arguments.resize, resample=arguments.resample, input_size=arguments.input_size,
        ),
        data=arguments.data,
        probe_images=tuple(arguments.probe_images),
        probes=arguments.probes,
        onnx=not arguments.no_onnx,
        min_agreement=arguments.min_agreement,
        overwrite=arguments.overwrite,
        background=arguments.background,
        background_limit=arguments.background_limit,
        ridge_solver_state=arguments.ridge_solver_state,
    )
    report = import_classifier(arguments.model, arguments.labels, arguments.out, settings)
    emit_report(arguments, report.table(), report.to_dict())
    return 0


def run_export_fused(arguments: argparse.Namespace) -> int:
    """Run ``edgeadapt export-fused``.

    Args:
        arguments: The parsed command line.

    Returns:
        0.

    Raises:
        EdgeAdaptError: When the bundle cannot be fused or the fused file disagrees with it.
    """
    from edgeadapt.converters.fused_export import export_fused
    from edgeadapt.device.bundle import Bundle
    from edgeadapt.device.preprocessing import prepare_batch

    sign_key = None
    if arguments.sign_key:  # a bad key is refused before anything is written
        from edgeadapt.device.keys import load_private_key

        sign_key = load_private_key(arguments.sign_key)
    bundle = Bundle.open(arguments.bundle)
    probe_images = None
    if arguments.probe_images:
        probe_images = prepare_batch([str(path) for path in arguments.probe_images], bundle.manifest.input_spec)
    result = export_fused(bundle, arguments.out, arguments.format, probe_images=probe_images, probes=arguments.probes)
    text = (
        f"wrote {result.path} ({result.format}, {result.size / 1024:.0f} KiB, {result.num_classes} classes, "
        f"backbone {result.backbone_quantization}, float32 head); vs split bundle on {result.probes} probes: "
        f"top-1 agreement {result.top1_agreement:.3f}, max score difference {result.max_score_difference:.2g}"
    )
    data = result.to_dict()
    if sign_key is not None:
        from edgeadapt.device.signing import sign_file

        signature = sign_file(result.path, sign_key)
        data.update(signature=str(signature), signer=sign_key.key_id)
        text += f"\nsigned: {signature} (key {sign_key.key_id})"
    emit_report(arguments, text, data)
    return 0
