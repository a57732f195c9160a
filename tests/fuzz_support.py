"""Shared machinery of the fuzzing suite (tests/device/test_fuzz_*.py) and benchmarks/bench_hardening.py.

A *case* takes one hypothesis-drawn mutation, builds the hostile input (a manifest, a
``.npy`` file, a packed bundle, a delta, a symlink), runs the reader or the updater on it,
and records the outcome: a correct open or an ``EdgeAdaptError`` subclass. Anything else
(another exception, a write outside the bundle, more than :data:`MEMORY_LIMIT` bytes of
peak memory) fails the case.

``EDGEADAPT_FUZZ_BUDGET`` sets the number of examples per fuzz test (default
:data:`DEFAULT_BUDGET`, small, so the README's test command stays fast; CI runs every
environment with 40); the seed is fixed (``derandomize``).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import json
import os
import shutil
import struct
import tempfile
import tracemalloc
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from edgeadapt.device.bundle import Bundle, npy_bytes
from edgeadapt.device.errors import EdgeAdaptError

#: Examples per fuzz test (times its share) of a local run; CI sets EDGEADAPT_FUZZ_BUDGET=40.
DEFAULT_BUDGET = 20
#: Largest peak of traced allocations (Python + numpy) one case may reach.
MEMORY_LIMIT = 16 << 20


def budget(default: int = DEFAULT_BUDGET) -> int:
    """Examples per fuzz test: ``EDGEADAPT_FUZZ_BUDGET`` or ``default``."""
    value = os.environ.get("EDGEADAPT_FUZZ_BUDGET")
    return max(1, int(value)) if value else default


def fuzz_settings(default: int = DEFAULT_BUDGET, share: float = 1.0) -> settings:
    """Fixed seed, no example database, no deadline, the configured budget (times ``share``)."""
    return settings(max_examples=max(1, int(budget(default) * share)), derandomize=True, database=None, deadline=None,
                    suppress_health_check=list(HealthCheck), print_blob=False)


# ----------------------------------------------------------------------------- outcomes
@dataclass
class Outcomes:
    """Outcome counts by kind, and the worst peak memory of a case."""

    counts: collections.Counter = field(default_factory=collections.Counter)
    peak_bytes: int = 0
    peak_case: str = ""

    def total(self) -> int:
        return sum(self.counts.values())


OUTCOMES = Outcomes()


class FuzzFailure(AssertionError):
    """A case ended in something other than a correct open or an EdgeAdaptError."""


def trace_every() -> int:
    """Trace the memory of every N-th case (``EDGEADAPT_FUZZ_TRACE_EVERY``, default 1: all of them;
    long runs trace a sample because tracemalloc slows every allocation down)."""
    return max(1, int(os.environ.get("EDGEADAPT_FUZZ_TRACE_EVERY", "1")))


_CASE_NUMBER = [0]


@contextlib.contextmanager
def traced(kind: str):
    """Measure the peak traced memory of one case (tracemalloc) and fail above :data:`MEMORY_LIMIT`."""
    _CASE_NUMBER[0] += 1
    if _CASE_NUMBER[0] % trace_every():
        yield
        return
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    try:
        yield
    finally:  # checked whatever the outcome: a refusal after a huge allocation fails too
        peak = tracemalloc.get_traced_memory()[1] - base
        if started:
            tracemalloc.stop()
        if peak > OUTCOMES.peak_bytes:
            OUTCOMES.peak_bytes, OUTCOMES.peak_case = peak, kind
        if peak > MEMORY_LIMIT:
            raise FuzzFailure(f"{kind}: a case reached {peak / 2**20:.1f} MiB of memory (limit "
                              f"{MEMORY_LIMIT / 2**20:.0f})")


def run_case(kind: str, action: Callable[[], Any], check: Callable[[Any], None] | None = None) -> str:
    """Run ``action``; record and return the outcome ("opened" or the error class name).

    ``check`` validates a successful result (a correct open). Any non-EdgeAdaptError
    exception raises :class:`FuzzFailure` with the original attached.
    """
    try:
        with traced(kind):
            result = action()
            if check is not None:
                check(result)
    except EdgeAdaptError as error:
        outcome = type(error).__name__
        if not str(error).strip():
            raise FuzzFailure(f"{kind}: {outcome} without a message") from error
    except FuzzFailure:
        raise
    except BaseException as error:  # noqa: BLE001 - the point of the suite: nothing else may escape
        OUTCOMES.counts[(kind, f"non-typed {type(error).__name__}")] += 1
        raise FuzzFailure(f"{kind}: raw {type(error).__name__}: {error}") from error
    else:
        outcome = "opened"
    OUTCOMES.counts[(kind, outcome)] += 1
    return outcome


# ----------------------------------------------------------------------------- the sentinel
class Sentinel:
    """A folder outside every bundle; any change to it (or new entries next to it) is a write outside."""

    def __init__(self, root: Path):
        self.root = root
        self.folder = root / "outside"
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "secret.txt").write_bytes(b"do not touch\n" * 8)
        (self.folder / "victim.bin").write_bytes(os.urandom(64))
        self.state = self.snapshot()

    def snapshot(self) -> dict[str, str]:
        files = {}
        for path in sorted(self.folder.rglob("*")):
            files[str(path.relative_to(self.folder))] = (
                hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() and not path.is_symlink() else "entry")
        return files

    def check(self, kind: str) -> None:
        now = self.snapshot()
        if now != self.state:
            raise FuzzFailure(f"{kind}: something was written outside the bundle: {sorted(set(now) ^ set(self.state))} "
                              f"or changed content")


def scratch_tempdir(root: Path) -> Path:
    """Point ``tempfile`` at a private folder so leftovers of packed opens can be counted."""
    folder = root / "tmp"
    folder.mkdir(parents=True, exist_ok=True)
    tempfile.tempdir = str(folder)
    return folder


def check_no_leftovers(folder: Path, kind: str) -> None:
    left = [entry.name for entry in folder.iterdir()]
    if left:
        for entry in folder.iterdir():
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        raise FuzzFailure(f"{kind}: temporary copies left behind: {left}")


# ----------------------------------------------------------------------------- correct opens
def open_fully(path: Path, verify: bool = True) -> dict:
    """Open a bundle and load everything a device uses; close it again. Returns what was loaded."""
    from edgeadapt.device.unknown import load_unknown

    with Bundle.open(path, verify=verify) as bundle:
        head = bundle.load_head()
        stats = bundle.load_class_stats()
        references = bundle.load_reference_embeddings()
        load_unknown(bundle)
        return {"manifest": bundle.manifest, "head": head, "stats": stats, "references": references}


def check_open(result: dict) -> None:
    """A successful open must be self-consistent: shapes match the manifest, values are finite."""
    manifest, head = result["manifest"], result["head"]
    if head.weights.shape != (manifest.embedding_size, len(manifest.class_names)):
        raise FuzzFailure(f"opened a head of shape {head.weights.shape} for a manifest of "
                          f"{manifest.embedding_size} x {len(manifest.class_names)}")
    if not (np.isfinite(head.weights).all() and np.isfinite(head.bias).all()):
        raise FuzzFailure("opened a head with non-finite values")
    if not isinstance(head.l2_normalize, bool) or not head.temperature > 0:
        raise FuzzFailure(f"opened a head with l2_normalize={head.l2_normalize!r} temperature={head.temperature!r}")
    stats = result["stats"]
    if stats is not None and (stats.sums.shape != (head.num_classes, head.embedding_size)):
        raise FuzzFailure(f"opened statistics of shape {stats.sums.shape}")
    references = result["references"]
    if references is not None and references.labels.size and references.labels.max() >= head.num_classes:
        raise FuzzFailure("opened references with labels beyond the class count")


# ----------------------------------------------------------------------------- JSON mutations
json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12),
    st.sampled_from([0, -1, 1, 2**31, 10**6, 10**12, 1e308, "false", "true", "hot", "", "../../x", "/etc/passwd",
                     "heads/v1/weights.npy", "\ud800", "a" * 300]),
)
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)), max_leaves=8)


def json_paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path (tuple of keys/indices) into a JSON value."""
    paths = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            paths.extend(json_paths(item, prefix + (key,)))
    elif isinstance(value, list):
        for index, item in enumerate(value[:6]):
            paths.extend(json_paths(item, prefix + (index,)))
    return paths


