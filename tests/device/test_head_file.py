"""The flat head file (.eah) in Python: round trips, hostile files, the prototype column (numpy only)."""

from __future__ import annotations

import hashlib
import math
import struct

import numpy as np
import pytest
from edgeadapt.device import BundleError, InputError
from edgeadapt.device.errors import IncompatibleModelError
from edgeadapt.device.head import Head
from edgeadapt.device.head_file import (
    CHECKSUM_SIZE,
    FLAG_FEATURE_MEAN,
    FLAG_L2_NORMALIZE,
    HEADER_SIZE,
    MAX_CLASSES,
    MAX_DIM,
    section_offsets,
    head_from_bytes,
    head_to_bytes,
    quantize_columns,
    read_head_file,
    write_head_file,
)
from edgeadapt.device.prototype_column import append_column, prototype_column


def random_head(dim=12, classes=5, mean=True, l2=True, temperature=0.7, seed=0) -> Head:
    rng = np.random.default_rng(seed)
    return Head(rng.normal(size=(dim, classes)).astype(np.float32), rng.normal(size=classes).astype(np.float32),
                rng.normal(size=dim).astype(np.float32) if mean else None, l2, temperature)


def names(count):
    return [f"class {index}" for index in range(count)]


def resign(data: bytes) -> bytes:
    """Recompute the trailing sha256 (to reach the checks behind the checksum)."""
    return data[:-CHECKSUM_SIZE] + hashlib.sha256(data[:-CHECKSUM_SIZE]).digest()


def patch(data: bytes, offset: int, fmt: str, value) -> bytes:
    raw = bytearray(data)
    struct.pack_into(fmt, raw, offset, value)
    return resign(bytes(raw))


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("mean,l2", [(False, False), (True, False), (False, True), (True, True)])
def test_float_round_trip_is_exact(mean, l2):
    head = random_head(mean=mean, l2=l2)
    parsed = head_from_bytes(head_to_bytes(head, names(5)))
    assert parsed.class_names == names(5) and not parsed.is_int8
    assert np.array_equal(parsed.head.weights, head.weights) and np.array_equal(parsed.head.bias, head.bias)
    assert parsed.head.l2_normalize == l2 and parsed.head.temperature == np.float32(0.7)
    assert (parsed.head.feature_mean is None) == (not mean)
    if mean:
        assert np.array_equal(parsed.head.feature_mean, head.feature_mean)
    embeddings = np.random.default_rng(1).normal(size=(9, 12)).astype(np.float32)
    assert np.array_equal(parsed.head.logits(embeddings), head.logits(embeddings))


def test_int8_round_trip_dequantises_within_half_a_step():
    head = random_head(dim=40, classes=7)
    data = head_to_bytes(head, names(7), int8=True)
    parsed = head_from_bytes(data)
    assert parsed.is_int8 and parsed.int8_weights.shape == (7, 40)
    q, scales = quantize_columns(head.weights)
    assert np.array_equal(parsed.int8_weights, q) and np.array_equal(parsed.int8_scales, scales)
    step = np.abs(head.weights).max(axis=0) / 127
    assert np.all(np.abs(parsed.head.weights - head.weights) <= step / 2 + 1e-7)
    # 280 weights: 1120 float32 bytes become 280 int8 bytes + 7 float32 scales
    assert len(head_to_bytes(head, names(7))) - len(data) == 4 * 280 - (280 + 4 * 7)


def test_zero_class_head_and_unicode_names_round_trip():
    empty = random_head(classes=0)
    parsed = head_from_bytes(head_to_bytes(empty, []))
    assert parsed.head.num_classes == 0 and parsed.class_names == []
    unicode = random_head(classes=3)
    labels = ["pâquerette", "蒲公英", "rose 🌹"]
    assert head_from_bytes(head_to_bytes(unicode, labels)).class_names == labels


def test_file_round_trip_on_disk(tmp_path):
    head = random_head()
    path = write_head_file(tmp_path / "head.eah", head, names(5))
    assert read_head_file(path).class_names == names(5)
    assert not list(tmp_path.glob(".*tmp*"))
    with pytest.raises(BundleError, match="cannot read"):
        read_head_file(tmp_path / "missing.eah")


@pytest.mark.parametrize("labels,match", [
    (["a", "b"], "2 class names for a head with 3"),
    (["a", "a", "b"], "unique"),
    (["a", "b\n", "c"], "control characters"),
    (["a", "", "c"], "1..255"),
    (["a", "x" * 256, "c"], "1..255"),
])
def test_writer_refuses_bad_names(labels, match, tmp_path):
    with pytest.raises(InputError, match=match):
        write_head_file(tmp_path / "head.eah", random_head(classes=3), labels)
    assert not (tmp_path / "head.eah").exists()


