"""The package surface: every lazily imported subpackage and shortcut of kdfast/__init__.py resolves."""
import importlib
import subprocess
import sys

import pytest

import kdfast


@pytest.mark.parametrize("name", sorted(kdfast._SUBMODULES))
def test_lazy_submodule_imports(name):
    assert getattr(kdfast, name) is importlib.import_module(f"kdfast.{name}")


def test_shortcuts_and_star_import():
    assert kdfast.decompose is kdfast.decomposition.decompose
    assert kdfast.robustness_report is kdfast.robustness.robustness_report
    namespace = {}
    exec("from kdfast import *", namespace)
    assert {"ops", "nn", "losses", "distill", "decompose"} <= set(namespace)
    with pytest.raises(AttributeError, match="no attribute 'not_a_module'"):
        kdfast.not_a_module


def test_import_is_cheap():
    # `import kdfast` must not pull tensorly, scikit-learn or matplotlib (the subpackages do, on use).
    code = "import sys, kdfast; print(sorted(m for m in ('tensorly', 'sklearn', 'matplotlib') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