def _set(document: Any, path: tuple, value: Any, delete: bool = False) -> Any:
    if not path:
        return value
    parent = document
    for key in path[:-1]:
        parent = parent[key]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return document


@st.composite
def json_mutation(draw, paths: list[tuple]) -> dict:
    """One mutation of a JSON document: set/delete a value, nest deeply, or damage the bytes."""
    kind = draw(st.sampled_from(["set", "set", "set", "delete", "nest", "truncate", "flip", "non_utf8",
                                 "duplicate_key", "big_number"]))
    mutation = {"kind": kind, "path": draw(st.sampled_from(paths))}
    if kind == "set":
        mutation["value"] = draw(json_values)
    elif kind == "nest":
        mutation["depth"] = draw(st.sampled_from([30, 100, 1000, 100_000]))
    elif kind in ("truncate", "flip", "non_utf8"):
        mutation["position"] = draw(st.floats(min_value=0, max_value=1))
        mutation["byte"] = draw(st.integers(min_value=0, max_value=255))
        mutation["count"] = draw(st.integers(min_value=1, max_value=4))
    elif kind == "big_number":
        mutation["value"] = draw(st.sampled_from([10**6, 10**9, 2**40, 2**63, -(2**63), 10**100]))
    return mutation


def apply_json_mutation(document: Any, mutation: dict) -> bytes:
    """The bytes of ``document`` (deep-copied) after ``mutation``."""
    document = json.loads(json.dumps(document))
    path = mutation["path"]
    kind = mutation["kind"]
    if kind in ("set", "big_number"):
        document = _set(document, path, mutation["value"])
    elif kind == "delete" and path:
        document = _set(document, path, None, delete=True)
    elif kind == "nest":
        depth = mutation["depth"]
        text = json.dumps(document)
        marker = '"__nest__"'
        document = _set(document, path, "__nest__") if path else document
        text = json.dumps(document)
        if marker in text:
            return text.replace(marker, "[" * depth + "1" + "]" * depth, 1).encode()
        return ("[" * depth + text + "]" * depth).encode()
    raw = bytearray(json.dumps(document, indent=1, ensure_ascii=False).encode("utf-8", "surrogatepass"))
    if not raw:
        return bytes(raw)
    position = int(mutation.get("position", 0) * (len(raw) - 1))
    if kind == "truncate":
        return bytes(raw[:position])
    if kind == "flip":
        for offset in range(mutation["count"]):
            raw[(position + offset * 97) % len(raw)] ^= mutation["byte"] or 0xFF
    elif kind == "non_utf8":
        raw[position:position] = bytes([0x80 | (mutation["byte"] & 0x7F)]) * mutation["count"]
    elif kind == "duplicate_key":
        text = raw.decode("utf-8", "surrogatepass")
        return text.replace("{", '{"files": {}, ', 1).encode("utf-8", "surrogatepass")
    return bytes(raw)


