"""The C head library (device/c) built with the system C compiler, against the Python device runtime.

Builds the library and its CLI with gcc (plain, and with -fsanitize=address,undefined), runs
them on the real fixture head (tiny.eab) and real embeddings from the device Runtime, and
compares with Head.logits and prototype_column. Also fuzzes the head parser for a fixed
budget and replays the kept crash corpus (tests/device/c_corpus/). Needs numpy + a C compiler.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from edgeadapt.device import Bundle, Runtime
from edgeadapt.device.errors import BundleError
from edgeadapt.device.head import Head
from edgeadapt.device.head_file import head_from_bytes, head_to_bytes, quantize_columns
from edgeadapt.device.prototype_column import prototype_column

C_DIR = Path(__file__).resolve().parents[2] / "device" / "c"
CORPUS = Path(__file__).parent / "c_corpus"
LIBRARY = ["edgeadapt_head.c", "ea_sha256.c"]
SANITIZE = ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
SANITIZER_ENV = {"ASAN_OPTIONS": "abort_on_error=1:detect_leaks=1",
                 "UBSAN_OPTIONS": "halt_on_error=1:abort_on_error=1:print_stacktrace=1"}
#: fuzzing budget (seconds) of the fast-suite run and of the slow-suite run (CI runs `pytest -m slow`)
FUZZ_SECONDS = float(os.environ.get("EDGEADAPT_FUZZ_SECONDS", "1"))
SLOW_FUZZ_SECONDS = float(os.environ.get("EDGEADAPT_SLOW_FUZZ_SECONDS", "30"))


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")


@dataclass
class Tools:
    cc: str
    plain: Path
    sanitized: Path
    shared: Path
    folder: Path


def _compile(arguments: list[str]) -> None:
    result = subprocess.run(arguments, capture_output=True, text=True, cwd=C_DIR, check=False)
    if result.returncode != 0:
        raise AssertionError(f"compile failed: {' '.join(arguments)}\n{result.stderr}")


@pytest.fixture(scope="session")
def tools(tmp_path_factory) -> Tools:
    cc = compiler()
    if cc is None:
        pytest.skip("no C compiler (gcc or cc) on PATH or in $CC: the C head library cannot be built here")
    folder = tmp_path_factory.mktemp("c_head")
    plain, sanitized, shared = folder / "ea_head_cli", folder / "ea_head_cli_asan", folder / "libedgeadapt_head.so"
    _compile([cc, "-O2", "-o", str(plain), "edgeadapt_head_cli.c", *LIBRARY, "-lm"])
    covered = []  # library objects with coverage callbacks: the fuzzer's feedback
    for source in LIBRARY:
        covered.append(str(folder / f"{source}.cov.o"))
        _compile([cc, *SANITIZE, "-fsanitize-coverage=trace-pc", "-c", source, "-o", covered[-1]])
    _compile([cc, *SANITIZE, "-o", str(sanitized), "edgeadapt_head_cli.c", *covered, "-lm"])
    _compile([cc, "-std=c99", "-O2", "-shared", "-fPIC", "-o", str(shared), *LIBRARY, "-lm"])
    return Tools(cc, plain, sanitized, shared, folder)


def run(binary: Path, *arguments, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([str(binary), *map(str, arguments)], capture_output=True, text=True,
                            env={**os.environ, **SANITIZER_ENV}, timeout=120, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"{binary.name} {' '.join(map(str, arguments))} exited {result.returncode}:\n"
                             f"{result.stderr[-3000:]}")
    return result


def write_rows(path: Path, rows: np.ndarray) -> Path:
    np.ascontiguousarray(rows, dtype="<f4").tofile(path)
    return path


@pytest.fixture(scope="session")
def real(fixture_dir, test_images):
    """The fixture bundle's head, class names and real embeddings of its held-out test images."""
    bundle = Bundle.open(fixture_dir / "tiny.eab")
    images, labels = test_images
    with Runtime.open(fixture_dir / "tiny.eab") as runtime:
        embeddings = runtime.embed(images)
    return bundle.load_head(), bundle.manifest.class_names, embeddings.astype(np.float32), labels


