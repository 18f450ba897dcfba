"""Worker for tests/test_resume.py: a 3-epoch run with checkpoints and resume=True.

Usage: distill_resume_worker.py OUT_DIR [KILL_AT_STEP]. With KILL_AT_STEP the process SIGKILLs itself
right after that global optimizer step (a hard crash: no cleanup, no exception handlers run).
At the end it writes OUT_DIR/final.pt with the student and regressor weights.
"""
import os
import signal
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader

from distill_helpers import HintMSE, SoftKL, models, synthetic
from kdfast.distill import Distiller


class KillingDistiller(Distiller):
    kill_at_step = None

    def training_step(self, batch):
        out = super().training_step(batch)
        if self.kill_at_step is not None and self.step + 1 == self.kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)
        return out


def main(out_dir, kill_at=None):
    torch.set_num_threads(1)
    teacher, student = models(seed=2, dropout=0.25)  # dropout: the torch RNG state must be restored
    hint = HintMSE([(4, 8)])
    d = KillingDistiller(teacher, student, {"ce": nn.CrossEntropyLoss(), "kd": (SoftKL(), 0.9), "hint": hint},
                         feature_layers={"hint": ("conv1", "conv1")}, optimizer="sgd", lr=0.05,
                         schedule="step", milestones=[2], seed=11, device="cpu", progress=False,
                         checkpoint_dir=os.path.join(out_dir, "ckpt"), resume=True,
                         log_path=os.path.join(out_dir, "metrics.jsonl"), log_every=1)
    d.kill_at_step = kill_at
    d.fit(DataLoader(synthetic(24), batch_size=6, shuffle=True), epochs=3)
    torch.save({"student": student.state_dict(), "hint": hint.state_dict(), "history": d.history},
               os.path.join(out_dir, "final.pt"))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else None)
