"""`make data` and the step `make test` runs first (`make data-if-missing`), on a machine without
apt-get (PATH without it) and with the dataset present (a directory given as FASHION_MNIST_DIR):
nothing is installed here."""
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAKE = shutil.which("make")
pytestmark = pytest.mark.skipif(MAKE is None, reason="make is not installed")


def _make(target, tmp_path, fashion_dir):
    bare = tmp_path / "bin"  # a PATH without apt-get
    bare.mkdir(exist_ok=True)
    return subprocess.run([MAKE, "-s", "-C", ROOT, target, f"FASHION_MNIST_DIR={fashion_dir}"],
                          env={"PATH": str(bare), "HOME": str(tmp_path)}, capture_output=True, text=True, timeout=60)


def test_without_apt_get_make_data_says_what_to_do(tmp_path):
    result = _make("data", tmp_path, tmp_path / "absent")
    assert result.returncode != 0
    assert "no apt-get on this machine" in result.stdout and "KDFAST_DATA" in result.stdout
    assert "t10k-labels-idx1-ubyte.gz" in result.stdout


def test_the_step_before_make_test_never_fails(tmp_path):
    result = _make("data-if-missing", tmp_path, tmp_path / "absent")
    assert result.returncode == 0, result.stderr
    present = tmp_path / "fm"
    present.mkdir()
    (present / "train-images-idx3-ubyte.gz").write_bytes(b"")
    assert _make("data", tmp_path, present).stdout.startswith("Fashion-MNIST is installed in")
    assert _make("data-if-missing", tmp_path, present).returncode == 0
