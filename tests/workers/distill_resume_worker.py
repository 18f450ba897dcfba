"""Worker for tests/engine/test_resume.py: 3-epoch runs with checkpoints and resume=True.

Usage: distill_resume_worker.py OUT_DIR MODE [KILL_AT_STEP]. MODE is
  plain   a student with a hint regressor (a loss module with parameters);
  aux     a data-free style run: an auxiliary generator (Auxiliary), noise batches (NoiseSource), two
          student steps and one generator step per batch, a before_optimizer_step hook;
  staged  two stages (hint, then KD) in one StagedRun; KILL_AT_STEP counts steps of the second stage.
With KILL_AT_STEP the process SIGKILLs itself right after that optimizer step (a hard crash: no cleanup,
no exception handlers run). At the end it writes OUT_DIR/final.pt with the trained weights.
"""
import os
import signal
import sys

# tests/ (shared helpers) and the test modules this worker reuses, as pytest sees them.
TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, TESTS_DIR)

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from distill_helpers import HintMSE, SoftKL, models, synthetic
from kdfast.distill import Auxiliary, Distiller, NoiseSource, Stage, StagedRun


class KillingDistiller(Distiller):
    kill_at_step = None
    kill_in_stage = None

    def training_step(self, batch):
        out = self._step(batch)
        if self.kill_at_step is not None and self.step + 1 == self.kill_at_step and self.stage == self.kill_in_stage:
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    def _step(self, batch):
        return super().training_step(batch)


class TinyGenerator(nn.Module):
    def __init__(self, latent=16):
        super().__init__()
        self.fc = nn.Linear(latent, 3 * 8 * 8)
        self.drop = nn.Dropout(0.1)  # the torch RNG state must be restored

    def forward(self, z):
        return torch.tanh(self.drop(self.fc(z))).view(-1, 3, 8, 8)


class AdversarialDistiller(KillingDistiller):
    """DFAD-shaped: student steps minimise the logit discrepancy on generated images, the generator step
    maximises it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.hook_calls = {"student": 0, "generator": 0}

    def _step(self, z):
        z = z.to(self.device)
        gen = self.auxiliary_model("generator")
        for i in range(2):
            x = gen(z).detach()
            with torch.no_grad():
                t = self.teacher(x)
            s = self.model.student(x)
            loss_s = F.l1_loss(s, t)
            self.backward_step(loss_s, "student", update_scaler=False)
        x = gen(z)
        loss_g = -F.l1_loss(self.student(x), self.teacher(x))
        self.backward_step(loss_g, "generator")
        return {"loss": loss_s.detach(), "parts": {"student": loss_s.detach(), "generator": loss_g.detach()},
                "logits": None, "targets": None}

    def before_optimizer_step(self, name, optimizer):
        self.hook_calls[name] += 1


def _common(out_dir, sub=""):
    return dict(seed=11, device="cpu", progress=False, checkpoint_dir=os.path.join(out_dir, "ckpt", sub) if sub else
                os.path.join(out_dir, "ckpt"), resume=True, log_path=os.path.join(out_dir, "metrics.jsonl"),
                log_every=1)


def main(out_dir, mode, kill_at=None):
    torch.set_num_threads(1)
    teacher, student = models(seed=2, dropout=0.25)  # dropout: the torch RNG state must be restored
    if mode == "plain":
        hint = HintMSE([(4, 8)])
        d = KillingDistiller(teacher, student, {"ce": nn.CrossEntropyLoss(), "kd": (SoftKL(), 0.9), "hint": hint},
                             feature_layers={"hint": ("conv1", "conv1")}, optimizer="sgd", lr=0.05,
                             schedule="step", milestones=[2], **_common(out_dir))
        d.kill_at_step = kill_at
        d.fit(DataLoader(synthetic(24), batch_size=6, shuffle=True), epochs=3)
        final = {"student": student.state_dict(), "hint": hint.state_dict(), "history": d.history}
    elif mode == "aux":
        torch.manual_seed(5)
        generator = TinyGenerator()
        d = AdversarialDistiller(teacher, student, {}, auxiliaries={
            "generator": Auxiliary(generator, optimizer="adam", lr=1e-3, betas=(0.5, 0.999), schedule="step",
                                   milestones=[2], gamma=0.5, grad_clip=1.0)},
            optimizer="sgd", lr=0.05, schedule="cosine", **_common(out_dir))
        d.kill_at_step = kill_at
        d.fit(NoiseSource(6, 16, steps_per_epoch=4), epochs=3)
        assert d.hook_calls["generator"] > 0 and d.hook_calls["student"] == 2 * d.hook_calls["generator"]
        final = {"student": student.state_dict(), "generator": generator.state_dict(), "history": d.history}
    elif mode == "staged":
        hint = HintMSE([(4, 8)])
        data = DataLoader(synthetic(24), batch_size=6, shuffle=True)

        def hint_stage():
            return KillingDistiller(teacher, student, {"hint": hint}, feature_layers={"hint": ("conv1", "conv1")},
                                    optimizer="sgd", lr=0.05, seed=11, device="cpu", progress=False)

        def kd_stage():
            d = KillingDistiller(teacher, student, {"ce": nn.CrossEntropyLoss(), "kd": (SoftKL(), 0.9)},
                                 optimizer="sgd", lr=0.02, schedule="cosine", seed=11, device="cpu", progress=False)
            d.kill_at_step, d.kill_in_stage = kill_at, "kd"
            return d

        run = StagedRun([Stage("hint", 2, hint_stage), Stage("kd", 3, kd_stage)],
                        checkpoint_dir=os.path.join(out_dir, "ckpt"), resume=True,
                        log_path=os.path.join(out_dir, "metrics.jsonl"))
        history = run.fit(data)
        final = {"student": student.state_dict(), "hint": hint.state_dict(), "history": history["kd"],
                 "hint_history": history["hint"]}
    else:
        raise SystemExit(f"unknown mode {mode}")
    torch.save(final, os.path.join(out_dir, "final.pt"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else None)
