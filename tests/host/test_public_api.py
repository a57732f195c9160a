"""The public host API: one import gives every name a user needs, lazily and documented."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGES = ("edgeadapt", "edgeadapt.converters")


@pytest.mark.parametrize("package", PACKAGES)
def test_every_exported_name_resolves(package):
    pytest.importorskip("tensorflow")
    module = importlib.import_module(package)
    assert module.__all__, f"{package} exports nothing"
    for name in module.__all__:
        value = getattr(module, name)
        assert getattr(value, "__name__", name) == name, (package, name)
    with pytest.raises(AttributeError):
        module.no_such_name  # noqa: B018
    # a name equal to a sub-module's or sub-package's would turn into the module once that sub-module is imported
    folder = importlib.util.find_spec(package).submodule_search_locations[0]
    submodules = {path.stem for path in Path(folder).glob("*.py")} | {path.name for path in Path(folder).iterdir() if (path / "__init__.py").is_file()}
    clashes = sorted(set(module.__all__) & submodules)
    assert clashes == []


def test_errors_are_the_device_error_types():
    import edgeadapt
    import edgeadapt.converters
    from edgeadapt.device import errors

    for name in ("EdgeAdaptError", "BundleError", "InputError", "IncompatibleModelError", "DatasetError",
                 "ConversionError", "BackendUnavailableError", "UpdateError", "ConcurrentUpdateError"):
        assert getattr(edgeadapt, name) is getattr(errors, name)
        assert issubclass(getattr(edgeadapt, name), errors.EdgeAdaptError)
    assert edgeadapt.converters.ConversionError is errors.ConversionError


@pytest.mark.parametrize("package", PACKAGES)
def test_importing_the_package_imports_no_tensorflow(package):
    code = (f"import sys, {package}\n"
            "heavy = sorted(name for name in ('tensorflow', 'keras', 'tf2onnx', 'onnxruntime') if name in sys.modules)\n"
            "print(','.join(heavy))\n")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "", f"import {package} imported {completed.stdout.strip()}"


@pytest.mark.parametrize("package", PACKAGES)
def test_every_exported_callable_has_google_style_docstrings(package):
    pytest.importorskip("tensorflow")
    module = importlib.import_module(package)
    missing = []
    for name in module.__all__:
        value = getattr(module, name)
        doc = inspect.getdoc(value) or ""
        if inspect.isfunction(value):
            sections = [section for section in ("Args:", "Returns:") if section not in doc]
            if sections:
                missing.append(f"{name}: no {', '.join(sections)}")
        elif not doc.strip():
            missing.append(f"{name}: no docstring")
    assert missing == []
