import os

import pytest
import torch

from kdfast import _ext


def cuda_usable() -> bool:
    return torch.cuda.is_available() and _ext.has_cuda_kernels()


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_cuda: test needs a CUDA GPU and kdfast's CUDA kernels")


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
