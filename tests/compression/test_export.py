"""kdfast.export: to_plain equals the kdfast model (float64) on every kdfast model, teacher and EVBMF
student, eager and fused; torch.export works on kdfast models as they are and on their plain form;
ONNX files run in ONNX Runtime (here and in a process that cannot import kdfast) with PyTorch's
outputs; bad layers and bad example inputs get errors naming the layer / dimension."""
import copy
import importlib.util
import json
import operator
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import randomise_bn
from torch import fx, nn

import kdfast
from kdfast import _ext, models
from kdfast.export import ExportError, export_onnx, export_program, find_kdfast_ops, plain_graph_module, to_plain
from kdfast.nn import FusedTuckerConv2d, TuckerConv2d

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUNNER = os.path.join(ROOT, "tests", "workers", "no_kdfast_runner.py")
ONNX_MISSING = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
needs_onnx = pytest.mark.skipif(bool(ONNX_MISSING), reason=f"needs {', '.join(ONNX_MISSING)} (pip install 'kdfast[export]')")


_BUILT: dict = {}  # (name, student, dtype) -> model: EVBMF runs once per model, the variants get copies


def _model(name: str, variant: str, dtype=torch.float64) -> nn.Module:
    """variant: teacher | student (EVBMF ranks) | fused-teacher | fused-student (fuse_for_inference)."""
    key = (name, "student" in variant, dtype)
    if key not in _BUILT:
        torch.manual_seed(0)
        model = randomise_bn(models.build(name)).to(dtype).eval()
        if "student" in variant:
            small = {"min_channels": 1, "skip_first": False} if name == "lenet5" else {}  # LeNet5 has 6/16 channels
            model, report = kdfast.decompose(model, ranks="evbmf", **small)
            assert report.layers
        _BUILT[key] = model.eval()
    model = copy.deepcopy(_BUILT[key])
    if variant.startswith("fused"):
        with pytest.warns(UserWarning, match="could not trace") if name == "lenet5" else _no_warning():
            model = kdfast.fuse_for_inference(model)
    return model.eval()


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _kdfast_layers(model):
    return [n for n, m in model.named_modules() if type(m).__module__.startswith("kdfast.") and
            not type(m).__module__.startswith("kdfast.models")]


