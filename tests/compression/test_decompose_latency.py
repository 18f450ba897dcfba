"""decompose(..., keep_dense_if_slower=True): per-layer timing decides dense vs Tucker (tests never
assert timings: the decision rule is tested with controlled timings, the real timing run for
consistency of the report only)."""
import json

import pytest
import torch
from torch import nn

import kdfast
from kdfast import decomposition, models
from kdfast.nn import TuckerConv2d


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
