import os
import sys

import pytest
import torch

from kdfast import _ext

# The worker scripts (tests/workers/) also define what some tests reuse (e.g. the DDP case builders).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "workers"))


def cuda_usable() -> bool:
    return torch.cuda.is_available() and _ext.has_cuda_kernels()


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_cuda: test needs a CUDA GPU and kdfast's CUDA kernels")
    config.addinivalue_line("markers", "cuda_kernels: hand-written CUDA kernels forced on, vs the ATen path and "
                            "the float64 reference (`make gpu-check` runs -m cuda_kernels)")


def _tensorly_missing() -> bool:
    try:
        import tensorly  # noqa: F401
    except ImportError:
        return True
    return False


TENSORLY_MISSING = _tensorly_missing()


def _skip_if_tensorly_missing():
    # tensorly is optional (kdfast.nn.TuckerConv2d.from_conv and the decomposition need it): a test or
    # fixture that reaches it on a machine without tensorly is skipped, not failed. Nothing else is
    # turned into a skip.
    try:
        return (yield)
    except ModuleNotFoundError as exc:
        if TENSORLY_MISSING and (exc.name or "").split(".")[0] == "tensorly":
            pytest.skip("tensorly is not installed (needed for Tucker decomposition)")
        raise


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    return (yield from _skip_if_tensorly_missing())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    return (yield from _skip_if_tensorly_missing())


def pytest_collection_modifyitems(config, items):
    if cuda_usable():
        return
    if os.environ.get("KDFAST_REQUIRE_CUDA") == "1":
        raise pytest.UsageError(
            "KDFAST_REQUIRE_CUDA=1 but CUDA tests cannot run: "
            f"torch.cuda.is_available()={torch.cuda.is_available()}, CUDA kernels compiled={_ext.has_cuda_kernels()}"
        )
    skip = pytest.mark.skip(reason="needs a CUDA GPU and kdfast built with CUDA kernels")
    for item in items:
        if "needs_cuda" in item.keywords:
            item.add_marker(skip)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.needs_cuda)]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(42)
    yield


@pytest.fixture(scope="session", autouse=True)
def _ops_loaded():
    # Every test here exercises the compiled ops: a missing or stale build is a failure, not a skip.
    _ext.require_ops()


@pytest.fixture
def no_tucker_autotune():
    """The Tucker path without run-time measurement (the table and its envelope decide); restored after."""
    import kdfast.backends.tucker as tucker

    tucker.autotune = False
    yield
    tucker.autotune = None
