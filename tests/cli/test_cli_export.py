"""`kdfast export`: a student made by `kdfast decompose` leaves kdfast as plain PyTorch, a torch.export
program or ONNX, and runs (ONNX Runtime included) in a process that cannot import kdfast, with the
kdfast student's outputs. Bad arguments exit 2 naming the argument."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from kdfast import model_file, models
from kdfast.cli.export import parse_input_shape
from kdfast.cli.main import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUNNER = os.path.join(ROOT, "tests", "workers", "no_kdfast_runner.py")
ONNX_MISSING = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]


@pytest.fixture(scope="module")
def student_file(tmp_path_factory):
    """The README's chain: the demo's teacher architecture (vgg8 at width 0.25 on 16x16 digits, 1
    channel) saved as a model file, then `kdfast decompose --ranks evbmf`."""
    out = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    teacher = models.build("vgg8", num_classes=10, in_channels=1, width_mult=0.25).eval()
    model_file.save_model(out / "teacher.pt", teacher, "vgg8", {"num_classes": 10, "in_channels": 1, "width_mult": 0.25},
                          data={"name": "digits", "image_size": 16, "root": None})
    assert main(["decompose", "--checkpoint", str(out / "teacher.pt"), "--ranks", "evbmf", "--out", str(out / "student.pt")]) == 0
    student, ckpt = model_file.load_model(out / "student.pt")
    assert ckpt["tucker"]
    x = torch.randn(6, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        np.save(out / "x.npy", x.numpy())
        np.save(out / "y.npy", student(x).numpy())
    return out


def _run_without_kdfast(fmt, path, data_dir):
    env = {**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, RUNNER, fmt, str(path), str(data_dir / "x.npy"), str(data_dir / "y.npy")],
                          capture_output=True, text=True, env=env, cwd=str(data_dir), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "kdfast" not in result["modules"] and result["shape"] == [6, 10]
    assert result["max_abs_err"] <= 1e-4 * max(result["max_abs_ref"], 1.0), result
    return result


@pytest.mark.skipif(bool(ONNX_MISSING), reason=f"needs {', '.join(ONNX_MISSING)} (pip install 'kdfast[export]')")
@pytest.mark.parametrize("fuse", [False, True], ids=["eager", "fused"])
def test_decomposed_student_runs_in_onnx_runtime_without_kdfast(student_file, fuse, capsys):
    out = student_file / f"student_{fuse}.onnx"
    argv = ["export", str(student_file / "student.pt"), "--format", "onnx", "--out", str(out)] + (["--fuse"] if fuse else [])
    assert main(argv) == 0
    assert f"wrote {out} (onnx, vgg8" in capsys.readouterr().out
    result = _run_without_kdfast("onnx", out, student_file)
    assert result["modules"] == ["onnxruntime"]  # numpy and ONNX Runtime only: not even torch


def test_plain_format_runs_without_kdfast(student_file):
    out = student_file / "student_plain.pt"
    assert main(["export", str(student_file / "student.pt"), "--format", "plain", "--out", str(out), "--fuse"]) == 0
    _run_without_kdfast("plain", out, student_file)


def test_exported_format_runs_without_kdfast_and_keeps_kdfast_ops_on_request(student_file):
    out = student_file / "student.pt2"
    assert main(["export", str(student_file / "student.pt"), "--format", "exported", "--out", str(out),
                 "--input-shape", "2,1,16,16"]) == 0
    _run_without_kdfast("exported", out, student_file)
    with_ops = student_file / "student_ops.pt2"
    assert main(["export", str(student_file / "student.pt"), "--format", "exported", "--out", str(with_ops),
                 "--kdfast-ops"]) == 0
    from kdfast.export import find_kdfast_ops

    program = torch.export.load(with_ops)
    assert find_kdfast_ops(program)
    x, y = np.load(student_file / "x.npy"), np.load(student_file / "y.npy")
    with torch.no_grad():
        torch.testing.assert_close(program.module()(torch.from_numpy(x)), torch.from_numpy(y), rtol=1e-5, atol=1e-5)


def test_parse_input_shape():
    assert parse_input_shape("1,3,32,32") == (1, 3, 32, 32)
    assert parse_input_shape("8x1x16x16") == (8, 1, 16, 16)
    import argparse

    for bad in ("1,3,32", "1,3,32,0", "a,b,c,d", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="N,C,H,W"):
            parse_input_shape(bad)


@pytest.mark.parametrize("extra,message", [
    (["--format", "onnx", "--input-shape", "1,3,16,16"], "--input-shape 1,3,16,16: example_input dimension 1 (channels) is 3, "
                                                        "but the model's first layer 'block0.0' takes 1 channels"),
    (["--format", "exported"], "must end in .pt2"),
    (["--format", "onnx", "--kdfast-ops"], "--kdfast-ops applies to --format exported only"),
    (["--format", "plain", "--opset", "18"], "--opset applies to --format onnx only"),
])
def test_errors_name_the_argument(student_file, extra, message, capsys):
    assert main(["export", str(student_file / "student.pt"), "--out", str(student_file / "bad.out"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kdfast export: error: ") and message in err, err


def test_bad_input_shape_and_missing_file_exit_2(student_file, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["export", str(student_file / "student.pt"), "--format", "onnx", "--out", "x.onnx", "--input-shape", "1,16,16"])
    assert info.value.code == 2 and "expected four positive ints N,C,H,W" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nope.pt"), "--format", "plain", "--out", str(tmp_path / "p.pt")]) == 2
    assert "MODEL_FILE: checkpoint not found" in capsys.readouterr().err
