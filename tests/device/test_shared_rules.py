"""The one-owner helpers: class names, pixel rule, image listing, durable writes."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from edgeadapt.device.errors import InputError
from edgeadapt.device.manifest import InputSpec
from edgeadapt.device.naming import check_class_name
from edgeadapt.device.preprocessing import InputQuantizer, list_class_folders, list_image_files, pixel_table
from edgeadapt.device.safefs import durable_write, durable_write_all


@pytest.mark.parametrize("name", ["", " a", "a\tb", "x" * 201, 3])
def test_device_and_host_share_one_class_name_rule(name):
    import edgeadapt.bundles.incremental as host
    import edgeadapt.device.updater as device

    assert host.check_class_name is device.check_class_name is check_class_name
    with pytest.raises(InputError):
        check_class_name(name)
    assert check_class_name("tiger cat") == "tiger cat"


def test_pixel_table_is_the_runtime_rule():
    spec = InputSpec(height=2, width=2, channels=3, scale=1 / 127.5, offset=-1.0)
    table = pixel_table(spec)
    assert table.dtype == np.float32 and table.shape == (256,)
    assert np.array_equal(InputQuantizer(spec, "float32").table, table)
    assert table[0] == np.float32(-1.0) and table[255] == np.float32(255 / 127.5 - 1.0)


def test_image_listing_skips_hidden_files_and_folders(tmp_path):
    for relative in ["b/2.JPG", "b/1.png", "b/.hidden.jpg", "b/notes.txt", ".git/x.jpg", "a/.cache/3.jpg",
                     "a/deep/4.bmp", "top.jpeg"]:
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    assert [p.name for p in list_class_folders(tmp_path)] == ["a", "b"]
    assert [p.name for p in list_image_files(tmp_path / "b")] == ["1.png", "2.JPG"]
    assert [p.relative_to(tmp_path).as_posix() for p in list_image_files(tmp_path, recursive=True)] == [
        "a/deep/4.bmp", "b/1.png", "b/2.JPG", "top.jpeg"]


def test_durable_write_replaces_atomically_and_cleans_up(tmp_path):
    target = tmp_path / "sub" / "file.bin"
    durable_write(target, b"old")
    durable_write(target, lambda handle: handle.write(b"new"), mode=0o600)
    assert target.read_bytes() == b"new" and stat.S_IMODE(os.stat(target).st_mode) == 0o600

    def failing(handle):
        handle.write(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        durable_write(target, failing)
    with pytest.raises(OSError):
        durable_write_all({tmp_path / "one": b"1", target: failing})
    assert target.read_bytes() == b"new" and not (tmp_path / "one").exists()
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.bin"]
    durable_write_all({tmp_path / "one": b"1", target: b"2"})
    assert (tmp_path / "one").read_bytes() == b"1" and target.read_bytes() == b"2"


def test_durable_write_never_writes_through_a_link(tmp_path):
    outside = tmp_path / "outside"
    outside.write_bytes(b"keep")
    target = tmp_path / "target"
    target.symlink_to(outside)
    durable_write(target, b"new")
    assert outside.read_bytes() == b"keep" and not target.is_symlink() and target.read_bytes() == b"new"


def test_statistics_extras_hook_keeps_the_format_free_of_the_solver():
    from edgeadapt.device.add_options import AddClassOptions
    from edgeadapt.device.errors import BundleError, IncompatibleModelError
    from edgeadapt.device.head import ClassStats, Head
    from edgeadapt.device.ridge_basis import RidgeBasis, as_basis, build_ridge_basis
    from edgeadapt.device.stats_extras import EXTRA_KEY, StatisticsExtra, StoredExtra, load_statistics_extra

    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(60, 6)) + np.repeat(np.eye(6)[:3] * 4, 20, axis=0)
    labels = np.repeat(np.arange(3), 20)
    stats = ClassStats.from_embeddings(embeddings, labels, 3, with_gram=True)
    head = Head(weights=stats.means().T.astype(np.float32), bias=np.zeros(3, np.float32))
    basis = build_ridge_basis(head, stats, AddClassOptions(method="ridge"))
    assert isinstance(basis, StatisticsExtra)

    stored = load_statistics_extra("some_other_solver", {"x": 1}, {"kept_name": np.ones(2), "../escape": np.ones(2)})
    assert isinstance(stored, StoredExtra) and list(stored.arrays()) == ["kept_name"]

    loaded = load_statistics_extra(EXTRA_KEY, basis.metadata(), basis.arrays())  # ridge registered its loader
    assert isinstance(loaded, RidgeBasis) and loaded.classes == basis.classes
    unread = StoredExtra(EXTRA_KEY, basis.metadata(), basis.arrays())  # read before the solver was imported
    rebuilt = as_basis(unread)
    assert isinstance(rebuilt, RidgeBasis)
    assert np.array_equal(rebuilt.discriminant_inverse, basis.discriminant_inverse)
    broken = {name: array for name, array in basis.arrays().items() if name != "ridge_calibration"}
    with pytest.raises((BundleError, IncompatibleModelError), match="malformed"):
        as_basis(StoredExtra(EXTRA_KEY, basis.metadata(), broken))
