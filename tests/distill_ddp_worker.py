"""Worker for tests/test_ddp.py, launched with ``torchrun --nproc_per_node 2`` (gloo, CPU).

Usage: distill_ddp_worker.py OUT_DIR. Each rank writes OUT_DIR/rank<r>.pt with its trained student and
regressor parameters and its history; rank 0 also writes the checkpoint and metrics log.
"""
import os
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader

from distill_helpers import HintMSE, SoftKL, models, synthetic
from kdfast.distill import Distiller

GLOBAL_BATCH = 8


def build(world_size, out_dir):
    teacher, student = models(seed=1)
    hint = HintMSE([(8, 16)])
    d = Distiller(teacher, student, {"ce": (nn.CrossEntropyLoss(), 0.5), "kd": (SoftKL(), 0.5), "hint": hint},
                  feature_layers={"hint": (["conv2"], ["conv2"])}, lr=0.1, schedule="step", milestones=[1],
                  seed=7, device="cpu", progress=False, checkpoint_dir=os.path.join(out_dir, "ckpt"),
                  log_path=os.path.join(out_dir, "metrics.jsonl"), log_every=1)
    loader = DataLoader(synthetic(32), batch_size=GLOBAL_BATCH // world_size, shuffle=True)
    return d, loader, student, hint


def main(out_dir):
    torch.set_num_threads(1)
    d, loader, student, hint = build(int(os.environ["WORLD_SIZE"]), out_dir)
    assert d.world_size == 2 and isinstance(d.model, nn.parallel.DistributedDataParallel)
    history = d.fit(loader, epochs=2)
    state = {"student": {k: v.clone() for k, v in student.state_dict().items()},
             "hint": {k: v.clone() for k, v in hint.state_dict().items()}, "history": history}
    torch.save(state, os.path.join(out_dir, f"rank{d.rank}.pt"))
    d.close()


if __name__ == "__main__":
    main(sys.argv[1])
