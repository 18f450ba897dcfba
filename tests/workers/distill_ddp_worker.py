"""Worker for tests/engine/test_ddp.py, launched with ``torchrun --nproc_per_node 2`` (gloo, CPU).

Usage: distill_ddp_worker.py OUT_DIR. Trains epoch 1, then resumes from the checkpoint for epoch 2. Each rank writes OUT_DIR/rank<r>.pt with its trained student and
regressor parameters and its history; rank 0 also writes the checkpoint and metrics log.
"""
import os
import sys

# tests/ (shared helpers) and the test modules this worker reuses, as pytest sees them.
TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, TESTS_DIR)

import torch
from torch import nn
from torch.utils.data import DataLoader

from distill_helpers import HintMSE, SoftKL, models, synthetic
from kdfast.distill import Distiller, FeatureTap

GLOBAL_BATCH = 8


def build(world_size, out_dir, resume=False):
    teacher, student = models(seed=1)
    hint = HintMSE([(8, 16)])
    d = Distiller(teacher, student, {"ce": (nn.CrossEntropyLoss(), 0.5), "kd": (SoftKL(), 0.5), "hint": hint},
                  feature_layers={"hint": (["conv2"], ["conv2"])}, lr=0.1, schedule="step", milestones=[1],
                  seed=7, device="cpu", progress=False, checkpoint_dir=os.path.join(out_dir, "ckpt"),
                  log_path=os.path.join(out_dir, "metrics.jsonl"), log_every=1, resume=resume)
    loader = DataLoader(synthetic(32), batch_size=GLOBAL_BATCH // world_size, shuffle=True)
    return d, loader, student, hint


def main(out_dir):
    torch.set_num_threads(1)
    # Epoch 1 with one Distiller, then a new Distiller (fresh models) resumes from its checkpoint for
    # epoch 2: exercises the DDP resume path (per-rank RNG states, rank-0 checkpoint, barriers).
    first, loader, _, _ = build(int(os.environ["WORLD_SIZE"]), out_dir)
    assert first.world_size == 2 and isinstance(first.model, nn.parallel.DistributedDataParallel)
    first.fit(loader, epochs=1)
    # FeatureTap on the DDP-wrapped module: names with or without the "module." prefix.
    with FeatureTap(first.model, ["module.student.conv1", "student.conv2"]) as tap:
        x = torch.randn(2, 3, 8, 8)
        first.student(x)
        assert torch.equal(tap.features[0], first.student.conv1(x)) and tap.features[1].shape == (2, 8, 4, 4)
    for tap in (first.student_tap, first.teacher_tap):
        tap.remove()
    d, loader, student, hint = build(int(os.environ["WORLD_SIZE"]), out_dir, resume=True)
    history = d.fit(loader, epochs=2)
    assert d.step == 8 and len(history) == 2
    state = {"student": {k: v.clone() for k, v in student.state_dict().items()},
             "hint": {k: v.clone() for k, v in hint.state_dict().items()}, "history": history}
    torch.save(state, os.path.join(out_dir, f"rank{d.rank}.pt"))
    d.close()


if __name__ == "__main__":
    main(sys.argv[1])
