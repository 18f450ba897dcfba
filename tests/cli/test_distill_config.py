"""kdfast.cli.config: YAML -> validated dict -> (Distiller, loaders) -> run; clear errors."""
import sys
import types

import pytest
import torch
import yaml

import kdfast
from distill_helpers import SoftKL
from kdfast.cli.config import build_from_config, load_config, run_config
from kdfast.cli.config import ConfigError, resolve_loss_class, validate_config

BASE = {
    "seed": 1,
    "epochs": 1,
    "device": "cpu",
    "teacher": {"name": "lenet5"},
    "student": {"name": "lenet5", "width_mult": 0.5},
    "data": {"name": "digits", "batch_size": 128},
    "losses": {"ce": {"type": "cross_entropy", "weight": 0.5}, "kd": {"type": "SoftKL", "weight": 0.5, "T": 2.0}},
    "optimizer": {"name": "sgd", "lr": 0.05},
    "schedule": {"name": "cosine"},
    "log": {"progress": False, "every": 0},
}


@pytest.fixture
def fake_losses(monkeypatch):
    # A stand-in kdfast.losses with the test's own protocol-following classes (checks the lookup by name).
    mod = types.ModuleType("kdfast.losses")
    mod.SoftKL = SoftKL
    # Attribute first: monkeypatch reads the old value, which imports the real module (so undo restores it).
    monkeypatch.setattr(kdfast, "losses", mod)
    monkeypatch.setitem(sys.modules, "kdfast.losses", mod)
    return mod