# ----------------------------------------------------------------------------- hostile files
#: section offsets of the `valid` file: D = 12, C = 5, mean + L2, float32, names "class 0".."class 4"
LAYOUT = section_offsets(12, 5, FLAG_FEATURE_MEAN | FLAG_L2_NORMALIZE, 35)

@pytest.fixture(scope="module")
def valid() -> bytes:
    return head_to_bytes(random_head(), names(5))


def test_random_damage_raises_only_bundle_error(valid):
    """Whatever the bytes, the reader raises BundleError (or accepts a file that is still valid)."""
    rng = np.random.default_rng(7)
    int8 = head_to_bytes(random_head(dim=9, classes=4), names(4), int8=True)
    for trial in range(3000):
        data = bytearray(valid if trial % 2 else int8)
        for _ in range(int(rng.integers(1, 6))):
            data[int(rng.integers(0, len(data)))] = int(rng.integers(0, 256))
        if trial % 3:
            data = bytearray(resign(bytes(data)))
        if trial % 7 == 0:
            data = data[: int(rng.integers(0, len(data)))]
        try:
            parsed = head_from_bytes(bytes(data))
        except BundleError:
            continue
        assert np.all(np.isfinite(parsed.head.weights)) and np.all(np.isfinite(parsed.head.bias))


def test_every_truncation_is_refused(valid):
    for length in range(len(valid)):
        with pytest.raises(BundleError):
            head_from_bytes(valid[:length])


def test_trailing_bytes_are_refused(valid):
    with pytest.raises(BundleError, match="declares"):
        head_from_bytes(valid + b"\0")


@pytest.mark.parametrize("offset,fmt,value,match", [
    (0, "<B", 0x88, "magic"),
    (8, "<H", 2, "format version 2"),
    (10, "<H", 65, "invalid header"),
    (12, "<I", 8, "invalid header"),
    (50, "<B", 1, "invalid header"),
    (16, "<I", 0, "beyond the limits"),
    (16, "<I", MAX_DIM + 1, "beyond the limits"),
    (20, "<I", MAX_CLASSES + 1, "beyond the limits"),
    (16, "<I", 0xFFFFFFFF, "beyond the limits"),
    (28, "<I", 0xFFFFFFFF, "beyond the limits"),
    (32, "<Q", 2**64 - 1, "sections add up"),
    (20, "<I", 6, "sections add up"),
    (24, "<f", float("nan"), "temperature"),
    (24, "<f", 0.0, "temperature"),
    (24, "<f", -1.0, "temperature"),
])
def test_header_lies_are_refused(valid, offset, fmt, value, match):
    with pytest.raises(BundleError, match=match):
        head_from_bytes(patch(valid, offset, fmt, value))


def test_huge_declared_sizes_are_refused_without_allocating(valid):
    """D = C = 2^20 declares a 4 TiB file: refused by arithmetic, not by a failed allocation."""
    huge = bytearray(valid)
    struct.pack_into("<IIfIQ", huge, 16, MAX_DIM, MAX_CLASSES, 1.0, 0, 0)
    for declared in (0, len(valid), 4 * MAX_DIM * MAX_CLASSES + 10**7):
        struct.pack_into("<Q", huge, 32, declared)
        with pytest.raises(BundleError, match="add up|declares"):
            head_from_bytes(resign(bytes(huge)))


def test_checksum_mismatch_is_refused(valid):
    damaged = bytearray(valid)
    damaged[HEADER_SIZE + 10] ^= 0x01
    with pytest.raises(BundleError, match="sha256"):
        head_from_bytes(bytes(damaged))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("section", ["mean", "weights", "bias"])
def test_non_finite_values_are_refused(valid, value, section):
    offset = LAYOUT[section] + 4 * 3
    with pytest.raises(BundleError, match="NaN or infinite"):
        head_from_bytes(patch(valid, offset, "<f", value))


def test_weights_beyond_two_to_the_64_are_refused(valid):
    with pytest.raises(BundleError, match="beyond 2"):
        head_from_bytes(patch(valid, LAYOUT["weights"] + 8, "<f", -3.0e19))
    head = random_head(mean=False)
    head.weights[2, 1] = 3.0e19
    with pytest.raises(InputError, match="2\\^64"):
        head_to_bytes(head, names(5))


