"""A readable, plain-text summary of a bundle (``edgeadapt inspect``)."""

from __future__ import annotations

from collections import Counter

from edgeadapt.device.bundle import Bundle


def _kib(size: int) -> str:
    return f"{size / 1024:,.1f} KiB" if size < 1 << 20 else f"{size / (1 << 20):,.2f} MiB"


def _signature_line(bundle: Bundle) -> str:
    from edgeadapt.device.signing import describe_signature

    return describe_signature(bundle).describe()


def _identity_lines(bundle: Bundle) -> list[str]:
    """Identity, input, signature and backbone files."""
    data = bundle.manifest.data
    spec = bundle.manifest.input_spec
    lines = [
        f"bundle     {bundle.path}",
        f"name       {data.get('name', '?')}   version {data.get('version')}   parent {data.get('parent_version')}",
        f"id         {data.get('bundle_id')}",
        f"created    {data.get('created_at')}   schema {data.get('schema_version')}   checksums OK",
        "made by    " + ", ".join(f"{name} {version}" for name, version in data.get("created_by", {}).items()),
        f"input      {spec.height}x{spec.width}x{spec.channels} {spec.color_order} uint8, resize={spec.resize}, "
        f"float = pixel*{spec.scale:.6g} + {spec.offset:.6g}",
        f"embedding  {bundle.manifest.embedding_size} floats",
        f"backbone   fingerprint {bundle.manifest.backbone_fingerprint[:23]}...",
        f"signature  {_signature_line(bundle)}",
    ]
    for model in bundle.manifest.models:
        tensor = model.get("input", {})
        quant = f" scale={tensor['scale']:.6g} zero_point={tensor['zero_point']}" if tensor.get("scale") else ""
        size = bundle.manifest.files.get(model["file"], {}).get("size", 0)
        lines.append(
            f"  {model['file']:<28} {model['format']:<7} {model.get('quantization', '?'):<8} "
            f"{_kib(size):>12}  input {tensor.get('dtype', '?')}{quant}"
        )
    return lines


def _head_lines(bundle: Bundle) -> list[str]:
    """The head, its statistics (and ridge solver state) and its background embeddings."""
    data = bundle.manifest.data
    lines = []
    head = data["head"]
    normalisation = []
    if head.get("feature_mean"):
        normalisation.append("centered")
    if head.get("l2_normalize"):
        normalisation.append("L2-normalised")
    if head.get("temperature", 1.0) != 1.0:
        normalisation.append(f"temperature {head['temperature']:g}")
    lines.append(
        f"head       version {head.get('version')}, float32 {bundle.manifest.embedding_size} x {len(data['classes'])}"
        f"{', ' + ', '.join(normalisation) if normalisation else ''}"
    )
    statistics = head.get("statistics")
    if statistics:
        shared = statistics.get("bytes_shared", 0)
        lines.append(
            f"statistics {statistics.get('examples')} examples; {statistics.get('bytes_per_class')} bytes per class"
            + (f" + {_kib(shared)} shared Gram matrix" if shared else "")
        )
        basis = statistics.get("ridge_basis")
        if isinstance(basis, dict):
            files = bundle.manifest.files
            size = basis.get("bytes") or sum(int(files.get(path, {}).get("size", 0))
                                             for path in (basis.get("files") or {}).values())
            lines.append(f"           + {_kib(size)} ridge solver state over {basis.get('classes')} classes "
                         f"(served {basis.get('updates')} update(s) since it was built)")
    else:
        lines.append("statistics none (updates use a method that needs none unless one is chosen; methods that "
                     "need them ask for examples of the old classes)")
    background = head.get("background")
    if background:
        size = bundle.manifest.files.get(background.get("embeddings"), {}).get("size", 0)
        lines.append(f"background {background.get('count')} embeddings of ordinary photos, {background.get('dtype')}, "
                     f"{_kib(size)}")
    return lines


def _class_lines(data: dict, max_classes: int) -> list[str]:
    """The classes by origin, then the first ``max_classes`` of them."""
    lines = []
    classes = data["classes"]
    origins = Counter(entry.get("origin", "base") for entry in classes)
    if classes:
        lines.append(f"classes    {len(classes)} (" + ", ".join(f"{count} {origin}" for origin, count in origins.items())
                     + ")")
    else:
        lines.append("classes    0 (none yet: teach the first ones with `edgeadapt-device add-class BUNDLE NAME PHOTOS`)")
    for entry in classes[:max_classes]:
        extra = f"  {entry['examples']} examples" if entry.get("examples") is not None else ""
        lines.append(f"  {entry['index']:>4}  {entry['name']:<24} {entry.get('origin', 'base'):<13}{extra}")
    if len(classes) > max_classes:
        lines.append(f"  ... {len(classes) - max_classes} more")
    return lines


def _parity_lines(data: dict) -> list[str]:
    """The export parity figures per model format (none when the manifest has none)."""
    lines = []
    parity = data.get("parity") or {}
    if parity:
        lines.append("parity     format   float acc  int8 acc  top-1 agreement  samples")
        for model_format, figures in parity.items():
            if "embedding_cosine" in figures and "top1_agreement" not in figures:  # a headless import
                lines.append(f"           {model_format:<8} embedding cosine with the original "
                             f"{figures['embedding_cosine']:.6f} on {figures.get('samples')} probes")
                continue
            lines.append(
                f"           {model_format:<8} {figures.get('float_accuracy', float('nan')):>9.3f} "
                f"{figures.get('quantized_accuracy', float('nan')):>9.3f} {figures.get('top1_agreement', float('nan')):>16.3f}"
                f"  {figures.get('samples')}"
            )
    return lines


def describe_bundle(bundle: Bundle, max_classes: int = 20) -> str:
    """Summarise a verified bundle: identity, input, backbone files, head, classes, parity.

    Args:
        bundle: An opened (verified) bundle.
        max_classes: How many classes to list one per line.

    Returns:
        The summary, one item per line.
    """
    data = bundle.manifest.data
    lines = _identity_lines(bundle) + _head_lines(bundle) + _class_lines(data, max_classes) + _parity_lines(data)
    lines.append(f"total size {_kib(bundle.total_size())}")
    return "\n".join(lines)