def normalised_variant(head: Head, embeddings: np.ndarray) -> Head:
    """The real weights behind a centring + L2 + temperature normalisation (every C code path)."""
    mean = embeddings.mean(axis=0).astype(np.float32)
    return Head(head.weights * 8.0, head.bias, feature_mean=mean, l2_normalize=True, temperature=0.5)


def c_logits(binary: Path, head_bytes: bytes, embeddings: np.ndarray, folder: Path) -> np.ndarray:
    head_path, rows, out = folder / "h.eah", folder / "e.f32", folder / "l.f32"
    head_path.write_bytes(head_bytes)
    write_rows(rows, embeddings)
    run(binary, "logits", head_path, rows, out)
    return np.fromfile(out, dtype="<f4").reshape(len(embeddings), -1)


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-30))


# ----------------------------------------------------------------------------- the library itself
def test_library_is_warning_free_c99_with_no_malloc_and_no_mutable_globals(tools, tmp_path):
    strict = ["-std=c99", "-pedantic-errors", "-Wall", "-Wextra", "-Wconversion", "-Wshadow", "-Wcast-qual",
              "-Wstrict-prototypes", "-Werror", "-Os", "-c"]
    for source in LIBRARY:
        obj = tmp_path / (source + ".o")
        _compile([tools.cc, *strict, source, "-o", str(obj)])
        symbols = subprocess.run(["nm", str(obj)], capture_output=True, text=True, check=True).stdout.split("\n")
        undefined = {line.split()[-1] for line in symbols if line.strip().startswith("U ")}
        assert not undefined & {"malloc", "calloc", "realloc", "free", "printf", "fprintf", "abort", "exit"}
        writable = [line for line in symbols if len(line.split()) == 3 and line.split()[1] in "DdBbCG"]
        assert writable == [], f"{source} has data/bss symbols: {writable}"


@pytest.mark.parametrize("size", [0, 1, 55, 56, 63, 64, 65, 119, 120, 1000])
def test_sha256_matches_hashlib(tools, tmp_path, size):
    data = bytes(np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8))
    (tmp_path / "blob").write_bytes(data)
    assert run(tools.plain, "sha256", tmp_path / "blob").stdout.strip() == hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------- conformance
@pytest.mark.parametrize("build", ["plain", "sanitized"])
@pytest.mark.parametrize("variant", ["bundle_head", "centred_l2_temperature"])
def test_float_logits_match_head_logits(tools, real, tmp_path, build, variant):
    head, names, embeddings, _ = real
    if variant != "bundle_head":
        head = normalised_variant(head, embeddings)
    logits = c_logits(getattr(tools, build), head_to_bytes(head, names), embeddings, tmp_path)
    expected = head.logits(embeddings)
    assert logits.shape == expected.shape == (len(embeddings), len(names))
    assert relative_error(logits, expected) <= 1e-5
    assert np.array_equal(logits.argmax(1), expected.argmax(1))


@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("dim,classes", [(37, 70), (1, 3), (130, 1)])
def test_odd_sizes_match_head_logits(tools, tmp_path, int8, dim, classes):
    """Sizes off the 8-lane grid (the C tail loops) and beyond Python's 64-column blocks."""
    rng = np.random.default_rng(dim)
    head = Head(rng.normal(size=(dim, classes)).astype(np.float32), rng.normal(size=classes).astype(np.float32),
                feature_mean=rng.normal(size=dim).astype(np.float32), l2_normalize=dim > 1, temperature=1.5)
    rows = rng.normal(size=(50, dim)).astype(np.float32) * 3
    data = head_to_bytes(head, [f"c{index}" for index in range(classes)], int8=int8)
    logits = c_logits(tools.sanitized, data, rows, tmp_path)
    assert relative_error(logits, head_from_bytes(data).head.logits(rows)) <= 1e-5


