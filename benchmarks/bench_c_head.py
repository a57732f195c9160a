"""Figures of the C head library (device/c) against the numpy device path.

    python benchmarks/bench_c_head.py [--fuzz-seconds 10] [--data ../shared/data] [--json] [--json-out FILE]

1. Library size: source lines, ``.text`` bytes at -Os (``size``) of the library objects.
2. Head file size for a 1000 x 1280 head, float32 and int8.
3. Time per classification (one embedding -> 1000 logits) and per added class (5 shots, with
   and without 100 background embeddings) for 1000 x 1280: C (gcc -O3, one thread) against numpy
   (``Head.logits``, ``prototype_column``; BLAS pinned to one thread), and the cost of opening
   (validating) the 5 MB head with and without the sha256.
4. Logit differences C vs ``Head.logits`` (max relative) on the synthetic head and, with
   ``--data``, on the real imported MobileNet v1 0.25 head (1001 x 256, no TensorFlow needed
   when ``--bundle`` is given; importing needs the host environment) with embeddings of the
   flowers photos: float32 difference and int8 top-1 agreement with the float head.
5. Fuzz executions run by the mutation fuzzer in ``--fuzz-seconds``: the ASan + UBSan build with
   coverage feedback (gcc ``-fsanitize-coverage=trace-pc``), and the plain -O3 build without it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
C_DIR = ROOT / "device" / "c"
CORPUS = ROOT / "tests" / "device" / "c_corpus"
LIBRARY = ["edgeadapt_head.c", "ea_sha256.c"]
SANITIZE = ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"]


def compile_tools(work: Path, cc: str) -> dict[str, Path]:
    tools = {"plain": work / "ea_head_cli", "sanitized": work / "ea_head_cli_asan"}
    subprocess.run([cc, "-O3", "-o", str(tools["plain"]), "edgeadapt_head_cli.c", *LIBRARY, "-lm"], cwd=C_DIR,
                   check=True)
    covered = [str(work / f"{source}.cov.o") for source in LIBRARY]
    for source, obj in zip(LIBRARY, covered, strict=True):
        subprocess.run([cc, *SANITIZE, "-fsanitize-coverage=trace-pc", "-c", source, "-o", obj], cwd=C_DIR,
                       check=True)
    subprocess.run([cc, *SANITIZE, "-o", str(tools["sanitized"]), "edgeadapt_head_cli.c", *covered, "-lm"],
                   cwd=C_DIR, check=True)
    return tools


def library_size(work: Path, cc: str) -> dict:
    text = 0
    for source in LIBRARY:
        obj = work / f"{source}.Os.o"
        subprocess.run([cc, "-std=c99", "-Os", "-c", source, "-o", str(obj)], cwd=C_DIR, check=True)
        fields = subprocess.run(["size", str(obj)], capture_output=True, text=True, check=True).stdout.split("\n")[1]
        text += int(fields.split()[0])
    lines = {name: (C_DIR / name).read_text(encoding="utf-8").count("\n")
             for name in ["edgeadapt_head.h", *LIBRARY, "edgeadapt_head_cli.c"]}
    return {"text_bytes_Os": text, "library_lines": sum(lines[name] for name in ["edgeadapt_head.h", *LIBRARY]),
            "cli_and_fuzzer_lines": lines["edgeadapt_head_cli.c"], "lines": lines}


def synthetic(classes: int, dim: int, seed: int = 0):
    """A head and embeddings that look like pooled ReLU features of well separated classes."""
    from edgeadapt.device.head import Head

    rng = np.random.default_rng(seed)
    means = np.maximum(rng.normal(0.0, 1.0, size=(classes, dim)), 0).astype(np.float32)
    weights = (means - means.mean(axis=0)).T.astype(np.float32)
    bias = rng.normal(0.0, 0.1, size=classes).astype(np.float32)
    head = Head(weights, bias)
    picks = rng.integers(0, classes, size=300)
    embeddings = np.maximum(means[picks] + rng.normal(0.0, 0.5, size=(300, dim)), 0).astype(np.float32)
    return head, [f"class {index:04d}" for index in range(classes)], embeddings


def run_json(arguments: list) -> dict:
    result = subprocess.run([str(argument) for argument in arguments], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{arguments[0]} failed ({result.returncode}): {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().split("\n")[-1])


def c_logits(cli: Path, work: Path, data: bytes, embeddings: np.ndarray) -> np.ndarray:
    (work / "h.eah").write_bytes(data)
    np.ascontiguousarray(embeddings, dtype="<f4").tofile(work / "e.f32")
    subprocess.run([str(cli), "logits", str(work / "h.eah"), str(work / "e.f32"), str(work / "l.f32")], check=True)
    return np.fromfile(work / "l.f32", dtype="<f4").reshape(len(embeddings), -1)


def relative(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / max(float(np.abs(expected).max()), 1e-30))


def median_seconds(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def synthetic_figures(tools: dict[str, Path], work: Path) -> dict:
    from edgeadapt.device.head_file import head_from_bytes, head_to_bytes
    from edgeadapt.device.prototype_column import append_column, prototype_column

    head, names, embeddings = synthetic(1000, 1280)
    float_bytes, int8_bytes = head_to_bytes(head, names), head_to_bytes(head, names, int8=True)
    figures = {"file_bytes_float32": len(float_bytes), "file_bytes_int8": len(int8_bytes)}
    (work / "big.eah").write_bytes(float_bytes)
    np.ascontiguousarray(embeddings, dtype="<f4").tofile(work / "big.f32")
    for m in (0, 100):
        timing = run_json([tools["plain"], "bench", work / "big.eah", work / "big.f32", 200, 5, m])
        figures[f"c_background_{m}"] = timing
        background = embeddings[5:5 + m] if m else None
        figures[f"numpy_column_seconds_background_{m}"] = median_seconds(
            lambda background=background: prototype_column(head, embeddings[:5], background, 0.01), 5)

        def numpy_add(background=background):
            column, bias = prototype_column(head, embeddings[:5], background, 0.01)
            return head_to_bytes(append_column(head, column, bias), [*names, "bench"])

        figures[f"numpy_add_and_serialise_seconds_background_{m}"] = median_seconds(numpy_add, 3)
    one = embeddings[:1]
    head.logits(one)
    figures["numpy_seconds_per_classification"] = median_seconds(lambda: head.logits(one), 200)
    figures["numpy_seconds_per_open"] = median_seconds(lambda: head_from_bytes(float_bytes), 3)
    expected = head.logits(embeddings)
    figures["logit_max_relative_difference_float32"] = relative(c_logits(tools["plain"], work, float_bytes, embeddings),
                                                                expected)
    int8_logits = c_logits(tools["plain"], work, int8_bytes, embeddings)
    figures["logit_max_relative_difference_int8_vs_dequantised"] = relative(
        int8_logits, head_from_bytes(int8_bytes).head.logits(embeddings))
    figures["int8_top1_agreement_synthetic"] = float(np.mean(int8_logits.argmax(1) == expected.argmax(1)))
    return figures


def mobilenet_bundle(data: Path, work: Path, given: Path | None) -> Path:
    if given is not None:
        return given
    from edgeadapt.bundles.importing import ImportSettings, import_classifier

    folder = data / "imagenet_mobilenet"
    target = work / "mobilenet.eab"
    import_classifier(folder / "mobilenet_v1_0.25_128_quant.tflite", folder / "imagenet_labels.txt", target,
                      ImportSettings(onnx=False, probes=4))
    return target


def real_figures(tools: dict[str, Path], work: Path, data: Path, bundle_path: Path | None) -> dict:
    """The imported MobileNet head on embeddings of the flowers photos (every 5th photo: the test split)."""
    from edgeadapt.device import Bundle, Runtime
    from edgeadapt.device.head_file import head_from_bytes, head_to_bytes
    from edgeadapt.device.prototype_column import prototype_column
    from PIL import Image

    bundle_path = mobilenet_bundle(data, work, bundle_path)
    bundle = Bundle.open(bundle_path)
    head, names = bundle.load_head(), bundle.manifest.class_names
    photos = sorted((data / "flowers").rglob("*.jpg"))[::5]
    with Runtime.open(bundle_path) as runtime:
        embeddings = np.concatenate([runtime.embed([Image.open(path).convert("RGB") for path in photos[start:start + 64]])
                                     for start in range(0, len(photos), 64)]).astype(np.float32)
    expected = head.logits(embeddings)
    float_logits = c_logits(tools["plain"], work, head_to_bytes(head, names), embeddings)
    int8_bytes = head_to_bytes(head, names, int8=True)
    int8_logits = c_logits(tools["plain"], work, int8_bytes, embeddings)
    figures = {
        "bundle": str(bundle_path), "head": f"{head.embedding_size} x {head.num_classes}", "photos": len(photos),
        "logit_max_relative_difference_float32": relative(float_logits, expected),
        "top1_agreement_float32": float(np.mean(float_logits.argmax(1) == expected.argmax(1))),
        "logit_max_relative_difference_int8_vs_dequantised": relative(
            int8_logits, head_from_bytes(int8_bytes).head.logits(embeddings)),
        "int8_top1_agreement_with_float_head": float(np.mean(int8_logits.argmax(1) == expected.argmax(1))),
        "file_bytes_float32": len(head_to_bytes(head, names)), "file_bytes_int8": len(int8_bytes),
    }
    # an added class: 5 daisy photos, 100 other flowers as background, C column vs Python column
    daisy = [index for index, path in enumerate(photos) if path.parent.name == "daisy"]
    others = [index for index, path in enumerate(photos) if path.parent.name != "daisy"][:100]
    (work / "h.eah").write_bytes(head_to_bytes(head, names))
    np.ascontiguousarray(embeddings[daisy[:5]], dtype="<f4").tofile(work / "shots.f32")
    np.ascontiguousarray(embeddings[others], dtype="<f4").tofile(work / "bg.f32")
    subprocess.run([str(tools["plain"]), "column", str(work / "h.eah"), str(work / "shots.f32"), str(work / "c.f32"),
                    str(work / "bg.f32"), "0.01"], check=True)
    result = np.fromfile(work / "c.f32", dtype="<f4")
    column, bias = prototype_column(head, embeddings[daisy[:5]], embeddings[others], 0.01)
    figures["added_class_column_max_relative_difference"] = relative(result[:-1], column)
    figures["added_class_bias_c_python"] = [float(result[-1]), float(bias)]
    return figures


def fuzz_figures(tools: dict[str, Path], work: Path, seconds: float) -> dict:
    crashes = work / "crashes"
    crashes.mkdir(exist_ok=True)
    figures = {}
    for build in ("sanitized", "plain"):
        figures[build] = run_json([tools[build], "fuzz", seconds, 0, 1, crashes, *sorted(CORPUS.glob("*.eah"))])
    figures["crashes"] = sorted(path.name for path in crashes.iterdir())
    return figures


def table(results: dict) -> str:
    size, synthetic_ = results["size"], results["synthetic"]
    c0, c100 = synthetic_["c_background_0"], synthetic_["c_background_100"]
    rows = [
        ("library lines (header + 2 .c)", f"{size['library_lines']}"),
        ("library .text at -Os", f"{size['text_bytes_Os']} bytes"),
        ("head file 1000 x 1280 float32 / int8", (f"{synthetic_['file_bytes_float32']:,} / "
                                                  f"{synthetic_['file_bytes_int8']:,} bytes")),
        ("classification 1000 x 1280, C -O3 / numpy", (f"{c0['seconds_per_classification'] * 1e3:.3f} / "
                                                   f"{synthetic_['numpy_seconds_per_classification'] * 1e3:.3f} ms")),
        ("open + validate 5 MB head, C (sha256 / no sha) / numpy",
         (f"{c0['seconds_per_open'] * 1e3:.1f} / {c0['seconds_per_open_skip_checksum'] * 1e3:.1f} / "
         f"{synthetic_['numpy_seconds_per_open'] * 1e3:.1f} ms")),
        ("added class column, 5 shots, C / numpy", (f"{c0['seconds_per_column'] * 1e3:.3f} / "
                                                    f"{synthetic_['numpy_column_seconds_background_0'] * 1e3:.3f} ms")),
        ("  + 100 background, C / numpy", (f"{c100['seconds_per_column'] * 1e3:.2f} / "
                                          f"{synthetic_['numpy_column_seconds_background_100'] * 1e3:.2f} ms")),
        ("added class incl. new 5 MB file + sha256, C / numpy",
         (f"{c0['seconds_per_added_class'] * 1e3:.1f} / "
         f"{synthetic_['numpy_add_and_serialise_seconds_background_0'] * 1e3:.1f} ms")),
        ("logit max rel. diff C vs Head.logits (synthetic)", f"{synthetic_['logit_max_relative_difference_float32']:.2e}"),
        ("int8: C vs dequantised head / top-1 vs float (synth.)",
         (f"{synthetic_['logit_max_relative_difference_int8_vs_dequantised']:.2e} / "
         f"{synthetic_['int8_top1_agreement_synthetic']:.4f}")),
    ]
    if "real" in results:
        real = results["real"]
        rows += [
            (f"MobileNet head {real['head']}, {real['photos']} flower photos: float32 rel. diff",
             f"{real['logit_max_relative_difference_float32']:.2e} (top-1 {real['top1_agreement_float32']:.4f})"),
            ("  int8 top-1 agreement with the float head", f"{real['int8_top1_agreement_with_float_head']:.4f}"),
            ("  added class (daisy, 5 shots): column rel. diff C vs Python",
             f"{real['added_class_column_max_relative_difference']:.2e}"),
        ]
    fuzz = results["fuzz"]
    rows.append((f"fuzz executions in {results['fuzz_seconds']:.0f} s, ASan+UBSan / plain",
                 (f"{fuzz['sanitized']['executions']:,} / {fuzz['plain']['executions']:,} "
                  f"(opened {fuzz['sanitized']['opened']:,} / {fuzz['plain']['opened']:,}; "
                  f"coverage features {fuzz['sanitized']['coverage_features']:,}; "
                  f"crashes {len(fuzz['crashes'])})")))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--fuzz-seconds", type=float, default=10.0, help="fuzzing budget per build")
    parser.add_argument("--data", type=Path, help="../shared/data: adds the real MobileNet + flowers figures")
    parser.add_argument("--bundle", type=Path, help="an imported MobileNet bundle (skips the import)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON instead of the table")
    parser.add_argument("--json-out", type=Path, metavar="FILE", help="also write the figures as JSON to FILE")
    arguments = parser.parse_args(argv)
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        print("no C compiler (gcc/cc): cannot build the C library", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="bench-c-head-") as folder:
        work = Path(folder)
        tools = compile_tools(work, cc)
        results = {"size": library_size(work, cc), "synthetic": synthetic_figures(tools, work),
                   "fuzz_seconds": arguments.fuzz_seconds}
        if arguments.data is not None:
            results["real"] = real_figures(tools, work, arguments.data, arguments.bundle)
        results["fuzz"] = fuzz_figures(tools, work, arguments.fuzz_seconds)
    print(json.dumps(results, indent=2) if arguments.json else table(results))
    if arguments.json_out:
        arguments.json_out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
