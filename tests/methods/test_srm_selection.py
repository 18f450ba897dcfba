"""SRM's model selection (issue 22): every stage keeps its best state as the official trainers do
(viebboy/SRM cifar100/code/Utility.py: ``knowledge_distil`` by validation accuracy, ``srm_init`` by the
validation loss, ``train_codeword`` by the training loss, each scored at the end of an LR phase), chosen on
the validation split and never on the test set, restored when the stage ends, and kept across a resume."""
import pytest
import torch
from torch import nn

from kdfast import models
from kdfast.distill import evaluate, seed_everything
from kdfast.methods import srm

KW = {"num_classes": 10, "in_channels": 1}


def _data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.TensorDataset(torch.rand(n, 1, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g))


def _loader(n=64, seed=0, batch_size=16, shuffle=True):
    return torch.utils.data.DataLoader(_data(n, seed), batch_size=batch_size, shuffle=shuffle)


class Snapshots(srm.PhasedDistiller):
    """Records the student's state at every epoch end (before selection looks at it)."""

    def on_epoch_end(self, epoch, record):
        self.snapshots = getattr(self, "snapshots", {})
        self.snapshots[epoch + 1] = {k: v.clone() for k, v in self.student.state_dict().items()}
        super().on_epoch_end(epoch, record)


def _engine(val, test_marker=None, at=None, epochs=5, **kw):
    seed_everything(0)
    student = models.build("resnet8", width_mult=0.5, **KW)
    return student, Snapshots(None, student, {"ce": nn.CrossEntropyLoss()}, optimizer="adam", lr=0.05,
                              weight_decay=0.0, epochs=epochs, device="cpu", seed=0, progress=False,
                              selection=srm.Selection("val_accuracy", val, at), **kw)


def test_best_validation_state_is_restored_and_chosen_on_validation_not_test():
    val, test = _loader(48, seed=1, shuffle=False), _loader(48, seed=2, shuffle=False)
    student, engine = _engine(val, at=None)
    history = engine.fit(_loader(), eval_loader=test)
    scores = {r["epoch"] + 1: r["select_val_accuracy"] for r in history}
    assert len(scores) == 5
    best = max(scores, key=lambda e: (scores[e], -e))  # strictly better replaces: the first best is kept
    assert engine.selected == {"epoch": best, "score": scores[best]}
    for k, v in student.state_dict().items():
        assert torch.equal(v, engine.snapshots[best][k]), k
    # the scores are the validation split's accuracy of each epoch's state, not the test set's
    for epoch, state in engine.snapshots.items():
        probe = models.build("resnet8", width_mult=0.5, **KW)
        probe.load_state_dict(state)
        assert scores[epoch] == evaluate(probe, val)["accuracy"]
    assert [r["eval_accuracy"] for r in history] != [scores[e] for e in sorted(scores)]


def test_selection_scores_only_at_the_given_epochs_and_never_sees_the_test_set():
    seen = []

    class Spy:
        """A validation loader that counts its passes."""

        def __init__(self, loader):
            self.loader = loader

        def __iter__(self):
            seen.append(1)
            return iter(self.loader)

    _, engine = _engine(Spy(_loader(32, seed=1, shuffle=False)), at=[2, 5])
    history = engine.fit(_loader(), eval_loader=_loader(32, seed=2, shuffle=False))
    assert [("select_val_accuracy" in r) for r in history] == [False, True, False, False, True]
    assert len(seen) == 2 and engine.selected["epoch"] in (2, 5)


def test_selection_survives_a_resume(tmp_path):
    val = _loader(48, seed=1, shuffle=False)
    ref_student, ref = _engine(val)
    ref.fit(_loader())
    student, first = _engine(val, checkpoint_dir=str(tmp_path), resume=True)
    first.fit(_loader(), epochs=3)  # stopped after 3 of 5 epochs
    student, second = _engine(val, checkpoint_dir=str(tmp_path), resume=True)
    second.fit(_loader())
    assert second.selected == ref.selected
    for k, v in ref_student.state_dict().items():
        assert torch.equal(v, student.state_dict()[k]), k