def test_bad_int8_scales_and_padding_are_refused():
    data = head_to_bytes(random_head(dim=5, classes=3), names(3), int8=True)
    scales_at = HEADER_SIZE + 4 * 5 + 16  # after the mean, 15 int8 weights padded to 16
    assert scales_at == section_offsets(5, 3, 7, 21)["scales"]
    for scale in (0.0, -1.0, 3.0e38):
        with pytest.raises(BundleError, match="int8 scale"):
            head_from_bytes(patch(data, scales_at, "<f", scale))
    with pytest.raises(BundleError, match="padding"):
        head_from_bytes(patch(data, scales_at - 1, "<B", 7))


def test_bad_name_tables_are_refused(valid):
    table = LAYOUT["name_offsets"]
    with pytest.raises(BundleError, match="name table"):
        head_from_bytes(patch(valid, table, "<I", 1))
    with pytest.raises(BundleError, match="name table"):
        head_from_bytes(patch(valid, table + 8, "<I", 3))  # an empty name
    with pytest.raises(BundleError, match="control"):
        head_from_bytes(patch(valid, len(valid) - CHECKSUM_SIZE - 1, "<B", 10))
    with pytest.raises(BundleError, match="not UTF-8"):
        head_from_bytes(patch(valid, len(valid) - CHECKSUM_SIZE - 1, "<B", 0xFF))
    with pytest.raises(BundleError, match="duplicate"):
        head_from_bytes(patch(valid, len(valid) - CHECKSUM_SIZE - 1, "<B", ord("3")))


# ----------------------------------------------------------------------------- the prototype column
def test_prototype_column_direction_scale_and_mean_bias():
    head = random_head(dim=16, classes=4, mean=True, l2=True)
    shots = np.random.default_rng(3).normal(size=(6, 16)).astype(np.float32)
    column, bias = prototype_column(head, shots)
    prototype = head.features(shots).astype(np.float64).mean(axis=0)
    expected_norm = np.linalg.norm(head.weights.astype(np.float64), axis=0).mean()
    np.testing.assert_allclose(column, expected_norm * prototype / np.linalg.norm(prototype), rtol=1e-6)
    assert bias == pytest.approx(float(head.bias.astype(np.float64).mean()), rel=1e-6)
    grown = append_column(head, column, bias)
    assert np.array_equal(grown.logits(shots)[:, :4], head.logits(shots))


@pytest.mark.parametrize("budget", [0.01, 0.1, 0.3])
def test_claim_budget_bounds_the_background_claimed(budget):
    head = random_head(dim=16, classes=4, mean=False, l2=True, temperature=2.0)
    rng = np.random.default_rng(4)
    shots = rng.normal(size=(5, 16)).astype(np.float32) + 2.0
    background = rng.normal(size=(200, 16)).astype(np.float32) + rng.normal(size=16).astype(np.float32)
    column, bias = prototype_column(head, shots, background, budget)
    features = head.features(background).astype(np.float64)
    margins = (features @ head.weights + head.bias).max(axis=1) - features @ column.astype(np.float64)
    # exactly: the new class wins where its margin is below the bias: on m - ceil((1 - q) m) <= q m examples
    allowed = 200 - math.ceil((1.0 - budget) * 200)
    assert np.sum(margins < bias) == allowed <= budget * 200
    # through the float32 device path the example whose margin is next to the bias may go either way
    logits = append_column(head, column, bias).logits(background)
    claimed = int(np.sum(logits[:, -1] > logits[:, :-1].max(axis=1)))
    assert abs(claimed - allowed) <= 1


def test_empty_head_gets_scale_16_and_bias_0():
    head = random_head(dim=8, classes=0, mean=False, l2=True)
    shots = np.random.default_rng(5).normal(size=(3, 8)).astype(np.float32)
    column, bias = prototype_column(head, shots, background=shots, claim_budget=0.5)
    assert np.linalg.norm(column.astype(np.float64)) == pytest.approx(16.0, rel=1e-6) and bias == 0.0


def test_prototype_column_refuses_bad_input():
    head = random_head(dim=8, classes=2, mean=False, l2=False)
    with pytest.raises(InputError, match="no shots"):
        prototype_column(head, np.zeros((0, 8), np.float32))
    with pytest.raises(InputError, match="NaN"):
        prototype_column(head, np.full((2, 8), np.nan, np.float32))
    with pytest.raises(InputError, match="expects"):
        prototype_column(head, np.ones((2, 7), np.float32))
    with pytest.raises(IncompatibleModelError, match="no direction"):
        prototype_column(head, np.zeros((2, 8), np.float32))
    with pytest.raises(InputError, match="claim_budget"):
        prototype_column(head, np.ones((2, 8), np.float32), np.ones((3, 8), np.float32), claim_budget=1.0)