@pytest.mark.parametrize("int8", [False, True])
def test_double_accumulation_path_matches_head_logits(tools, real, tmp_path, int8):
    """Embeddings so large that float sums could overflow take the double path; it matches too."""
    head, names, embeddings, _ = real
    # double path when ||f|| sqrt(D) bound > FLT_MAX / 4, bound = 2^64 (float32 weights) or 128 (int8)
    bound = 128.0 if int8 else 2.0**64
    factor = np.float32(1e18 if not int8 else 1e35)
    huge, small = embeddings[:20] * factor, embeddings[:20]
    norms = np.linalg.norm(huge.astype(np.float64), axis=1)
    assert np.all(norms * np.sqrt(huge.shape[1]) * bound > np.finfo(np.float32).max / 4)
    data = head_to_bytes(head, names, int8=int8)
    stored = head_from_bytes(data).head
    for rows in (huge, small):
        assert relative_error(c_logits(tools.sanitized, data, rows, tmp_path), stored.logits(rows)) <= 1e-5


@pytest.mark.parametrize("variant", ["bundle_head", "centred_l2_temperature"])
def test_int8_logits_match_the_dequantised_head_and_agree_with_float(tools, real, tmp_path, variant):
    head, names, embeddings, _ = real
    if variant != "bundle_head":
        head = normalised_variant(head, embeddings)
    data = head_to_bytes(head, names, int8=True)
    logits = c_logits(tools.sanitized, data, embeddings, tmp_path)
    assert relative_error(logits, head_from_bytes(data).head.logits(embeddings)) <= 1e-5
    agreement = float(np.mean(logits.argmax(1) == head.logits(embeddings).argmax(1)))
    assert agreement >= 0.99


def test_classify_prints_the_top_classes(tools, real, tmp_path):
    head, names, embeddings, _ = real
    (tmp_path / "h.eah").write_bytes(head_to_bytes(head, names))
    write_rows(tmp_path / "e.f32", embeddings[:10])
    lines = run(tools.sanitized, "classify", tmp_path / "h.eah", tmp_path / "e.f32", 2).stdout.strip().split("\n")
    probabilities = head.probabilities(embeddings[:10])
    for line, row in zip(lines, probabilities):
        first, probability, second, _ = line.split()
        order = np.argsort(-row, kind="stable")
        assert (first, second) == (names[order[0]], names[order[1]])
        assert float(probability) == pytest.approx(float(row[order[0]]), abs=1e-4)


@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("background", [False, True])
def test_added_class_matches_prototype_column(tools, real, tmp_path, int8, background):
    head, names, embeddings, labels = real
    head = normalised_variant(head, embeddings) if background else head
    data = head_to_bytes(head, names, int8=int8)
    stored = head_from_bytes(data).head
    # the new class: five shots of the fixture's last class, added to a head without it
    base = stored.with_columns(stored.weights[:, :-1], stored.bias[:-1])
    base_bytes = head_to_bytes(base, names[:-1], int8=False)
    shots = embeddings[labels == len(names) - 1][:5]
    others = embeddings[labels != len(names) - 1]
    arguments = [write_rows(tmp_path / "bg.f32", others), 0.05] if background else []
    write_rows(tmp_path / "shots.f32", shots)
    (tmp_path / "base.eah").write_bytes(base_bytes)
    run(tools.sanitized, "column", tmp_path / "base.eah", tmp_path / "shots.f32", tmp_path / "col.f32", *arguments)
    result = np.fromfile(tmp_path / "col.f32", dtype="<f4")
    column, bias = prototype_column(base, shots, others if background else None, 0.05)
    assert np.abs(result[:-1] - column).max() <= 1e-5 * np.abs(column).max()
    assert abs(result[-1] - bias) <= 1e-5 * max(1.0, abs(bias))
    # the whole file: old bytes kept, new class appended, old logits bit-identical in C
    (tmp_path / "base.eah").write_bytes(head_to_bytes(base, names[:-1], int8=int8))
    run(tools.sanitized, "add", tmp_path / "base.eah", tmp_path / "shots.f32", "new class", tmp_path / "new.eah",
        *arguments)
    added = head_from_bytes((tmp_path / "new.eah").read_bytes())
    assert added.class_names == names[:-1] + ["new class"] and added.is_int8 == int8
    old = head_from_bytes((tmp_path / "base.eah").read_bytes()).head
    assert np.array_equal(added.head.weights[:, :-1], old.weights) and np.array_equal(added.head.bias[:-1], old.bias)
    if int8:
        q, scale = quantize_columns(column[:, None])
        assert np.abs(added.int8_weights[-1].astype(int) - q[0]).max() <= 1
        assert added.int8_scales[-1] == pytest.approx(float(scale[0]), rel=1e-5)
    else:
        assert np.abs(added.head.weights[:, -1] - column).max() <= 1e-5 * np.abs(column).max()
    before = c_logits(tools.plain, (tmp_path / "base.eah").read_bytes(), embeddings, tmp_path)
    after = c_logits(tools.plain, (tmp_path / "new.eah").read_bytes(), embeddings, tmp_path)
    assert np.array_equal(after[:, :-1], before)
    if background and not int8:
        claimed = np.mean(after[:, -1] > after[:, :-1].max(axis=1), where=(labels != len(names) - 1))
        assert claimed <= 0.05 + 1.0 / len(others)
        assert np.mean(after[labels == len(names) - 1].argmax(1) == len(names) - 1) >= 0.5