def _assert_close_scaled(out, ref, rtol):
    """|out - ref| <= rtol * max|ref|: a deep ResNet at random init has logits in the thousands."""
    err = (out - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= rtol * max(scale, 1.0), f"max |diff| {err:.3g} vs max |ref| {scale:.3g}"


VARIANTS = ("teacher", "student", "fused-teacher", "fused-student")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", models.available())
def test_to_plain_equals_the_kdfast_model(name, variant):
    model = _model(name, variant)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    plain = to_plain(model)
    assert not _kdfast_layers(plain), _kdfast_layers(plain)
    assert plain is not model and plain.training is False
    with torch.no_grad():
        ref, out = model(x), plain(x)
    _assert_close_scaled(out, ref, 1e-10)
    # the original is untouched
    n_tucker = sum(isinstance(m, TuckerConv2d) for m in model.modules())
    assert n_tucker > 0 if "student" in variant else n_tucker == 0
    if "student" in variant:
        seqs = [m for m in plain.modules() if isinstance(m, nn.Sequential) and "core" in m._modules]
        assert len(seqs) == n_tucker


def test_plain_layer_is_the_1x1_kxk_1x1_sequence():
    torch.manual_seed(0)
    layer = TuckerConv2d(8, 12, (3, 5), ranks=(5, 4), stride=(2, 1), padding=(1, 2), dilation=(1, 2)).double()
    plain = to_plain(layer)
    assert [type(m) for m in plain] == [nn.Conv2d] * 3
    first, core, last = plain.first, plain.core, plain.last
    assert (first.kernel_size, first.in_channels, first.out_channels, first.bias) == ((1, 1), 8, 4, None)
    assert (core.kernel_size, core.stride, core.padding, core.dilation) == ((3, 5), (2, 1), (1, 2), (1, 2))
    assert (last.kernel_size, last.out_channels) == ((1, 1), 12) and last.bias is not None
    x = torch.randn(2, 8, 11, 13, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), layer(x), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(plain(x), layer.to_conv()(x), rtol=1e-10, atol=1e-10)


def test_fused_residual_block_becomes_graph_add_and_relu():
    model = _model("resnet20", "fused-student")
    fused_layers = {n: m for n, m in model.named_modules() if isinstance(m, FusedTuckerConv2d)}
    assert any(m.add_residual and m.relu for m in fused_layers.values())
    plain = to_plain(model)
    assert isinstance(plain, fx.GraphModule)
    adds = [n for n in plain.graph.nodes if n.op == "call_function" and n.target is operator.add]
    relus = [n for n in plain.graph.nodes if n.op == "call_function" and n.target is torch.relu]
    assert len(adds) == sum(m.add_residual for m in fused_layers.values()) == 9  # one per BasicBlock
    assert len(relus) == sum(m.add_residual and m.relu for m in fused_layers.values())
    # every module is a torch class, and the state dict holds the three convolutions per Tucker layer
    assert {type(m).__module__.split(".")[0] for m in plain.modules()} == {"torch"}
    keys = set(plain.state_dict())
    assert {"layer1.0.conv2.first.weight", "layer1.0.conv2.core.weight", "layer1.0.conv2.last.weight",
            "layer1.0.conv2.last.bias"} <= keys
    assert not any(k.endswith((".first", ".core", ".last")) for k in keys)
    # the fused model is unchanged (to_plain copies)
    assert isinstance(model.get_submodule("layer1.0.conv2"), FusedTuckerConv2d)


def test_to_plain_inplace_keeps_sharing_and_mode():
    torch.manual_seed(0)
    shared = TuckerConv2d(4, 4, 3, ranks=(2, 2), padding=1)
    model = nn.Sequential(shared, nn.ReLU(), shared).train()
    out = to_plain(model, inplace=True)
    assert out is model and model[0] is model[2] and isinstance(model[0], nn.Sequential)
    assert model.training and model[0].training


def test_state_dict_loads_into_plain_pytorch_without_kdfast(tmp_path):
    """The fused EVBMF student, pickled as a GraphModule of torch modules, runs where kdfast cannot be imported."""
    model = _model("resnet20", "fused-student", dtype=torch.float32)
    gm = plain_graph_module(model)
    torch.save(gm, tmp_path / "plain.pt")
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        np.save(tmp_path / "x.npy", x.numpy())
        np.save(tmp_path / "y.npy", model(x).numpy())
    result = _run_without_kdfast("plain", tmp_path / "plain.pt", tmp_path)
    assert result["max_abs_err"] <= 1e-4 * max(result["max_abs_ref"], 1.0)
    assert "kdfast" not in result["modules"] and result["shape"] == [3, 10]
    # its state dict is the to_plain model's
    assert set(gm.state_dict()) == set(to_plain(model).state_dict())


def _run_without_kdfast(fmt, model_path, data_dir):
    env = {**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, RUNNER, fmt, str(model_path), str(data_dir / "x.npy"), str(data_dir / "y.npy")],
                          capture_output=True, text=True, env=env, cwd=str(data_dir), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------- torch.export
@pytest.mark.parametrize("variant", ["student", "fused-student"])
def test_torch_export_works_on_kdfast_models_as_they_are(variant):
    model = _model("resnet20", variant, dtype=torch.float32)
    x = torch.randn(2, 3, 32, 32)
    program = torch.export.export(model, (x,))  # the plain call, kdfast's fake kernels give the shapes
    assert find_kdfast_ops(program)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x))


