"""Resume traps of the engine (issue 26): a checkpoint records the run's configuration, and resuming with
another one stops naming the keys that differ (unless resume="force"); another architecture is one
ValueError line, not load_state_dict's wall of text; Ctrl-C is a TrainingInterrupted that says where the
run stopped and where it resumes from; a resumed run says from where."""
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from distill_helpers import SoftKL, TinyNet, models, synthetic
from kdfast import methods
from kdfast.distill import Distiller, TrainingInterrupted, load_checkpoint

QUIET = dict(progress=False, device="cpu")


def _engine(ckdir, resume=False, student=None, **kw):
    teacher, default_student = models()
    return Distiller(teacher, student if student is not None else default_student,
                     {"ce": nn.CrossEntropyLoss(), "kd": SoftKL()}, checkpoint_dir=str(ckdir), resume=resume,
                     **{"lr": 0.05, **QUIET, **kw})


def _loader():
    return DataLoader(synthetic(16), batch_size=8, shuffle=True)


def test_checkpoint_records_the_engine_configuration(tmp_path):
    d = _engine(tmp_path, lr=0.02, schedule="step", milestones=[3])
    d.fit(_loader(), epochs=1)
    config = load_checkpoint(tmp_path / "last.pt")["config"]["engine"]
    assert config["lr"] == 0.02 and config["milestones"] == [3] and config["schedule"] == "step"
    assert config["losses"] == {"ce": ["CrossEntropyLoss", 1.0], "kd": ["SoftKL", 1.0]}
    assert torch.load(tmp_path / "last.pt", weights_only=True)["config"] == load_checkpoint(tmp_path / "last.pt")["config"]


def test_changed_lr_stops_naming_the_key_then_force_resumes(tmp_path, capsys):
    # The trap: a run resumed with another lr silently kept the checkpoint's optimizer state (old lr).
    _engine(tmp_path).fit(_loader(), epochs=1)
    with pytest.raises(ValueError) as exc:
        _engine(tmp_path, resume=True, lr=0.01).fit(_loader(), epochs=2)
    message = str(exc.value)
    assert "\n" not in message and "engine.lr 0.05 -> 0.01" in message
    assert "new checkpoint folder" in message and "resume='force'" in message
    d = _engine(tmp_path, resume="force", lr=0.01)
    d.fit(_loader(), epochs=2)
    assert d.resumed_from == (1, 2, str(tmp_path / "last.pt")) and d.epoch == 2
    err = capsys.readouterr().err
    assert f"resumed from epoch 1, step 2 of {tmp_path / 'last.pt'}" in err and "engine.lr 0.05 -> 0.01" in err


def test_same_configuration_resumes_and_says_from_where(tmp_path, capsys):
    _engine(tmp_path).fit(_loader(), epochs=1)
    capsys.readouterr()
    d = _engine(tmp_path, resume=True)
    d.fit(_loader(), epochs=2)  # epochs is a total and may grow
    assert d.epoch == 2
    assert capsys.readouterr().err.strip() == f"resumed from epoch 1, step 2 of {tmp_path / 'last.pt'}"


def test_checkpoint_without_a_configuration_record_still_resumes(tmp_path):
    _engine(tmp_path).fit(_loader(), epochs=1)
    ckpt = load_checkpoint(tmp_path / "last.pt")
    del ckpt["config"]  # written before checkpoints recorded the configuration
    torch.save(ckpt, tmp_path / "last.pt")
    d = _engine(tmp_path, resume=True, lr=0.01)
    d.fit(_loader(), epochs=2)
    assert d.resumed_from[:2] == (1, 2)


def test_another_architecture_is_one_line(tmp_path):
    _engine(tmp_path).fit(_loader(), epochs=1)
    with pytest.raises(ValueError) as exc:
        _engine(tmp_path, resume="force", student=TinyNet(6)).fit(_loader(), epochs=2)
    message = str(exc.value)
    assert "\n" not in message and "another architecture" in message and "size mismatch" in message
    assert "new checkpoint folder" in message


class _InterruptAt(Distiller):
    """Raises KeyboardInterrupt (what Ctrl-C does) before optimizer step ``at`` (1-based)."""

    at = None

    def training_step(self, batch):
        if self.at is not None and self.step + 1 == self.at:
            raise KeyboardInterrupt
        return super().training_step(batch)


def test_ctrl_c_says_where_it_stopped_and_where_to_resume(tmp_path):
    teacher, student = models()
    d = _InterruptAt(teacher, student, {"kd": SoftKL()}, checkpoint_dir=str(tmp_path), resume=True, **QUIET)
    d.at = 4  # second step of epoch 2 (2 steps per epoch)
    with pytest.raises(TrainingInterrupted) as exc:
        d.fit(_loader(), epochs=3)
    assert isinstance(exc.value, KeyboardInterrupt)  # still a KeyboardInterrupt for code that catches those
    assert (exc.value.epoch, exc.value.step, exc.value.checkpoint) == (2, 3, str(tmp_path / "last.pt"))
    assert exc.value.describe("run the same command") == (
        f"interrupted at epoch 2, step 3; run the same command to resume from {tmp_path / 'last.pt'}")
    # before the first checkpoint: nothing to resume from, and the message says so
    d = _InterruptAt(teacher, student, {"kd": SoftKL()}, checkpoint_dir=str(tmp_path / "new"), resume=True, **QUIET)
    d.at = 1
    with pytest.raises(TrainingInterrupted, match="no checkpoint was written yet, so a re-run starts afresh"):
        d.fit(_loader(), epochs=3)


def test_method_options_are_recorded_and_compared(tmp_path):
    teacher, student = models()
    common = dict(checkpoint_dir=str(tmp_path), epochs=1, **QUIET)
    engine = methods.build("kd", teacher, student, temperature=4.0, **common)
    engine.fit(_loader())
    assert load_checkpoint(tmp_path / "last.pt")["config"]["method"]["temperature"] == 4.0
    teacher, student = models()
    with pytest.raises(ValueError, match=r"method.temperature 4.0 -> 2.0"):
        methods.build("kd", teacher, student, temperature=2.0, resume=True, **common).fit(_loader(), epochs=2)
