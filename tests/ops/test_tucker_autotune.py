"""Run-time choice of the CPU Tucker path (csrc/ops/cpu/tucker_cpu_autotune.{h,cpp}, kdfast.backends.tucker):
the first inference call of a key measures the fused kernel against the composition and caches the
faster. Checked here: outputs never change beyond float rounding, cache hits time nothing (the op's
debug counters), the switch and its environment variable, the cache file round trip, the thread
count as part of the key, the envelope default without autotuning, and that fake tensors (torch.compile
tracing) time nothing. No timing is asserted: which path wins is the machine's business."""
import json
import math

import pytest
import torch
from torch import nn

import kdfast
import kdfast.backends.tucker as tucker
from kdfast import ops
from kdfast.testing import reference

# N4 C32 16x16 R16: 6.8 MFLOP, above autotune's kMinFlops (4e6), ~0.1 ms a call.
SHAPE = dict(n=4, c=32, o=32, r_in=16, r_out=16, hw=16)
PATHS = ("fused", "composed")


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
    """Every test starts from an empty cache, autotuning at its default and no forced path."""
    monkeypatch.delenv("KDFAST_TUCKER_CONV_PATH", raising=False)
    monkeypatch.delenv("KDFAST_TUCKER_AUTOTUNE", raising=False)
    monkeypatch.delenv("KDFAST_CPU_KERNELS", raising=False)
    tucker.autotune = None
    tucker.clear_cache()
    _baseline[:] = _raw_counters()
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    tucker.autotune = None
    tucker.clear_cache()


def make_args(n=4, c=32, o=32, r_in=16, r_out=16, hw=16, k=3, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, hw, hw, generator=g, dtype=dtype)
    first = torch.randn(r_in, c, generator=g, dtype=dtype) / math.sqrt(c)
    core = torch.randn(r_out, r_in, k, k, generator=g, dtype=dtype) / math.sqrt(r_in * k * k)
    last = torch.randn(o, r_out, generator=g, dtype=dtype) / math.sqrt(r_out)
    bias = torch.randn(o, generator=g, dtype=dtype)
    return x, first, core, last, bias


_baseline = [0, 0]


def _raw_counters():
    st = tucker.state()
    return [st["tunings"], st["timed_runs"]]


def counters():
    """(measurements, timed runs) since the test began (the op's counters are process-wide)."""
    tunings, timed = _raw_counters()
    return tunings - _baseline[0], timed - _baseline[1]


def call(args, **kw):
    with torch.no_grad():
        return ops.tucker_conv2d(*args, padding=1, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("epilogue", ["none", "bias", "all"])
def test_chosen_path_gives_the_reference_output(dtype, epilogue):
    x, first, core, last, bias = make_args(dtype=dtype)
    kw = {}
    if epilogue != "none":
        kw["bias"] = bias
    if epilogue == "all":
        g = torch.Generator().manual_seed(1)
        kw.update(scale=torch.rand(32, generator=g, dtype=dtype) + 0.5, shift=torch.randn(32, generator=g, dtype=dtype),
                  residual=torch.randn(4, 32, 16, 16, generator=g, dtype=dtype), relu=True)
    args = (x, first, core, last)
    assert ops.tucker_conv2d_path(*args, padding=1, **kw) == "autotune"
    before = counters()[0]
    measured = call(args, **kw)  # first call: measures both paths, returns the winner's output
    assert counters()[0] == before + 1
    chosen = ops.tucker_conv2d_path(*args, padding=1, **kw)
    assert chosen in PATHS
    cached = call(args, **kw)  # a lookup: runs the chosen path
    ref_kw = {k: (v.double() if torch.is_tensor(v) else v) for k, v in kw.items()}
    exact = reference.tucker_conv2d(*[t.double() for t in args], padding=1, **ref_kw)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5 * exact.abs().max().item())
    for out in (measured, cached):
        assert out.shape == exact.shape and out.dtype == dtype and out.is_contiguous()
        torch.testing.assert_close(out.double(), exact, **tol)
    key = next(e for e in tucker.state()["entries"])
    assert key["path"] == chosen and key["source"] == "measured" and key["rounds"] >= 3
    assert key["fused_ms"] > 0 and key["composed_ms"] > 0


def test_second_call_is_a_lookup():
    args = make_args()
    call(args)
    tunings, timed = counters()
    hits = tucker.state()["hits"]
    assert tunings == 1 and timed >= 6  # at least 3 rounds of both paths
    for _ in range(3):
        call(args)
    assert counters() == (tunings, timed), "a cached key must not be timed again"
    assert tucker.state()["hits"] == hits + 3
    # A new key (another batch size) is measured once.
    call(make_args(n=5))
    assert counters()[0] == tunings + 1
    assert len(tucker.state()["entries"]) == 2