@pytest.mark.parametrize("variant", ["student", "fused-student"])
def test_export_program_keeps_kdfast_ops_with_dynamic_batch(variant, tmp_path):
    model = _model("resnet20", variant, dtype=torch.float32)
    program = export_program(model, torch.randn(1, 3, 32, 32))
    ops = find_kdfast_ops(program)
    n_tucker = sum(isinstance(m, TuckerConv2d) for m in model.modules())
    # the inference op (no saved intermediates), once per Tucker layer, located in that layer
    assert [op for _, op in ops] == ["kdfast.tucker_conv2d.default"] * n_tucker
    assert {layer for layer, _ in ops} == {n for n, m in model.named_modules() if isinstance(m, TuckerConv2d)}
    torch.export.save(program, tmp_path / "p.pt2")
    loaded = torch.export.load(tmp_path / "p.pt2")
    x5 = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module()(x5), model(x5), rtol=1e-5, atol=1e-5)


def test_export_program_plain_has_no_kdfast_ops_and_runs_without_kdfast(tmp_path):
    model = _model("vgg8", "fused-student", dtype=torch.float32)
    program = export_program(model, torch.randn(2, 3, 32, 32), plain=True)
    assert not find_kdfast_ops(program)
    torch.export.save(program, tmp_path / "plain.pt2")
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        np.save(tmp_path / "x.npy", x.numpy())
        np.save(tmp_path / "y.npy", model(x).numpy())
    result = _run_without_kdfast("exported", tmp_path / "plain.pt2", tmp_path)
    assert result["max_abs_err"] <= 1e-4 * max(result["max_abs_ref"], 1.0) and "kdfast" not in result["modules"]


def test_export_without_usable_ops_names_to_plain(monkeypatch):
    """Without kdfast's compiled ops (another machine, another torch) the Tucker layers cannot run:
    the error says to export to_plain(model), which needs no compiled op and then exports."""
    model = _model("resnet8", "student", dtype=torch.float32)
    monkeypatch.setattr(_ext, "PROBLEM", "kdfast._C is not built (simulated).")
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ExportError, match=r"to_plain") as info:
        export_program(model, x)
    assert "layer1.0.conv1" in str(info.value) and "simulated" in str(info.value)
    program = export_program(to_plain(model), x)
    assert not find_kdfast_ops(program)


# ----------------------------------------------------------------------------------------- ONNX
@needs_onnx
@pytest.mark.parametrize("name,variant", [("resnet20", "student"), ("resnet20", "fused-student"), ("vgg13", "fused-student"),
                                          ("resnet8", "teacher")])
def test_onnx_runtime_matches_pytorch_with_dynamic_batch(name, variant, tmp_path):
    import onnx

    from kdfast.export import DEFAULT_OPSET, run_onnx

    model = _model(name, variant, dtype=torch.float32)
    path = export_onnx(model, torch.randn(1, 3, 32, 32), tmp_path / "m.onnx")
    proto = onnx.load(path)
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [DEFAULT_OPSET]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert not {n.domain for n in proto.graph.node} - {"", "ai.onnx"}  # standard ops only
    for batch in (1, 7):
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            ref = model(x)
        _assert_close_scaled(torch.from_numpy(run_onnx(path, x)), ref, 1e-5)


@needs_onnx
def test_onnx_static_batch_and_opset(tmp_path):
    import onnx

    model = _model("resnet8", "fused-student", dtype=torch.float32)
    path = export_onnx(model, torch.randn(3, 3, 16, 16), tmp_path / "m.onnx", dynamic_batch=False, opset_version=18)
    proto = onnx.load(path)
    assert [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim] == [3, 3, 16, 16]
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [18]
    with pytest.raises(ValueError, match="opset_version"):
        export_onnx(model, torch.randn(3, 3, 16, 16), tmp_path / "m.onnx", opset_version=11)