# ----------------------------------------------------------------------------- .npy mutations
NPY_DESCRS = ["<f4", "<f8", "<f2", ">f4", "<i8", "|u1", "|b1", "<c8", "|V8", "|O", "<U4", "|S3", "<M8[s]", "<f16",
              "[('a', '<f4')]", "[('a', '<f4', (2,))]", "('<f4', (2,))", "'<f4'", "None", "<q"]


@st.composite
def npy_mutation(draw) -> dict:
    """A mutation of one ``.npy`` file: header fields, header bytes, data length or values."""
    kind = draw(st.sampled_from(["descr", "shape", "fortran", "header_flip", "truncate", "extend", "nan", "version",
                                 "raw_header"]))
    mutation: dict = {"kind": kind}
    if kind == "descr":
        mutation["descr"] = draw(st.sampled_from(NPY_DESCRS))
    elif kind == "shape":
        mutation["shape"] = draw(st.one_of(
            st.sampled_from(["(64, 1000000000000)", "(-1,)", "()", "(2**70,)", "(1.5, 2)", "((1,),)", "'x'",
                             "(0, 0)", "(1, 1, 1, 1, 1)", "(9223372036854775807, 2)"]),
            st.lists(st.integers(min_value=0, max_value=2**40), max_size=4).map(lambda dims: repr(tuple(dims)))))
    elif kind == "fortran":
        mutation["value"] = draw(st.sampled_from(["True", "1", "'yes'", "None"]))
    elif kind in ("header_flip", "truncate", "extend"):
        mutation["position"] = draw(st.floats(min_value=0, max_value=1))
        mutation["byte"] = draw(st.integers(min_value=1, max_value=255))
        mutation["count"] = draw(st.integers(min_value=1, max_value=64))
    elif kind == "nan":
        mutation["value"] = draw(st.sampled_from([float("nan"), float("inf"), -float("inf")]))
        mutation["position"] = draw(st.floats(min_value=0, max_value=1))
    elif kind == "version":
        mutation["version"] = draw(st.sampled_from([b"\x00\x00", b"\x03\x00", b"\x09\x09", b"\x02\x00"]))
    elif kind == "raw_header":
        mutation["header"] = draw(st.sampled_from([
            "{}", "{'descr': '<f4'}", "[1, 2]", "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), 'x': 1}",
            "__import__('os').system('touch /tmp/pwned')", "{'descr': '<f4', 'fortran_order': False, 'shape': (2,)",
            "x" * 5000]))
    return mutation