def test_key_names_every_field():
    call(make_args()[:4])
    (entry,) = tucker.state()["entries"]
    assert entry["key"] == (f"device=cpu dtype=float32 format=nchw threads={torch.get_num_threads()} N=4 C=32 O=32 "
                            "R_in=16 R_out=16 H=16 W=16 kernel=3x3 stride=1x1 padding=1x1 dilation=1x1 epilogue=none")
    x, first, core, last, bias = make_args()
    call((x.contiguous(memory_format=torch.channels_last), first, core, last), bias=bias, relu=True)
    keys = {e["key"] for e in tucker.state()["entries"]}
    assert any("format=channels_last" in k and k.endswith("epilogue=bias+relu") for k in keys)


def test_thread_count_change_is_a_new_key():
    args = make_args()
    torch.set_num_threads(2)
    call(args)
    tunings = counters()[0]
    torch.set_num_threads(1)
    assert ops.tucker_conv2d_path(*args[:4], padding=1) == "autotune"
    call(args)
    assert counters()[0] == tunings + 1
    threads = sorted(int(e["key"].split("threads=")[1].split()[0]) for e in tucker.state()["entries"])
    assert threads == [1, 2]
    torch.set_num_threads(2)
    call(args)  # back at 2 threads: cached
    assert counters()[0] == tunings + 1


def test_switch_and_environment_variable(monkeypatch):
    args = make_args()
    tucker.autotune = False
    assert tucker.autotune is False and tucker.state()["set_by"] == "kdfast.backends.tucker.autotune"
    assert ops.tucker_conv2d_path(*args[:4], padding=1) in PATHS
    call(args)
    assert counters() == (0, 0) and tucker.state()["entries"] == []
    # The environment variable decides while Python has not set the switch.
    tucker.autotune = None
    monkeypatch.setenv("KDFAST_TUCKER_AUTOTUNE", "0")
    assert tucker.autotune is False and tucker.state()["set_by"] == "KDFAST_TUCKER_AUTOTUNE"
    call(args)
    assert counters() == (0, 0)
    tucker.autotune = True  # Python's setting wins over the variable
    call(args)
    assert counters()[0] == 1
    tucker.autotune = None
    monkeypatch.setenv("KDFAST_TUCKER_AUTOTUNE", "maybe")
    with pytest.raises(ValueError, match="KDFAST_TUCKER_AUTOTUNE='maybe'"):
        call(args)
    with pytest.raises(TypeError, match="bool or None"):
        tucker.autotune = 1


def test_forced_path_wins_over_the_cache(monkeypatch):
    args = make_args()
    call(args)
    for forced in PATHS:
        monkeypatch.setenv("KDFAST_TUCKER_CONV_PATH", forced)
        assert ops.tucker_conv2d_path(*args[:4], padding=1) == forced
    monkeypatch.setenv("KDFAST_TUCKER_CONV_PATH", "fused")
    call(make_args(n=6))
    assert counters()[0] == 1  # a forced call measures nothing


def test_cache_file_round_trip(tmp_path):
    args = make_args()
    call(args)
    call(args[:4], bias=args[4], relu=True)
    saved = tucker.state()["entries"]
    path = tmp_path / "tucker-paths.json"
    assert tucker.save_cache(path) == 2
    data = json.loads(path.read_text())
    assert data["format"] == tucker.FILE_FORMAT and data["machine"]["cpu"] == tucker.cpu_name()
    tucker.clear_cache()
    assert tucker.state()["entries"] == []
    assert tucker.load_cache(path) == 2
    loaded = tucker.state()["entries"]
    assert [(e["key"], e["path"]) for e in loaded] == [(e["key"], e["path"]) for e in saved]
    assert all(e["source"] == "file" for e in loaded)
    before = counters()
    out = call(args)  # answered from the loaded file: nothing timed
    assert counters() == before
    torch.testing.assert_close(out, reference.tucker_conv2d(*args, padding=1), rtol=1e-4, atol=1e-4)


def test_cache_file_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="not a kdfast Tucker path cache"):
        tucker.load_cache(bad)
    bad.write_text("not json")
    with pytest.raises(ValueError, match="not JSON"):
        tucker.load_cache(bad)
    entry = {"key": "device=cpu dtype=float32", "path": "sideways", "fused_ms": 1.0, "composed_ms": 2.0, "rounds": 3}
    bad.write_text(json.dumps({"format": tucker.FILE_FORMAT, "version": 1, "entries": [entry]}))
    with pytest.raises(ValueError, match="entry 0"):
        tucker.load_cache(bad)
    assert tucker.state()["entries"] == []  # nothing half-loaded
    entry["path"] = "composed"
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"format": tucker.FILE_FORMAT, "version": 1, "machine": {"cpu": "some other CPU"},
                                 "entries": [entry]}))
    with pytest.warns(UserWarning, match="measured on 'some other CPU'"):
        assert tucker.load_cache(other) == 1