@needs_onnx
def test_onnx_of_evbmf_student_runs_without_kdfast_or_torch(tmp_path):
    model = _model("resnet20", "fused-student", dtype=torch.float32)
    path = export_onnx(model, torch.randn(1, 3, 32, 32), tmp_path / "s.onnx")
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        np.save(tmp_path / "x.npy", x.numpy())
        np.save(tmp_path / "y.npy", model(x).numpy())
    result = _run_without_kdfast("onnx", path, tmp_path)
    assert result["modules"] == ["onnxruntime"] and result["shape"] == [5, 10]
    assert result["max_abs_err"] <= 1e-5 * max(result["max_abs_ref"], 1.0)


def test_export_onnx_names_the_missing_extra(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    with pytest.raises(ImportError, match=r"onnxscript.*kdfast\[export\]"):
        export_onnx(nn.Conv2d(3, 4, 3), torch.randn(1, 3, 8, 8), tmp_path / "m.onnx")


# ----------------------------------------------------------------------------------------- bad input
class _Subclass(TuckerConv2d):
    pass


def test_unconvertible_layers_are_named_with_the_reason():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(_Subclass(4, 4, 3, ranks=(2, 2))))
    with pytest.raises(ExportError, match=r"layer '1\.0'.*subclasses kdfast\.nn\.TuckerConv2d"):
        to_plain(model)
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    model.loss = kdfast.losses.KDLoss()
    with pytest.raises(ExportError, match=r"layer 'loss'.*distillation loss"):
        to_plain(model)


class _ResidualInPython(nn.Module):
    """A FusedTuckerConv2d that adds a residual, called from Python code (no fx graph to rewrite)."""

    def __init__(self):
        super().__init__()
        layer = TuckerConv2d(4, 4, 3, ranks=(2, 2), padding=1)
        self.conv = FusedTuckerConv2d.from_tucker(layer, relu=True, add_residual=True)

    def forward(self, x):
        return self.conv(x, x)


def test_residual_layer_outside_a_graph_is_refused():
    with pytest.raises(ExportError, match=r"layer 'conv'.*add_residual=True called from Python code"):
        to_plain(_ResidualInPython())


class _CallsTheOpDirectly(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.first = nn.Parameter(torch.randn(2, 3, generator=g))
        self.core = nn.Parameter(torch.randn(2, 2, 3, 3, generator=g))
        self.last = nn.Parameter(torch.randn(4, 2, generator=g))

    def forward(self, x):
        return kdfast.ops.tucker_conv2d(x, self.first, self.core, self.last, padding=1)


@needs_onnx
def test_onnx_export_names_a_layer_still_calling_kdfast_ops(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 3, 1), _CallsTheOpDirectly())
    with pytest.raises(ExportError, match=r"layer '1' calls kdfast\.tucker_conv2d.*no ONNX translation"):
        export_onnx(model, torch.randn(2, 3, 8, 8), tmp_path / "m.onnx")


def test_example_input_mismatch_names_the_dimension():
    model = _model("resnet8", "student", dtype=torch.float32)
    with pytest.raises(ExportError, match=r"dimension 1 \(channels\) is 1, but the model's first layer 'conv1' takes 3"):
        export_program(model, torch.randn(2, 1, 32, 32))
    with pytest.raises(ExportError, match=r"3 dimensions .* takes 4 \(batch, channels, height, width\)"):
        export_program(model, torch.randn(3, 32, 32))
    with pytest.raises(TypeError, match="floating-point"):
        export_program(model, torch.zeros(2, 3, 32, 32, dtype=torch.int64))
    lenet = models.build("lenet5").eval()  # 5x5 convs and two poolings: 8x8 is too small
    with pytest.raises(ExportError, match=r"in its forward on example_input of shape \(2, 3, 8, 8\).*2 and 3 the height"):
        export_program(lenet, torch.randn(2, 3, 8, 8))
    with pytest.raises(ExportError, match=r"dimension 3 \(width\) is 0"):
        export_program(model, torch.randn(2, 3, 32, 0))
    fixed_size = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))  # needs 8x8 inputs
    with pytest.raises(ExportError, match=r"in layer '2' on example_input of shape \(2, 3, 10, 10\)"):
        export_program(fixed_size, torch.randn(2, 3, 10, 10))