def _npy_with_header(header: str, data: bytes, version: tuple[int, int] = (1, 0)) -> bytes:
    text = header.encode("latin1", "replace")
    pad = (64 - (10 + len(text) + 1) % 64) % 64
    text = text + b" " * pad + b"\n"
    length = struct.pack("<H", len(text)) if version == (1, 0) else struct.pack("<I", len(text))
    return b"\x93NUMPY" + bytes(version) + length + text + data


def apply_npy_mutation(original: bytes, mutation: dict) -> bytes:
    """``original`` (a valid .npy file) after ``mutation``."""
    array = np.load(io.BytesIO(original), allow_pickle=False)
    data = np.ascontiguousarray(array).tobytes()
    descr = np.lib.format.dtype_to_descr(array.dtype)
    header = {"descr": repr(descr), "fortran_order": "False", "shape": repr(array.shape)}
    kind = mutation["kind"]

    def build() -> bytes:
        text = "{" + ", ".join(f"'{key}': {value}" for key, value in header.items()) + ", }"
        return _npy_with_header(text, data)

    if kind == "descr":
        header["descr"] = mutation["descr"] if mutation["descr"].startswith(("[", "(", "'", "N")) \
            else repr(mutation["descr"])
        return build()
    if kind == "shape":
        header["shape"] = mutation["shape"]
        return build()
    if kind == "fortran":
        header["fortran_order"] = mutation["value"]
        return build()
    if kind == "raw_header":
        return _npy_with_header(mutation["header"], data)
    if kind == "version":
        raw = bytearray(original)
        raw[6:8] = mutation["version"]
        return bytes(raw)
    if kind == "nan":
        if array.dtype.kind != "f" or not array.size:
            return original
        changed = array.copy().reshape(-1)
        changed[int(mutation["position"] * (changed.size - 1))] = mutation["value"]
        return npy_bytes(changed.reshape(array.shape))
    raw = bytearray(original)
    position = int(mutation["position"] * (len(raw) - 1))
    if kind == "header_flip":
        position = int(mutation["position"] * min(len(raw) - 1, 127))
        raw[position] ^= mutation["byte"]
        return bytes(raw)
    if kind == "truncate":
        return bytes(raw[:position])
    return bytes(raw) + bytes([mutation["byte"]]) * mutation["count"]


# ----------------------------------------------------------------------------- zip mutations
def zip_with(members: list[tuple[zipfile.ZipInfo | str, bytes]], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as archive:
        for info, data in members:
            archive.writestr(info, data)
    return buffer.getvalue()


def read_members(packed: bytes) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(packed)) as archive:
        return [(info.filename, archive.read(info)) for info in archive.infolist()]


@st.composite
def zip_mutation(draw, names: list[str]) -> dict:
    """A mutation of a zip container (packed bundle or delta)."""
    kind = draw(st.sampled_from(["flip", "truncate", "crc", "encrypted", "method", "long_name", "size_lie",
                                 "unlisted_bomb", "duplicate", "symlink", "bad_name", "drop", "extra_bytes"]))
    mutation: dict = {"kind": kind, "member": draw(st.sampled_from(names))}
    if kind in ("flip", "truncate", "extra_bytes"):
        mutation["position"] = draw(st.floats(min_value=0, max_value=1))
        mutation["byte"] = draw(st.integers(min_value=1, max_value=255))
        mutation["count"] = draw(st.integers(min_value=1, max_value=8))
    elif kind == "method":
        mutation["method"] = draw(st.sampled_from([1, 6, 9, 12, 14, 93, 98, 99, 0xFFFF]))
    elif kind == "long_name":
        mutation["length"] = draw(st.sampled_from([256, 1025, 4000, 65000]))
    elif kind == "size_lie":
        mutation["where"] = draw(st.sampled_from(["central", "local", "both"]))
        mutation["size"] = draw(st.sampled_from([0, 1, 2**31, 2**32 - 1, 1 << 30]))
    elif kind == "unlisted_bomb":
        mutation["size"] = draw(st.sampled_from([1 << 20, 8 << 20, 40 << 20]))
        mutation["name"] = draw(st.sampled_from(["bomb.bin", "heads/v1/zeros.npy", ".hidden", "versions/v9.json"]))
    elif kind == "bad_name":
        mutation["name"] = draw(st.sampled_from(["../escape.npy", "/abs.npy", "a\\b.npy", "heads//x.npy", "./m",
                                                 "C:x.npy", "heads/v1/\x00.npy", ""]))
    return mutation