def test_cache_file_from_environment_at_import(tmp_path):
    import subprocess
    import sys

    call(make_args())
    path = tmp_path / "paths.json"
    tucker.save_cache(path)
    code = ("import kdfast, kdfast.backends.tucker as t; s = t.state(); "
            "print(len(s['entries']), s['entries'][0]['source'])")
    env = dict(__import__("os").environ, KDFAST_TUCKER_CACHE=str(path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["1", "file"]


def test_envelope_default_without_autotuning(no_tucker_autotune):
    """Outside the shapes the table measured, the untuned default is the composition."""
    torch.set_num_threads(2)

    def path(n, c, r, hw, k=3, stride=1, threads=2):
        torch.set_num_threads(threads)
        x, first, core, last = (torch.empty(n, c, hw, hw), torch.empty(r, c), torch.empty(r, r, k, k),
                                torch.empty(c, r))
        return ops.tucker_conv2d_path(x, first, core, last, stride=stride, padding=k // 2)

    assert path(1, 512, 256, 7) == "composed"  # ResNet stage 4 at batch 1: C and N far from any row
    assert path(8, 64, 16, 112) == "composed"  # 112x112: over twice the largest measured image
    assert path(8, 16, 4, 16, k=5) == "composed"  # only 3x3 cores were measured
    assert path(8, 16, 4, 16, stride=2) == "composed"  # only stride 1
    assert path(8, 16, 4, 16, threads=8) == "composed"  # only 1 and 2 threads
    assert path(8, 16, 4, 16) == "fused"  # a measured row where the fused kernel won (3-5x)


def test_small_calls_and_training_are_not_measured():
    tiny = make_args(n=1, c=16, o=16, r_in=4, r_out=4, hw=8)  # ~0.1 MFLOP: below kMinFlops
    assert ops.tucker_conv2d_path(*tiny[:4], padding=1) == "fused"  # one pass beats three library calls
    tucker.autotune = False
    assert ops.tucker_conv2d_path(*tiny[:4], padding=1) == "composed"  # untuned: N1 is outside the envelope
    tucker.autotune = None
    call(tiny)
    args = [t.clone().requires_grad_(True) for t in make_args()]
    y = ops.tucker_conv2d(*args, padding=1)  # training: the composition keeps its intermediates
    y.sum().backward()
    assert counters() == (0, 0)


def test_fake_tensors_time_nothing():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fake = make_args()
        y = ops.tucker_conv2d(*fake, padding=1)
    assert y.shape == (4, 32, 16, 16)
    assert counters() == (0, 0)


def test_torch_compile_measures_on_the_first_real_call_only():
    args = make_args()
    fn = torch.compile(lambda x, a, b, c, d: ops.tucker_conv2d(x, a, b, c, d, padding=1), fullgraph=True)
    with torch.no_grad():
        out = fn(*args)
        assert counters()[0] == 1  # tracing (fake tensors) timed nothing; the compiled call measured once
        fn(*args)
    assert counters()[0] == 1
    torch.testing.assert_close(out, reference.tucker_conv2d(*args, padding=1), rtol=1e-4, atol=1e-4)


def _tiny_resnet_block():
    conv = nn.Conv2d(32, 32, 3, padding=1, bias=False)
    block = nn.Sequential(conv, nn.BatchNorm2d(32), nn.ReLU())
    block.eval()
    return block


def test_fuse_for_inference_example_input_measures_the_fused_layers():
    torch.manual_seed(0)
    model = _tiny_resnet_block()
    student, _ = kdfast.decompose(model, ranks=0.5, min_channels=16, skip_first=False, input_shape=(32, 16, 16))
    x = torch.randn(4, 32, 16, 16)
    fused = kdfast.fuse_for_inference(student, example_input=x)
    (entry,) = tucker.state()["entries"]
    assert entry["key"].endswith("epilogue=bias+relu")  # BN folded into the bias, ReLU fused
    before = counters()
    with torch.no_grad():
        y = fused(x)
    assert counters() == before  # the deployment's first call is a lookup
    with torch.no_grad():
        ref = student.eval()(x)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)


def test_decompose_keep_dense_if_slower_uses_the_cache():
    torch.manual_seed(0)
    model = _tiny_resnet_block()
    _, report = kdfast.decompose(model, ranks=0.5, min_channels=16, skip_first=False, keep_dense_if_slower=True,
                                 example_input=torch.randn(4, 32, 16, 16), timing_rounds=3)
    keys = [e["key"] for e in tucker.state()["entries"]]
    # the layer timing measured the Tucker layer once at its input (with the bias BN folding gives it)
    assert any(k.endswith("epilogue=bias") and " N=4 " in k for k in keys)
    assert len(report.layers) + len(report.kept_dense) == 1


def test_kdfast_info_shows_the_cache():
    from kdfast import info

    call(make_args())
    line = info.collect()["tucker_conv2d autotune"]
    assert line.startswith("on (set by default); 1 cached paths")
    assert info.collect_json()["tucker_autotune"]["entries"][0]["source"] == "measured"
    tucker.autotune = False
    assert info.collect()["tucker_conv2d autotune"].startswith("off (set by kdfast.backends.tucker.autotune)")
