"""kdfast.decompose: full-rank decomposition keeps the logits, parameter and MAC counts are right,
selection rules (first conv, 1x1, min_channels, include/exclude, ranks dict), report, bad input; and
keep_dense_if_slower=True: per-layer timing decides dense vs Tucker (tests never assert timings: the
decision rule is tested with controlled timings, the real timing run for consistency of the report only)."""
import json

import pytest
import torch
from torch import nn

import kdfast
from kdfast import decomposition, models
from kdfast.decomposition import DecompositionReport, decompose
from kdfast.nn import TuckerConv2d


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def tucker_names(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, TuckerConv2d))


def randomise_bn(model):
    """Non-trivial BN statistics so that eval-mode logits depend on every layer."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    return model


def test_full_rank_keeps_logits_and_counts_params():
    model = randomise_bn(models.resnet14(num_classes=10)).eval()
    x = torch.randn(3, 3, 16, 16)
    student, report = kdfast.decompose(model, ranks=1.0)
    assert isinstance(report, DecompositionReport)
    with torch.no_grad():
        torch.testing.assert_close(student(x), model(x), rtol=1e-4, atol=1e-4)
    # every 3x3 conv but the stem: 2 per block, 2 blocks per stage, 3 stages
    assert len(report.layers) == 12
    assert tucker_names(student) == sorted(layer.name for layer in report.layers)
    assert report.model_params_before == n_params(model)
    assert report.model_params_after == n_params(student)
    modules = dict(student.named_modules())
    for layer in report.layers:
        m = modules[layer.name]
        o, c = layer.out_channels, layer.in_channels
        r_out, r_in = layer.ranks
        assert (r_out, r_in) == (o, c)
        assert layer.params_after == n_params(m) == r_in * c + r_out * r_in * 9 + o * r_out
        assert layer.params_before == o * c * 9
    assert report.model_params_after - report.model_params_before == report.params_after - report.params_before


def test_original_untouched_unless_inplace():
    model = models.resnet8()
    conv = model.layer1[0].conv1
    student, _ = decompose(model, ranks=0.5)
    assert model.layer1[0].conv1 is conv and isinstance(conv, nn.Conv2d)
    assert isinstance(student.layer1[0].conv1, TuckerConv2d) and student is not model
    same, _ = decompose(model, ranks=0.5, inplace=True)
    assert same is model and isinstance(model.layer1[0].conv1, TuckerConv2d)


def test_selection_rules():
    model = models.resnet8()
    _, report = decompose(model, ranks=0.5)
    skipped = dict(report.skipped)
    assert "fewer than min_channels" in skipped["conv1"]
    assert skipped["layer2.0.downsample.0"] == "1x1 conv"
    assert [l.name for l in report.layers] == [
        "layer1.0.conv1", "layer1.0.conv2", "layer2.0.conv1", "layer2.0.conv2", "layer3.0.conv1", "layer3.0.conv2"
    ]
    # widen: the stem and 1x1 shortcuts too
    _, wide = decompose(model, ranks=1.0, min_channels=1, skip_first=False, skip_1x1=False)
    assert len(wide.layers) == 9 and wide.skipped == []
    # a 16-channel-in stem is still "the first conv" when it is wide enough
    _, first = decompose(models.resnet8(in_channels=16), ranks=0.5)
    assert dict(first.skipped)["conv1"] == "first conv (skip_first=True)"
    _, inc = decompose(model, ranks=0.5, include="layer3.*")
    assert [l.name for l in inc.layers] == ["layer3.0.conv1", "layer3.0.conv2"]
    _, exc = decompose(model, ranks=0.5, exclude=["*.conv2", "layer1.*"])
    assert [l.name for l in exc.layers] == ["layer2.0.conv1", "layer3.0.conv1"]
    _, big = decompose(model, ranks=0.5, min_channels=33)
    assert [l.name for l in big.layers] == ["layer3.0.conv2"]


def test_ranks_dict_and_evbmf_options():
    model = models.resnet8()
    student, report = decompose(model, ranks={"layer3.*": (4, 3), "layer2.*": 0.25})
    by_name = {l.name: l.ranks for l in report.layers}
    assert by_name == {"layer2.0.conv1": (8, 4), "layer2.0.conv2": (8, 8), "layer3.0.conv1": (4, 3), "layer3.0.conv2": (4, 3)}
    assert dict(report.skipped)["layer1.0.conv1"] == "no pattern of the ranks dict matches"
    # random-init kernels are noise to EVBMF: rank 0 -> min_rank, then aligned
    _, ev = decompose(model, ranks="evbmf", min_rank=3, align=1)
    assert all(l.ranks == (3, 3) for l in ev.layers)


def test_macs_per_sample_and_measuring_forward_is_harmless():
    model = models.resnet8().train()
    stats = {n: b.clone() for n, b in model.named_buffers()}
    _, report = decompose(model, ranks=0.5, input_shape=(3, 32, 32))
    assert model.training and all(m.training for m in model.modules())
    for n, b in model.named_buffers():
        assert torch.equal(b, stats[n]), n  # eval-mode probe: BN running stats untouched
    assert report.macs_unit == "per sample"
    layer = {l.name: l for l in report.layers}["layer2.0.conv1"]  # 16 -> 32, stride 2, 32x32 -> 16x16
    assert layer.input_size == (32, 32) and layer.output_size == (16, 16)
    r_out, r_in = layer.ranks
    assert layer.macs_before == 32 * 16 * 9 * 16 * 16
    assert layer.macs_after == r_in * 16 * 32 * 32 + r_out * r_in * 9 * 16 * 16 + 32 * r_out * 16 * 16
    assert report.macs_before == sum(l.macs_before for l in report.layers)
    _, same = decompose(model, ranks=0.5, example_input=torch.randn(2, 3, 32, 32))
    assert [l.macs_after for l in same.layers] == [l.macs_after for l in report.layers]


def test_macs_per_output_pixel_without_input():
    _, report = decompose(models.resnet8(), ranks=0.5)
    assert report.macs_unit == "per output pixel"
    layer = {l.name: l for l in report.layers}["layer2.0.conv1"]
    r_out, r_in = layer.ranks
    assert layer.macs_before == 32 * 16 * 9
    assert layer.macs_after == r_in * 16 * 4 + r_out * r_in * 9 + 32 * r_out  # stride 2: 4 input pixels
    assert report.macs_before is None  # per-pixel counts of different resolutions do not add up


def test_report_text_and_json():
    _, report = decompose(models.resnet8(), ranks=0.5, input_shape=(3, 16, 16))
    text = str(report)
    for needle in ("layer3.0.conv2", "total (decomposed layers)", "model parameters", "skipped: conv1", "per sample"):
        assert needle in text
    d = json.loads(json.dumps(report.to_dict()))
    assert d["totals"]["model_params_after"] == report.model_params_after
    assert d["layers"][0]["flops_before"] == 2 * d["layers"][0]["macs_before"]
    assert d["skipped"][0]["name"] == "conv1"


class Odd(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        shared = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.a = nn.Sequential(shared, nn.ReLU())
        self.b = nn.Sequential(shared)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.reflect = nn.Conv2d(16, 16, 3, padding=1, padding_mode="reflect")
        self.even_same = nn.Conv2d(16, 16, 2, padding="same")

    def forward(self, x):
        x = self.b(self.a(self.stem(x)))
        return self.even_same(self.reflect(self.grouped(x)))


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
def test_unsupported_convs_are_skipped_and_shared_convs_stay_shared():
    model = Odd().eval()
    x = torch.randn(1, 3, 8, 8)
    student, report = decompose(model, ranks=1.0)
    skipped = dict(report.skipped)
    assert skipped["grouped"] == "groups=4"
    assert skipped["reflect"] == "padding_mode='reflect'"
    assert "asymmetric padding" in skipped["even_same"]
    assert [l.name for l in report.layers] == ["a.0"]
    assert isinstance(student.b[0], TuckerConv2d) and student.b[0] is student.a[0]
    with torch.no_grad():
        torch.testing.assert_close(student(x), model(x), rtol=1e-4, atol=1e-4)


def test_decomposed_model_trains_and_state_dict_round_trips():
    model = models.resnet8(num_classes=4)
    student, _ = decompose(model, ranks=(8, 8))
    loss = nn.functional.cross_entropy(student(torch.randn(4, 3, 12, 12)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert all(p.grad is not None for p in student.parameters())
    other, _ = decompose(models.resnet8(num_classes=4), ranks=(8, 8))
    other.load_state_dict(student.state_dict())
    x = torch.randn(2, 3, 12, 12)
    student.eval(), other.eval()
    torch.testing.assert_close(other(x), student(x), rtol=0, atol=0)


def test_bad_arguments():
    model = models.resnet8()
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        decompose("resnet8")
    with pytest.raises(ValueError, match="min_channels must be an int >= 1"):
        decompose(model, min_channels=0)
    with pytest.raises(TypeError, match="include must be None, a str or a list of str"):
        decompose(model, include=3)
    with pytest.raises(TypeError, match="ranks must be 'evbmf', a float"):
        decompose(model, ranks=4)
    with pytest.raises(ValueError, match=r"layer 'layer1.0.conv1': ranks\[0\] \(r_out\) must be in \[1, out_channels=16\]"):
        decompose(model, ranks=(17, 4))
    with pytest.raises(ValueError, match="only apply to ranks='evbmf'"):
        decompose(model, ranks=0.5, align=4)
    with pytest.raises(ValueError, match="input_shape must be \\(C, H, W\\)"):
        decompose(model, input_shape=(32, 32))
    with pytest.raises(ValueError, match="forward pass used to measure MACs failed with input_shape=\\(1, 32, 32\\)"):
        decompose(model, input_shape=(1, 32, 32))
    with pytest.raises(ValueError, match="not both"):
        decompose(model, input_shape=(3, 8, 8), example_input=torch.randn(1, 3, 8, 8))


def test_requires_an_input_to_time_at():
    with pytest.raises(ValueError, match="keep_dense_if_slower=True times each layer at its real input"):
        kdfast.decompose(models.resnet8(), keep_dense_if_slower=True)
    with pytest.raises(TypeError, match="keep_dense_if_slower must be a bool"):
        kdfast.decompose(models.resnet8(), keep_dense_if_slower="yes", input_shape=(3, 8, 8))
    with pytest.raises(ValueError, match="timing_rounds must be an int >= 1"):
        kdfast.decompose(models.resnet8(), keep_dense_if_slower=True, input_shape=(3, 8, 8), timing_rounds=0)


def test_keeps_dense_exactly_where_tucker_is_not_faster(monkeypatch):
    """Controlled timings: layers whose name ends in conv1 are 'slower' as Tucker (and one tie)."""
    timed = []

    def fake_time(conv, layer, spec, rounds):
        timed.append(spec)
        name = next(n for n, m in model.named_modules() if m is conv)
        if name == "layer2.0.conv2":
            return 1.0, 1.0  # a tie: not faster, kept dense
        return (1.0, 2.0) if name.endswith("conv1") else (2.0, 1.0)

    model = models.resnet8(num_classes=10).eval()
    monkeypatch.setattr(decomposition, "_time_layer", fake_time)
    x = torch.randn(4, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    student, report = kdfast.decompose(model, ranks=0.5, example_input=x, keep_dense_if_slower=True, timing_rounds=2,
                                       inplace=True)
    modules = dict(student.named_modules())
    kept = {layer.name for layer in report.kept_dense}
    assert kept == {n for n in modules if n.endswith(".conv1")} | {"layer2.0.conv2"}
    assert all(type(modules[n]) is nn.Conv2d for n in kept)
    assert {layer.name for layer in report.layers} == {n for n, m in modules.items() if isinstance(m, TuckerConv2d)}
    assert all(layer.tucker_ms < layer.dense_ms for layer in report.layers)
    # timed at the real input: batch, channels and size of that layer, channels_last recorded
    assert all(shape[0] == 4 and channels_last for shape, channels_last in timed)
    lat = report.latency
    assert lat["batch"] == 4 and lat["teacher_ms"] > 0 and lat["student_measured_ms"] > 0
    saved = sum(layer.dense_ms - layer.tucker_ms for layer in report.layers)
    assert lat["student_predicted_ms"] == pytest.approx(lat["teacher_ms"] - saved)
    text = str(report)
    assert "kept dense" in text and "model latency" in text
    d = json.loads(json.dumps(report.to_dict()))
    assert len(d["kept_dense"]) == len(kept) and d["latency"]["batch"] == 4


def test_real_timings_give_a_consistent_report():
    model = models.resnet8(num_classes=10).eval()
    student, report = kdfast.decompose(model, ranks=0.5, input_shape=(3, 16, 16), keep_dense_if_slower=True,
                                       timing_rounds=2)
    assert len(report.layers) + len(report.kept_dense) == 6  # every 3x3 conv but the stem
    for layer in [*report.layers, *report.kept_dense]:
        assert layer.dense_ms > 0 and layer.tucker_ms > 0
    assert all(layer.tucker_ms < layer.dense_ms for layer in report.layers)
    assert all(layer.tucker_ms >= layer.dense_ms for layer in report.kept_dense)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():  # the student still computes (a decomposed version of) the model
        assert student(x).shape == model(x).shape


def test_default_report_has_no_latency():
    _, report = kdfast.decompose(models.resnet8(), ranks=0.5, input_shape=(3, 8, 8))
    assert report.latency is None and report.kept_dense == []
    assert all(layer.dense_ms is None for layer in report.layers)