def _write(tmp_path, cfg, name="run.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_run_config_end_to_end(tmp_path, fake_losses):
    # Stage 1: train the teacher (no teacher, CE only); stage 2: distil from its checkpoint.
    teacher_cfg = dict(BASE, epochs=2, teacher=None, student={"name": "lenet5"},
                       losses={"ce": {"type": "cross_entropy"}}, optimizer={"name": "adam", "lr": 0.003},
                       checkpoint={"dir": str(tmp_path / "teacher")})
    teacher_hist = run_config(_write(tmp_path, teacher_cfg, "teacher.yaml"))
    assert teacher_hist[-1]["eval_accuracy"] > 0.6  # digits: lenet5 reaches ~0.9 after 2-3 epochs
    cfg = dict(BASE, teacher={"name": "lenet5", "weights": str(tmp_path / "teacher" / "last.pt")},
               checkpoint={"dir": str(tmp_path / "ck")}, save_student=str(tmp_path / "student.pt"),
               log={"path": str(tmp_path / "m.jsonl"), "every": 0, "progress": False})
    history = run_config(_write(tmp_path, cfg))
    assert len(history) == 1 and 0.0 <= history[0]["eval_accuracy"] <= 1.0
    assert set(history[0]) >= {"loss/ce", "loss/kd", "eval_loss"}
    state = torch.load(tmp_path / "student.pt", weights_only=True)
    ckpt = torch.load(tmp_path / "ck" / "last.pt", weights_only=True)
    assert state.keys() == ckpt["student"].keys()
    # A kdfast checkpoint works as teacher weights (its "student" entry is the trained model).
    d, (train, test) = build_from_config(cfg)
    teacher_state = torch.load(tmp_path / "teacher" / "last.pt", weights_only=True)["student"]
    for k, v in d.teacher.state_dict().items():
        assert torch.equal(v, teacher_state[k])
    assert d.loss_kinds == {"ce": None, "kd": "logits"} and d.losses["kd"].T == 2.0
    assert len(train.dataset) == 1347 and len(test.dataset) == 450
    # num_classes / in_channels default to the dataset's (digits: 10 classes, 1 channel, 16x16).
    assert d.student(torch.randn(2, 1, 16, 16)).shape == (2, 10)


def test_defaults_and_feature_layers(fake_losses):
    class Feat(torch.nn.Module):
        kdfast_inputs = "features"

        def forward(self, s, t):
            return sum((a.mean() - b.mean()) ** 2 for a, b in zip(s, t))

    fake_losses.FeatLoss = Feat
    cfg = dict(BASE, losses={"f": {"type": "feat", "weight": 2.0, "student_layers": ["conv2"],
                                   "teacher_layers": "conv2"}})
    out = validate_config(cfg)
    assert out["data"]["augment"] is False and out["train"]["grad_clip"] is None and out["checkpoint"] is None
    d, _ = build_from_config(cfg)
    assert d.student_layers == {"f": ["conv2"]} and d.teacher_layers == {"f": ["conv2"]}
    assert d.loss_weights == {"f": 2.0}


def test_resolve_loss_class():
    from kdfast import losses

    assert resolve_loss_class("kd") is losses.KDLoss and resolve_loss_class("NSTLoss") is losses.NSTLoss
    assert resolve_loss_class("hint") is losses.HintLoss
    assert resolve_loss_class("cross_entropy") is torch.nn.CrossEntropyLoss
    assert resolve_loss_class("CrossEntropyLoss") is torch.nn.CrossEntropyLoss
    assert resolve_loss_class("mse") is torch.nn.MSELoss


@pytest.mark.parametrize("mutate,fragment", [
    (lambda c: c.update(epoch=3), r"unknown key 'epoch' in the config; valid keys: seed, epochs"),
    (lambda c: c["data"].update(batchsize=3), r"unknown key 'batchsize' in data; valid keys: name, root, batch_size"),
    (lambda c: c["optimizer"].update(name="lbfgs"), "optimizer.name must be 'sgd' or 'adam'"),
    (lambda c: c["optimizer"].update(lr="fast"), "optimizer.lr must be int or number"),
    (lambda c: c["data"].update(batch_size=True), "data.batch_size must be int"),
    (lambda c: c.pop("student"), "missing required key 'student'"),
    (lambda c: c.update(schedule={"name": "step"}), "schedule.milestones is required"),
    (lambda c: c.update(schedule={"name": "poly"}), "schedule.name must be 'step', 'cosine' or 'cosine_steps'"),
    (lambda c: c.update(amp="fp8"), "amp must be null, 'bf16' or 'fp16'"),
    (lambda c: c.update(epochs=0), "epochs must be >= 1"),
    (lambda c: c.update(student={"width_mult": 0.5}), "student.name is required"),
    (lambda c: c["losses"].update(x={"weight": 1}), "losses.x.type is required"),
    (lambda c: c["losses"].update(x={"type": "kd", "student_layers": ["a"]}), "needs both student_layers and teacher_layers"),
    (lambda c: c.update(checkpoint={"every": 2}), "checkpoint.dir is required"),
    (lambda c: c.update(losses={}), "losses must name at least one loss"),
    (lambda c: c.update(train={"cache_teacher_logits": True}, data={"augment": True}),
     "cache_teacher_logits needs data.augment: false"),
])
def test_bad_configs(tmp_path, mutate, fragment):
    import copy

    cfg = copy.deepcopy(BASE)
    mutate(cfg)
    with pytest.raises(ConfigError, match=fragment):
        load_config(_write(tmp_path, cfg))
    with pytest.raises(ValueError, match=str(tmp_path)):  # the message names the file
        load_config(_write(tmp_path, cfg))


def test_bad_configs_at_build_time(tmp_path, fake_losses):
    with pytest.raises(ConfigError, match=r"unknown loss type 'kdx'; available: .*CrossEntropyLoss.*SoftKL"):
        build_from_config(dict(BASE, losses={"k": {"type": "kdx"}}))
    with pytest.raises(ConfigError, match=r"losses.kd: SoftKL\(tau=4\) failed"):
        build_from_config(dict(BASE, losses={"kd": {"type": "SoftKL", "tau": 4}}))
    with pytest.raises(ConfigError, match="student: unknown model name 'resnet9'"):
        build_from_config(dict(BASE, student={"name": "resnet9"}))
    torch.save({"nope": torch.ones(1)}, tmp_path / "w.pt")
    with pytest.raises(ConfigError, match="teacher.weights .* does not fit lenet5"):
        build_from_config(dict(BASE, teacher={"name": "lenet5", "weights": str(tmp_path / "w.pt")}))


def test_yaml_and_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping at the top level"):
        load_config(bad)


def test_real_kdfast_losses_from_yaml(tmp_path):
    text = """
seed: 0
epochs: 1
device: cpu
teacher: {name: lenet5}
student: {name: lenet5, width_mult: 0.5}
data: {name: digits, batch_size: 256}
losses:
  kd:  {type: KDLoss, temperature: 4, alpha: 0.9}
  nst: {type: nst, weight: 50, student_layers: [conv2], teacher_layers: [conv2]}
  at:  {type: ATLoss, weight: 1, student_layers: [conv1, conv2], teacher_layers: [conv1, conv2]}
optimizer: {name: adam, lr: 0.001}
log: {progress: false, every: 0}
"""
    path = tmp_path / "kd.yaml"
    path.write_text(text)
    d, (train, test) = build_from_config(load_config(path))
    assert type(d.losses["kd"]).__name__ == "KDLoss" and d.losses["kd"].temperature == 4.0
    assert d.loss_weights == {"kd": 1.0, "nst": 50.0, "at": 1.0} and isinstance(d.optimizer, torch.optim.Adam)
    hist = d.fit(train, eval_loader=test)
    assert set(hist[0]) >= {"loss/kd", "loss/nst", "loss/at", "eval_accuracy"}
    assert all(map(lambda v: v == v, (hist[0]["loss/kd"], hist[0]["loss/nst"], hist[0]["loss/at"])))  # not NaN


def test_decomposed_teacher_as_student(monkeypatch):
    import copy

    calls = []

    def fake_decompose(model, **kw):  # stands in for kdfast.decompose (branch tucker-py)
        calls.append(kw)
        student = copy.deepcopy(model)
        student.conv2 = torch.nn.Sequential(torch.nn.Conv2d(student.conv2.in_channels, 3, 1),
                                            torch.nn.Conv2d(3, student.conv2.out_channels, student.conv2.kernel_size))
        return student, "report"

    monkeypatch.setitem(vars(kdfast), "decompose", fake_decompose)
    cfg = dict(BASE, student={"decompose": {"ranks": 0.5}}, losses={"kd": {"type": "cross_entropy"}})
    d, _ = build_from_config(cfg)
    assert calls == [{"ranks": 0.5}]
    assert isinstance(d.student.conv2, torch.nn.Sequential) and d.student is not d.teacher
    assert torch.equal(d.student.conv1.weight, d.teacher.conv1.weight)
    with pytest.raises(ConfigError, match="student.decompose needs a teacher"):
        validate_config(dict(cfg, teacher=None))
    with pytest.raises(ConfigError, match="unknown key 'name' in student with decompose"):
        validate_config(dict(cfg, student={"decompose": {}, "name": "lenet5"}))
