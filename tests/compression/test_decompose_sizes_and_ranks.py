"""Decomposition numbers that were silently wrong (issue 26): `decompose` on a YAML-trained model counted
MACs at 32x32 (the model file recorded image_size None); cost.macs took (N, C, H, W) while decompose took
(C, H, W); EVBMF's rounding up to a multiple of 8 gave every layer of a small network the same ranks
(8, 8) and the report did not show what EVBMF had chosen."""
import re

import pytest
import torch
from torch import nn

import kdfast
from kdfast import cost, model_file, models
from kdfast.cli.main import main

pytest.importorskip("tensorly")


# ============================================================================================ image size
@pytest.fixture(scope="module")
def yaml_trained(tmp_path_factory):
    """A model file written by `kdfast distill` from a YAML that leaves data.image_size unset (digits: 16x16)."""
    yaml = pytest.importorskip("yaml")
    tmp = tmp_path_factory.mktemp("yaml_run")
    cfg = {"seed": 0, "epochs": 1, "device": "cpu", "student": {"name": "resnet8", "width_mult": 0.5},
           "data": {"name": "digits", "batch_size": 256}, "losses": {"ce": {"type": "cross_entropy"}},
           "optimizer": {"lr": 0.05}, "log": {"progress": False}, "save_student": str(tmp / "student.pt")}
    (tmp / "run.yaml").write_text(yaml.safe_dump(cfg))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["distill", "--config", str(tmp / "run.yaml")]) == 0
    finally:
        torch.set_num_threads(threads)
    return tmp / "student_model.pt"


def test_yaml_trained_model_file_records_its_real_image_size(yaml_trained):
    assert model_file.read_checkpoint(yaml_trained)["data"]["image_size"] == 16


def test_decompose_command_counts_macs_at_the_recorded_size(yaml_trained, tmp_path, capsys):
    capsys.readouterr()
    assert main(["decompose", "--checkpoint", str(yaml_trained), "--out", str(tmp_path / "t.pt")]) == 0
    out = capsys.readouterr().out
    model, _ = model_file.load_model(yaml_trained)
    macs = cost.macs(model, (1, 16, 16))
    assert f"MACs/image at 16x16 {macs:,} ->" in out and "32x32" not in out


def test_decompose_function_reads_the_size_from_the_loaded_model(yaml_trained):
    model, _ = model_file.load_model(yaml_trained)
    assert model.kdfast_input_shape == (1, 16, 16)
    _, report = kdfast.decompose(model)
    assert report.macs_unit == "per sample"
    _, explicit = kdfast.decompose(model, input_shape=(1, 16, 16))
    assert report.macs_before == explicit.macs_before and report.macs_after == explicit.macs_after


def test_a_file_without_a_size_asks_for_one(yaml_trained, tmp_path, capsys):
    ckpt = model_file.read_checkpoint(yaml_trained)
    old = dict(ckpt, data={"name": "digits", "root": None, "image_size": None})  # written before the fix
    torch.save(old, tmp_path / "old.pt")
    assert main(["decompose", "--checkpoint", str(tmp_path / "old.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kdfast decompose: error:") and "records no input image size: pass --image-size" in err
    assert main(["decompose", "--checkpoint", str(tmp_path / "old.pt"), "--image-size", "16",
                 "--out", str(tmp_path / "t.pt")]) == 0
    assert "MACs/image at 16x16" in capsys.readouterr().out


# ============================================================================================ input_shape
def test_one_input_shape_convention_for_cost_and_decompose():
    torch.manual_seed(0)
    model = models.build("resnet8", num_classes=10, in_channels=3, width_mult=0.5)
    assert cost.macs(model, (3, 16, 16)) == cost.macs(model, (1, 3, 16, 16)) == cost.macs(model, (4, 3, 16, 16))
    _, a = kdfast.decompose(model, ranks=0.5, input_shape=(3, 16, 16))
    _, b = kdfast.decompose(model, ranks=0.5, input_shape=(2, 3, 16, 16))
    assert a.macs_before == b.macs_before and a.macs_after == b.macs_after and a.macs_unit == "per sample"
    for call in (lambda: cost.macs(model, (16,)), lambda: kdfast.decompose(model, input_shape=(16, 16))):
        with pytest.raises(ValueError, match=r"\(C, H, W\) of one image or \(N, C, H, W\) of a batch"):
            call()


# ============================================================================================ EVBMF ranks
def _planted(out_c, in_c, r_out, r_in, seed):
    """A 3x3 kernel of Tucker-2 ranks (r_out, r_in) plus a little noise: EVBMF finds those ranks."""
    g = torch.Generator().manual_seed(seed)
    core = torch.randn(r_out, r_in, 3, 3, generator=g)
    u, v = torch.linalg.qr(torch.randn(out_c, r_out, generator=g))[0], torch.linalg.qr(torch.randn(in_c, r_in, generator=g))[0]
    w = torch.einsum("oi,ij...,cj->oc...", u, core, v)
    return w + 0.002 * torch.randn(w.shape, generator=g)


class Small(nn.Module):
    """A stem and three 32-channel 3x3 convs with planted ranks (3, 5), (5, 3), (6, 6)."""

    RANKS = [(3, 5), (5, 3), (6, 6)]

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 32, 3, padding=1)
        self.convs = nn.Sequential(*[nn.Conv2d(32, 32, 3, padding=1, bias=False) for _ in self.RANKS])
        with torch.no_grad():
            for i, (conv, (ro, ri)) in enumerate(zip(self.convs, self.RANKS)):
                conv.weight.copy_(_planted(32, 32, ro, ri, seed=i))

    def forward(self, x):
        return self.convs(self.stem(x))


def test_default_alignment_keeps_evbmf_ranks_of_small_layers():
    _, report = kdfast.decompose(Small(), input_shape=(1, 8, 8))
    assert [layer.evbmf_ranks for layer in report.layers] == Small.RANKS
    assert [layer.ranks for layer in report.layers] == Small.RANKS  # distinct, as EVBMF chose them
    assert "EVBMF (" not in str(report) and report.to_dict()["layers"][0]["evbmf_ranks"] == [3, 5]


def test_forced_alignment_says_it_collapsed_distinct_ranks():
    # the trap: align=8 (the old default) makes every layer (8, 8) and the report did not say so
    _, report = kdfast.decompose(Small(), input_shape=(1, 8, 8), align=8)
    assert [layer.ranks for layer in report.layers] == [(8, 8)] * 3
    text = str(report)
    assert "(8, 8) EVBMF (3, 5)" in text and "(8, 8) EVBMF (6, 6)" in text
    assert "ranks differ from EVBMF's in 3 of 3 layer(s)" in text
    assert re.search(r"distinct EVBMF ranks became the same ranks: \[\(3, 5\), \(5, 3\), \(6, 6\)\] -> \(8, 8\)", text)