def test_selection_rejects_bad_settings():
    with pytest.raises(ValueError, match="metric must be one of"):
        srm.Selection("test_accuracy", _loader())
    with pytest.raises(ValueError, match="needs loader"):
        srm.Selection("val_accuracy")
    with pytest.raises(ValueError, match="at must be None or a non-empty list"):
        srm.Selection("train_loss", at=[0])
    student = models.build("resnet8", width_mult=0.5, **KW)
    with pytest.raises(TypeError, match="selection must be"):
        srm.PhasedDistiller(None, student, {"ce": nn.CrossEntropyLoss()}, selection="val", device="cpu")


def test_build_with_a_validation_loader_selects_every_stage_at_its_phase_ends():
    torch.manual_seed(0)
    teacher = models.build("vgg8", width_mult=0.25, **KW).eval().requires_grad_(False)
    student = models.build("resnet8", width_mult=0.5, **KW)
    run = srm.build(teacher, student, input_shape=(1, 16, 16), dictionary_epochs=3, init_epochs=3, kd_epochs=4,
                    val_loader=_loader(32, seed=1, shuffle=False), device="cpu", seed=0, progress=False)
    history = run.fit(_loader())
    metric = {"dictionaries": "train_loss", "matching": "val_loss", "kd": "val_accuracy"}
    for stage, records in history.items():
        scored = [r["epoch"] + 1 for r in records if f"select_{metric[stage]}" in r]
        phases = srm.lr_milestones(len(records), srm.OFFICIAL_PHASES[stage])
        assert scored == phases + [len(records)], stage
        assert run.selected[stage]["epoch"] in scored
    best = min((r["select_train_loss"], r["epoch"]) for r in history["dictionaries"] if "select_train_loss" in r)
    assert run.selected["dictionaries"] == {"epoch": best[1] + 1, "score": best[0]}
    with pytest.raises(ValueError, match="select_every must be"):
        srm.build(teacher, student, input_shape=(1, 16, 16), select_every="step")


def test_without_a_validation_loader_every_stage_keeps_its_last_state():
    torch.manual_seed(0)
    teacher = models.build("vgg8", width_mult=0.25, **KW).eval().requires_grad_(False)
    run = srm.build(teacher, models.build("resnet8", width_mult=0.5, **KW), input_shape=(1, 16, 16),
                    dictionary_epochs=1, init_epochs=1, kd_epochs=1, device="cpu", progress=False)
    run.fit(_loader())
    assert run.selected == {"dictionaries": None, "matching": None, "kd": None}


def test_validation_loss_selection_refuses_cached_teacher_logits():
    student = models.build("resnet8", width_mult=0.5, **KW)
    teacher = models.build("vgg8", width_mult=0.25, **KW).eval()
    from kdfast.losses import KDLoss

    with pytest.raises(ValueError, match="cache_teacher_logits=False"):
        srm.PhasedDistiller(teacher, student, {"kd": KDLoss(4.0)}, cache_teacher_logits=True, device="cpu",
                            selection=srm.Selection("val_loss", _loader()))


def test_number_of_active_codes_is_the_official_rule():
    """lambda = int(D m r) (viebboy/SRM DenseNet.py: int(in_dim * sparsity_multiplier * codeword_multiplier)):
    k = 5, 10, 40 at the official teacher's 128 / 256 / 1024 channels with m = 2, r = 0.02; 0 becomes 1."""
    assert [srm.sparsity(d, 2.0, 0.02) for d in (128, 256, 1024)] == [5, 10, 40]
    assert [srm.sparsity(d) for d in (16, 32, 64, 256)] == [1, 1, 2, 10]
    for d in range(1, 1025):
        for m in (1.5, 2.0, 3.0):
            for r in (0.01, 0.02, 0.03):
                assert srm.sparsity(d, m, r) == max(1, int(d * (r * m))), (d, m, r)
