"""The ridge method's cached solver state (edgeadapt.device.ridge_basis.RidgeBasis): numpy only.

The basis makes adding a class to a large head cheap; these tests pin down that it is an
exact cache (a stored basis gives the very columns a freshly built one gives), that it is
rebuilt when it must be, that bundles store it only when asked (a device update builds a missing
one and its commit stores it), and that bundles carrying it share its files between versions.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from edgeadapt.device import Bundle, BundleError, ClassStats, IncompatibleModelError, Runtime
from edgeadapt.device.incremental import (
    AddClassOptions,
    add_classes,
    add_examples,
    old_logits_unchanged,
    remove_class,
    resolve_all,
    with_ridge_basis,
)
from edgeadapt.device.merging import carries_ridge_basis, with_ridge_basis_if, with_ridge_basis_like
from edgeadapt.device.ridge_basis import RidgeBasis, build_ridge_basis
from edgeadapt.device.ridge_basis_columns import basis_new_columns
from edgeadapt.device.ridge_model import new_class_examples
from edgeadapt.device import HeadUpdater

from ridge_support import rewrite_ridge_state, ridge_files
from test_head_math import gaussian_classes, trained_head

RIDGE = AddClassOptions(method="ridge")  # the solver state under test is ridge's (the default method is claim)


@pytest.fixture(scope="module")
def many():
    """A 30-class head on 24-d embeddings, its statistics and two new classes."""
    embeddings, labels, _ = gaussian_classes(32, 40, seed=3)
    old = labels < 30
    head = trained_head(embeddings[old], labels[old], 30)
    stats = ClassStats.from_embeddings(embeddings[old], labels[old], 30)
    new = [embeddings[labels == 30][:5], embeddings[labels == 31][:5]]
    return head, stats, new, embeddings, labels


def test_stored_basis_gives_the_same_columns_as_a_fresh_one(many):
    head, stats, new, embeddings, _ = many
    with_basis = with_ridge_basis(head, stats)
    assert isinstance(with_basis.ridge_basis, RidgeBasis) and stats.ridge_basis is None
    fresh_head, fresh_stats = add_classes(head, stats, new, RIDGE)
    cached_head, cached_stats = add_classes(head, with_basis, new, RIDGE)
    assert np.array_equal(fresh_head.weights, cached_head.weights)
    assert np.array_equal(fresh_head.bias, cached_head.bias)
    assert old_logits_unchanged(head, cached_head, embeddings)
    assert cached_stats.ridge_basis.updates == 2
    # the arrays are shared, not copied
    assert cached_stats.ridge_basis.least_squares_inverse is with_basis.ridge_basis.least_squares_inverse


def test_basis_is_rebuilt_after_its_share_of_updates(many):
    head, stats, new, _, _ = many
    options = AddClassOptions(method="ridge", basis_refresh_fraction=0.1, basis_refresh_minimum=2)  # 30 classes: 3 updates
    stats = with_ridge_basis(head, stats, options)
    first = stats.ridge_basis
    assert first.refresh_limit(options.basis_refresh_fraction, options.basis_refresh_minimum) == 3
    assert first.refresh_limit(0.01, 2) == 2 and first.refresh_limit(0.0, 2) == 0
    head, stats = add_classes(head, stats, new, options)
    assert stats.ridge_basis.updates == 2 and stats.ridge_basis.discriminant_inverse is first.discriminant_inverse
    head, stats = add_classes(head, stats, [new[0] + 0.5], options)
    assert stats.ridge_basis.updates == 3
    head, stats = add_classes(head, stats, [new[1] + 0.5], options)  # limit reached: rebuilt over 33 classes
    assert stats.ridge_basis.classes == 33 and stats.ridge_basis.updates == 1
    assert stats.ridge_basis.discriminant_inverse is not first.discriminant_inverse


def test_basis_of_another_head_or_other_settings_is_not_used(many):
    head, stats, new, _, _ = many
    stats = with_ridge_basis(head, stats)
    basis = stats.ridge_basis
    assert basis.is_fresh_for(head, AddClassOptions(method="ridge"))
    assert not basis.is_fresh_for(head, AddClassOptions(method="ridge", shrinkage=0.5))
    resolved = resolve_all(head, stats)  # every column changes: the calibration no longer fits
    assert not basis.is_fresh_for(resolved, AddClassOptions(method="ridge"))
    expected, _ = add_classes(resolved, dataclasses.replace(stats, ridge_basis=None), new, RIDGE)
    got, _ = add_classes(resolved, stats, new, RIDGE)
    assert np.array_equal(expected.weights, got.weights)


def test_removing_a_class_drops_the_basis_and_add_examples_keeps_it(many):
    head, stats, new, embeddings, labels = many
    stats = with_ridge_basis(head, stats)
    _, removed = remove_class(head, stats, 4)
    assert removed.ridge_basis is None
    strengthened_head, strengthened = add_examples(head, stats, 2, embeddings[labels == 2][:4], RIDGE)
    assert strengthened.ridge_basis.updates == 1
    changed = np.flatnonzero(np.any(strengthened_head.weights != head.weights, axis=0))
    assert changed.tolist() == [2]


def test_woodbury_and_direct_solves_agree():
    """Few examples use the Woodbury identity, many a direct solve: the same least-squares column."""
    embeddings, labels, _ = gaussian_classes(6, 40, seed=5, size=12)
    old = labels < 5
    head = trained_head(embeddings[old], labels[old], 5)
    stats = ClassStats.from_embeddings(embeddings[old], labels[old], 5)
    basis = build_ridge_basis(head, stats, AddClassOptions(method="ridge"))
    examples = embeddings[labels == 5][:3]  # rank 4 <= 13 // 3: Woodbury
    means, deviations = new_class_examples(head, [examples])
    woodbury = basis_new_columns(basis, head, means, deviations, AddClassOptions(method="ridge"))
    # the same second moment spelled with many zero-padded rows forces the direct solve
    padded = [np.concatenate([deviations[0], np.zeros((10, 12))])]
    scale = np.sqrt(padded[0].shape[0] / deviations[0].shape[0])
    direct = basis_new_columns(basis, head, means, [padded[0] * scale], AddClassOptions(method="ridge", few_shot_examples=0.0))
    reference = basis_new_columns(basis, head, means, deviations, AddClassOptions(method="ridge", few_shot_examples=0.0))
    np.testing.assert_allclose(direct[0], reference[0], rtol=1e-4, atol=1e-5)
    assert np.all(np.isfinite(woodbury[0]))


def test_a_malformed_stored_basis_is_refused(many):
    head, stats, _, _, _ = many
    basis = with_ridge_basis(head, stats).ridge_basis
    arrays = basis.arrays()
    arrays["ridge_least_squares_inverse"] = arrays["ridge_least_squares_inverse"][:-1]
    with pytest.raises(IncompatibleModelError, match="ridge solver state"):
        RidgeBasis.from_parts(basis.metadata(), arrays)


# ----------------------------------------------------------------------------- stored only when asked
def test_with_ridge_basis_if_stores_the_state_only_when_asked(many):
    head, stats, _, _, _ = many
    kept = with_ridge_basis_if(True, head, stats)
    assert isinstance(kept.ridge_basis, RidgeBasis) and stats.ridge_basis is None
    dropped = with_ridge_basis_if(False, head, kept)
    assert dropped.ridge_basis is None and kept.ridge_basis is not None  # a copy: the input keeps its state
    assert np.array_equal(dropped.sums, stats.sums) and np.array_equal(dropped.gram, stats.gram)
    assert with_ridge_basis_if(False, head, stats) is stats
    assert with_ridge_basis_if(True, head, None) is None and with_ridge_basis_if(False, head, None) is None
    no_gram = ClassStats(sums=stats.sums, counts=stats.counts)
    assert with_ridge_basis_if(True, head, no_gram).ridge_basis is None  # nothing to build it from


def test_host_versions_keep_the_state_as_their_parent(fixture_dir, tmp_path, many):
    head, stats, _, _, _ = many
    plain = Bundle.open(fixture_dir / "tiny.eab")
    stored = Bundle.open(rewrite_ridge_state(fixture_dir / "tiny.eab", tmp_path / "ridge.eab"))
    assert not carries_ridge_basis(plain.manifest) and carries_ridge_basis(stored.manifest)
    assert with_ridge_basis_like(plain.manifest, head, with_ridge_basis(head, stats)).ridge_basis is None
    assert isinstance(with_ridge_basis_like(stored.manifest, head, stats).ridge_basis, RidgeBasis)


# ----------------------------------------------------------------------------- in a bundle
def test_default_export_stores_no_solver_state(fixture_dir):
    """The fixture is a default export: statistics with a Gram matrix, no ridge_*.npy file, none listed."""
    bundle = Bundle.open(fixture_dir / "tiny.eab")
    statistics = bundle.manifest.data["head"]["statistics"]
    assert statistics["gram"] and "ridge_basis" not in statistics
    assert ridge_files(bundle.path) == []
    assert not list(bundle.path.rglob("ridge_*.npy"))
    assert bundle.load_class_stats().ridge_basis is None


def test_device_ridge_update_builds_the_missing_state_and_its_commit_stores_it(bundle_copy, fixture_dir):
    base = Bundle.open(bundle_copy)
    expected = build_ridge_basis(base.load_head(), base.load_class_stats(), RIDGE)  # what an export would store
    images, labels = np.load(fixture_dir / "test_images.npy"), np.load(fixture_dir / "test_labels.npy")
    with Runtime.open(bundle_copy) as runtime:
        updater = HeadUpdater(runtime, options=RIDGE)
        updater.add_class("extra", list(images[labels == 0][:4]), force=True)
        second = Bundle.open(bundle_copy)
        section = second.manifest.data["head"]["statistics"]["ridge_basis"]
        assert section["updates"] == 1 and section["classes"] == len(
            base.manifest.class_names)  # built over the base classes
        assert all(path.startswith(f"heads/v{second.manifest.version}/") for path in section["files"].values())
        loaded = second.load_class_stats().ridge_basis
        assert np.array_equal(loaded.discriminant_inverse, expected.discriminant_inverse)
        assert np.array_equal(loaded.least_squares_inverse, expected.least_squares_inverse)
        updater.add_class("extra2", list(images[labels == 1][:4]), force=True)
    third = Bundle.open(bundle_copy)
    after = third.manifest.data["head"]["statistics"]["ridge_basis"]
    assert after["updates"] == 2 and after["files"] == section["files"]  # the next update reuses the stored state


def test_device_update_uses_the_bundle_basis_and_shares_its_files(fixture_dir, tmp_path):
    path = rewrite_ridge_state(fixture_dir / "tiny.eab", tmp_path / "ridge.eab")  # as ridge_solver_state=True writes it
    bundle = Bundle.open(path)
    statistics = bundle.manifest.data["head"]["statistics"]
    stored = bundle.load_class_stats().ridge_basis
    assert isinstance(stored, RidgeBasis) and stored.updates == 0
    assert len(ridge_files(path)) == len(statistics["ridge_basis"]["files"]) > 0
    images = np.load(fixture_dir / "test_images.npy")[:4]
    with Runtime.open(path) as runtime:
        HeadUpdater(runtime, options=RIDGE).add_class("extra", list(images), force=True)
    after = Bundle.open(path)
    section = after.manifest.data["head"]["statistics"]["ridge_basis"]
    assert section["updates"] == 1
    assert section["files"] == statistics["ridge_basis"]["files"]  # shared with version 1, not rewritten
    loaded = after.load_class_stats().ridge_basis
    assert np.array_equal(loaded.discriminant_inverse, stored.discriminant_inverse)


def test_tampered_basis_file_is_refused(fixture_dir, tmp_path):
    path = rewrite_ridge_state(fixture_dir / "tiny.eab", tmp_path / "ridge.eab")
    section = Bundle.open(path).manifest.data["head"]["statistics"]["ridge_basis"]
    file = path / section["files"]["ridge_calibration"]
    data = bytearray(file.read_bytes())
    data[-3] ^= 0x5A
    file.write_bytes(bytes(data))
    with pytest.raises(BundleError):
        Bundle.open(path).load_class_stats()


def test_cached_update_equals_an_explicit_joint_solve():
    """The Woodbury update of the cached state gives what solving the grown system from scratch gives:
    the new class's least-squares column AND the refit of the logit scale on the old columns."""
    from edgeadapt.device import ridge_basis_columns
    from edgeadapt.device.ridge_calibration import Moments, fit_alignment
    from edgeadapt.device.ridge_model import feature_model

    embeddings, labels, _ = gaussian_classes(6, 40, seed=5, size=12)
    old = labels < 5
    head = trained_head(embeddings[old], labels[old], 5)
    stats = ClassStats.from_embeddings(embeddings[old], labels[old], 5)
    basis = build_ridge_basis(head, stats, AddClassOptions(method="ridge"))
    means, deviations = new_class_examples(head, [embeddings[labels == 5][:3]])
    factors = np.concatenate([np.append(means[0], 1.0)[None, :],
                              np.concatenate([deviations[0] / np.sqrt(3), np.zeros((3, 1))], axis=1)])
    cached_weights, cached_bias = ridge_basis_columns.refitted_least_squares(basis, head, means, factors)

    grown = np.linalg.inv(basis.least_squares_inverse.astype(np.float64)) + factors.T @ factors
    model = feature_model(head, stats)
    used = basis.classes_used
    old_targets = np.concatenate([model.means[used], np.ones((used.size, 1))], axis=1).T
    solution = np.linalg.solve(grown, np.concatenate([np.append(means[0], 1.0)[:, None], old_targets], axis=1))
    moments = Moments(first=basis.first_moment, second=basis.second_moment.astype(np.float64))
    scale, offset, offset_bias = fit_alignment(
        head.weights[:, used].astype(np.float64), head.bias[used].astype(np.float64),
        solution[:12, 1:], solution[12, 1:], None, used, moments)
    np.testing.assert_allclose(cached_weights, scale * solution[:12, :1] + offset[:, None], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(cached_bias, scale * solution[12, :1] + offset_bias, rtol=1e-4, atol=1e-5)