def test_add_to_an_empty_head_and_serialise(tools, real, tmp_path):
    _, _, embeddings, labels = real
    empty = Head(np.zeros((embeddings.shape[1], 0), np.float32), np.zeros(0, np.float32), l2_normalize=True)
    (tmp_path / "empty.eah").write_bytes(head_to_bytes(empty, []))
    for label in range(3):
        write_rows(tmp_path / "shots.f32", embeddings[labels == label][:3])
        source = tmp_path / ("empty.eah" if label == 0 else f"h{label - 1}.eah")
        run(tools.sanitized, "add", source, tmp_path / "shots.f32", f"c{label}", tmp_path / f"h{label}.eah",
            write_rows(tmp_path / "bg.f32", embeddings[:20]), 0.1)
    grown = head_from_bytes((tmp_path / "h2.eah").read_bytes())
    assert grown.class_names == ["c0", "c1", "c2"]
    assert np.linalg.norm(grown.head.weights[:, 0].astype(np.float64)) == pytest.approx(16.0, rel=1e-5)
    assert grown.head.bias[0] == 0.0
    run(tools.sanitized, "serialize", tmp_path / "h2.eah", tmp_path / "copy.eah")
    assert (tmp_path / "copy.eah").read_bytes() == (tmp_path / "h2.eah").read_bytes()


def test_library_errors_are_typed_and_leave_no_output(tools, real, tmp_path):
    head, names, embeddings, _ = real
    data = head_to_bytes(head, names)
    (tmp_path / "h.eah").write_bytes(data)
    (tmp_path / "bad.eah").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    result = run(tools.sanitized, "info", tmp_path / "bad.eah", check=False)
    assert result.returncode == 1 and "sha256 checksum mismatch" in result.stderr
    write_rows(tmp_path / "short.f32", embeddings[:2, :-1])
    write_rows(tmp_path / "nan.f32", np.full((1, embeddings.shape[1]), np.nan, np.float32))
    write_rows(tmp_path / "zero.f32", np.zeros((2, embeddings.shape[1]), np.float32))
    result = run(tools.sanitized, "logits", tmp_path / "h.eah", tmp_path / "nan.f32", tmp_path / "out.f32", check=False)
    assert result.returncode == 1 and "NaN or inf" in result.stderr and not (tmp_path / "out.f32").exists()
    result = run(tools.sanitized, "add", tmp_path / "h.eah", tmp_path / "zero.f32", "z", tmp_path / "z.eah",
                 check=False)
    assert result.returncode == 1 and "no direction" in result.stderr and not (tmp_path / "z.eah").exists()
    result = run(tools.sanitized, "add", tmp_path / "h.eah", tmp_path / "nan.f32", names[0], tmp_path / "z.eah",
                 check=False)
    assert result.returncode == 1 and "out of range" in result.stderr  # the class exists already
    # a library error exits 1 (as the edgeadapt CLIs do for domain errors), a usage error 2
    assert run(tools.plain, "logits", tmp_path / "h.eah", check=False).returncode == 2
    assert run(tools.plain, "no-such-command", check=False).returncode == 2