def _patch_headers(raw: bytearray, member: str, patch: Callable[[bytearray, int, bool], None]) -> None:
    """Apply ``patch(raw, offset, central)`` to the local and central headers of ``member``."""
    name = member.encode("utf-8")
    offset = 0
    while True:
        offset = raw.find(b"PK\x01\x02", offset)
        if offset < 0:
            break
        length = struct.unpack_from("<H", raw, offset + 28)[0]
        if raw[offset + 46: offset + 46 + length] == name:
            patch(raw, offset, True)
            local = struct.unpack_from("<I", raw, offset + 42)[0]
            if raw[local: local + 4] == b"PK\x03\x04":
                patch(raw, local, False)
        offset += 4


def apply_zip_mutation(packed: bytes, mutation: dict) -> bytes:
    """``packed`` (a valid zip) after ``mutation``."""
    kind, member = mutation["kind"], mutation["member"]
    raw = bytearray(packed)
    if kind == "flip":
        position = int(mutation["position"] * (len(raw) - 1))
        for offset in range(mutation["count"]):
            raw[(position + offset * 131) % len(raw)] ^= mutation["byte"]
        return bytes(raw)
    if kind == "truncate":
        return bytes(raw[: int(mutation["position"] * (len(raw) - 1))])
    if kind == "extra_bytes":
        position = int(mutation["position"] * (len(raw) - 1))
        return bytes(raw[:position] + bytes([mutation["byte"]]) * mutation["count"] + raw[position:])
    if kind == "crc":
        _patch_headers(raw, member, lambda data, at, central: struct.pack_into(
            "<I", data, at + (16 if central else 14), struct.unpack_from("<I", data, at + (16 if central else 14))[0] ^ 1))
        return bytes(raw)
    if kind == "encrypted":
        _patch_headers(raw, member, lambda data, at, central: struct.pack_into(
            "<H", data, at + (8 if central else 6), struct.unpack_from("<H", data, at + (8 if central else 6))[0] | 1))
        return bytes(raw)
    if kind == "method":
        _patch_headers(raw, member, lambda data, at, central: struct.pack_into(
            "<H", data, at + (10 if central else 8), mutation["method"]))
        return bytes(raw)
    if kind == "size_lie":
        where = mutation["where"]

        def patch(data: bytearray, at: int, central: bool) -> None:
            if where == "both" or (where == "central") == central:
                struct.pack_into("<I", data, at + (24 if central else 22), mutation["size"] & 0xFFFFFFFF)

        _patch_headers(raw, member, patch)
        return bytes(raw)
    members = read_members(packed)
    if kind == "long_name":
        name = ("heads/" + "n" * mutation["length"])[: mutation["length"]]
        return zip_with(members + [(name, b"x")])
    if kind == "unlisted_bomb":
        return zip_with(members + [(mutation["name"], b"\0" * mutation["size"])])
    if kind == "duplicate":
        with contextlib.suppress(Exception):
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return zip_with(members + [(member, b"{}")])
        return packed
    if kind == "symlink":
        info = zipfile.ZipInfo(member)
        info.external_attr = (0o120777 << 16)
        return zip_with([(info if name == member else name, b"../../outside/secret.txt" if name == member else data)
                         for name, data in members])
    if kind == "bad_name":
        return zip_with(members + [(mutation["name"] or "x/", b"x")])
    if kind == "drop":
        return zip_with([(name, data) for name, data in members if name != member])
    raise ValueError(kind)
