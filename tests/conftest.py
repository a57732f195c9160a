"""Shared test fixtures.

Device tests need a real bundle. On the host (TensorFlow installed) tests/build_fixtures.py
builds it once and keeps it in pytest's cache folder (``.pytest_cache``), keyed by the content
of the sources and library versions that shape it and checked before each reuse; without the
cache (``-p no:cacheprovider``, or ``EDGEADAPT_TEST_FIXTURE_CACHE=0``) it is built once per
session. In the device-only environment (no TensorFlow), CI builds it beforehand with the host
environment and passes its folder in EDGEADAPT_TEST_FIXTURES (CI does that for the host suites too).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).parent
sys.path.insert(0, str(TESTS_DIR))


def tensorflow_available() -> bool:
    return importlib.util.find_spec("tensorflow") is not None


@pytest.fixture(scope="session")
def fixture_dir(tmp_path_factory, pytestconfig) -> Path:
    """Folder with tiny.eab, images/, test_images.npy, test_labels.npy, info.json."""
    given = os.environ.get("EDGEADAPT_TEST_FIXTURES")
    if given:
        path = Path(given)
        if not (path / "info.json").is_file():
            pytest.fail(f"EDGEADAPT_TEST_FIXTURES={given} has no info.json; build it with "
                        "`python tests/build_fixtures.py DIR` in an environment with TensorFlow")
        return path
    if not tensorflow_available():
        pytest.fail("device tests need a real bundle: set EDGEADAPT_TEST_FIXTURES to a folder built by "
                    "`python tests/build_fixtures.py DIR` (host environment), or install edgeadapt[host]")
    from build_fixtures import build_fixtures, cached_fixtures

    cache = getattr(pytestconfig, "cache", None)  # None with -p no:cacheprovider
    if cache is None or os.environ.get("EDGEADAPT_TEST_FIXTURE_CACHE") == "0":
        return build_fixtures(tmp_path_factory.mktemp("fixtures"))
    return cached_fixtures(cache.mkdir("edgeadapt-test-fixtures"))


@pytest.fixture(scope="session")
def fixture_info(fixture_dir) -> dict:
    return json.loads((fixture_dir / "info.json").read_text())


@pytest.fixture
def bundle_copy(fixture_dir, tmp_path) -> Path:
    """A private, writable copy of the tiny bundle (tests may corrupt or update it)."""
    destination = tmp_path / "tiny.eab"
    shutil.copytree(fixture_dir / "tiny.eab", destination)
    return destination


@pytest.fixture(scope="session")
def test_images(fixture_dir):
    import numpy as np

    return np.load(fixture_dir / "test_images.npy"), np.load(fixture_dir / "test_labels.npy")