# ----------------------------------------------------------------------------- one format, two readers
class _Head(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("size", ctypes.c_size_t), ("dim", ctypes.c_uint32),
                ("classes", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("temperature", ctypes.c_float),
                ("names_bytes", ctypes.c_uint32)] + [(name, ctypes.c_size_t) for name in
                                                      ("mean", "weights", "scales", "bias", "offsets", "names")]


def test_python_and_c_readers_agree_on_mutated_files(tools, real):
    """Whatever C refuses, Python refuses (Python also checks UTF-8, duplicates and exact length)."""
    library = ctypes.CDLL(str(tools.shared))
    library.ea_head_open.argtypes = [ctypes.POINTER(_Head), ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint32]
    head, names, embeddings, _ = real
    rng = np.random.default_rng(0)
    seeds = [head_to_bytes(head, names), head_to_bytes(normalised_variant(head, embeddings), names, int8=True)]
    outcomes = {"both accept": 0, "both refuse": 0}
    for trial in range(1500):
        data = bytearray(seeds[trial % 2])
        for _ in range(int(rng.integers(1, 4))):
            position = int(rng.integers(0, 64 if rng.random() < 0.5 else len(data)))
            data[position] = int(rng.integers(0, 256))
        if rng.random() < 0.8:
            data[-32:] = hashlib.sha256(bytes(data[:-32])).digest()
        opened = library.ea_head_open(ctypes.byref(_Head()), bytes(data), len(data), 0) == 0
        try:
            head_from_bytes(bytes(data))
            python_accepts = True
        except BundleError:
            python_accepts = False
        assert opened or not python_accepts, f"trial {trial}: Python accepts a file that C refuses"
        key = "both accept" if opened and python_accepts else "c only" if opened else "both refuse"
        outcomes[key] = outcomes.get(key, 0) + 1
    assert outcomes["both accept"] > 50 and outcomes["both refuse"] > 50


# ----------------------------------------------------------------------------- fuzzing
def fuzz(tools, real, tmp_path, seconds: float, seed: int) -> dict:
    """Run the coverage-guided fuzzer (sanitized build) for ``seconds``; fail with the saved input on a crash."""
    head, names, _, _ = real
    (tmp_path / "real.eah").write_bytes(head_to_bytes(head, names))
    seeds = sorted(CORPUS.glob("*.eah")) + [tmp_path / "real.eah"]
    crashes = tmp_path / "crashes"
    crashes.mkdir()
    result = run(tools.sanitized, "fuzz", seconds, 0, seed, crashes, *seeds, check=False)
    kept = list(crashes.iterdir())
    assert result.returncode == 0 and not kept, (
        f"the fuzzer crashed (exit {result.returncode}); input saved as {kept}: copy it into "
        f"tests/device/c_corpus/ as a regression case and fix the library\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().split("\n")[-1])


def test_fuzz_head_parser_for_a_fixed_budget(tools, real, tmp_path):
    report = fuzz(tools, real, tmp_path, FUZZ_SECONDS, 20261201)
    assert report["executions"] > 1000 and report["opened"] > 0 and report["added_class"] > 0
    assert report["coverage_features"] > 100 and report["pool"] > 0  # coverage feedback is working


@pytest.mark.slow
def test_fuzz_head_parser_for_the_ci_budget(tools, real, tmp_path):
    report = fuzz(tools, real, tmp_path, SLOW_FUZZ_SECONDS, 20261202)
    assert report["executions"] > 1000 * SLOW_FUZZ_SECONDS and report["added_class"] > 0


def test_crash_corpus_replays_clean(tools):
    corpus = sorted(CORPUS.glob("*.eah"))
    assert any(path.name.startswith("crash_") for path in corpus) and any(path.name.startswith("seed_")
                                                                          for path in corpus)
    result = run(tools.sanitized, "check", *corpus)
    assert f"checked {len(corpus)} file(s)" in result.stdout
    # the int8 scale crashes are refused by both readers now; the float-path one is a valid head
    for name in ("crash_int8_scale_overflow.eah", "crash_int8_minus128_overflow.eah"):
        refused = run(tools.sanitized, "info", CORPUS / name, check=False)
        assert refused.returncode == 1 and "int8 scale" in refused.stderr
        with pytest.raises(BundleError):
            head_from_bytes((CORPUS / name).read_bytes())
    assert head_from_bytes((CORPUS / "crash_float_path_changed_old_logit.eah").read_bytes()).head.num_classes == 5


# ----------------------------------------------------------------------------- the example
def test_example_builds_and_adds_a_class(tools, real, tmp_path):
    head, names, embeddings, labels = real
    example = Path(__file__).resolve().parents[2] / "examples" / "c"
    binary = tmp_path / "classify_and_add"
    _compile([tools.cc, "-std=c99", "-O2", "-Wall", "-Werror", *SANITIZE, f"-I{C_DIR}", "-o", str(binary),
              str(example / "classify_and_add.c"), *LIBRARY, "-lm"])
    (tmp_path / "head.eah").write_bytes(head_to_bytes(head, names))
    query = embeddings[labels == 0][:1]
    result = run(binary, tmp_path / "head.eah", write_rows(tmp_path / "q.f32", query),
                 write_rows(tmp_path / "shots.f32", embeddings[labels == 4][:8]), "new ring", tmp_path / "new.eah",
                 write_rows(tmp_path / "bg.f32", embeddings[labels != 4]))
    lines = result.stdout.split("\n")
    assert lines[2].split()[1] == names[int(head.logits(query).argmax())]
    added = head_from_bytes((tmp_path / "new.eah").read_bytes())
    assert added.class_names == [*names, "new ring"]
    assert "6 classes" in result.stdout


# ----------------------------------------------------------------------------- API argument checks
EA = {name: code for code, name in enumerate(
    ["OK", "NULL", "TRUNCATED", "MAGIC", "VERSION", "HEADER", "LIMIT", "SIZE", "CHECKSUM", "NON_FINITE", "NAMES",
     "DIM", "BUFFER", "ARGUMENT", "INPUT", "RANGE", "DEGENERATE"])}


def test_api_checks_every_argument(tools, real):
    library = ctypes.CDLL(str(tools.shared))
    library.ea_strerror.restype = ctypes.c_char_p
    floats = ctypes.POINTER(ctypes.c_float)
    head, names, embeddings, _ = real
    data = head_to_bytes(head, names)
    handle = _Head()
    assert library.ea_head_open(None, data, len(data), 0) == EA["NULL"]
    assert library.ea_head_open(ctypes.byref(handle), data, len(data) - 1, 0) == EA["TRUNCATED"]
    flash = data + b"spare flash"  # kept alive: the head points into it
    assert library.ea_head_open(ctypes.byref(handle), flash, len(flash), 0) == EA["OK"] and handle.size == len(data)
    dim, classes = head.embedding_size, head.num_classes

    def array(values, kind=ctypes.c_float):
        values = list(values)
        return (kind * max(len(values), 1))(*values)

    embedding, scratch, logits = array(embeddings[0]), array([0.0] * dim), array([0.0] * classes)
    call = library.ea_logits
    call.argtypes = [ctypes.POINTER(_Head), floats, ctypes.c_size_t, floats, ctypes.c_size_t, floats, ctypes.c_size_t]
    assert call(ctypes.byref(handle), embedding, dim, scratch, dim, logits, classes) == EA["OK"]
    np.testing.assert_allclose(np.array(logits[:classes]), head.logits(embeddings[:1])[0], rtol=1e-5, atol=1e-6)
    assert call(ctypes.byref(handle), embedding, dim - 1, scratch, dim, logits, classes) == EA["DIM"]
    assert call(ctypes.byref(handle), embedding, dim, scratch, dim - 1, logits, classes) == EA["BUFFER"]
    assert call(ctypes.byref(handle), embedding, dim, scratch, dim, logits, classes - 1) == EA["BUFFER"]
    assert call(ctypes.byref(handle), None, dim, scratch, dim, logits, classes) == EA["NULL"]
    embedding[3] = float("nan")
    assert call(ctypes.byref(handle), embedding, dim, scratch, dim, logits, classes) == EA["INPUT"]

    scores = array([1.0, 3.0, 3.0, -2.0])
    indices, values = array([0] * 4, ctypes.c_uint32), array([0.0] * 4)
    assert library.ea_top_k(scores, 4, 3, indices, values) == EA["OK"] and list(indices[:3]) == [1, 2, 0]
    assert library.ea_top_k(scores, 4, 0, indices, values) == EA["ARGUMENT"]
    assert library.ea_top_k(scores, 4, 5, indices, values) == EA["ARGUMENT"]
    probabilities = array([0.0] * 4)
    assert library.ea_softmax(scores, 4, probabilities) == EA["OK"]
    np.testing.assert_allclose(np.array(probabilities[:4]), np.exp([1, 3, 3, -2]) / np.exp([1, 3, 3, -2]).sum(),
                               rtol=1e-6)
    assert library.ea_softmax(scores, 0, probabilities) == EA["ARGUMENT"]
    assert library.ea_softmax(array([1.0, float("inf")]), 2, probabilities) == EA["INPUT"]

    library.ea_add_class_size.restype = library.ea_add_class_workspace_size.restype = ctypes.c_size_t
    size = library.ea_add_class_size(ctypes.byref(handle), ctypes.c_size_t(3))
    work_size = library.ea_add_class_workspace_size(ctypes.byref(handle), ctypes.c_size_t(0))
    assert size == len(data) + 4 * dim + 4 + 4 + 3 and work_size >= 16 * dim
    add = library.ea_add_class
    add.argtypes = [ctypes.POINTER(_Head), floats, ctypes.c_size_t, ctypes.c_size_t, floats, ctypes.c_size_t,
                    ctypes.c_double, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
                    ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_size_t)]
    shots = array(embeddings[:3].reshape(-1))
    work, out, written = ctypes.create_string_buffer(work_size), ctypes.create_string_buffer(size), ctypes.c_size_t()

    def add_class(name: bytes, out_size=size, work_bytes=work_size, n=3):
        return add(ctypes.byref(handle), shots, n, dim, None, 0, 0.0, name, len(name), work, work_bytes, out,
                   out_size, ctypes.byref(written))

    assert add_class(b"new", out_size=size - 1) == EA["BUFFER"] and written.value == 0
    assert add_class(b"new", work_bytes=work_size - 1) == EA["BUFFER"]
    assert add_class(b"new", n=0) == EA["ARGUMENT"]
    assert add_class(b"a\tb") == EA["ARGUMENT"]  # a control byte
    assert add_class(names[0].encode()) == EA["ARGUMENT"]  # the class exists already
    assert add_class(b"") == EA["ARGUMENT"]
    assert add_class(b"new") == EA["OK"] and written.value == size
    added = head_from_bytes(out.raw[:size])
    assert added.class_names == [*names, "new"]

    messages = [library.ea_strerror(code).decode() for code in range(len(EA))]
    assert len(set(messages)) == len(EA) and all(messages)
    assert library.ea_strerror(len(EA) + 5).decode() == "unknown edgeadapt status code"
