"""Worker of tests/methods/test_datafree_engine.py: tiny data-free runs with checkpoints (resume tests) or under
torchrun (DDP test).

Usage: datafree_worker.py OUT_DIR METHOD [KILL_AT_STEP [KILL_IN_STAGE]]. METHOD is dafl, dfad or rdskd.
With KILL_AT_STEP the process SIGKILLs itself right after that training step (of stage KILL_IN_STAGE for
rdskd: "generator" or "student"). At the end it writes OUT_DIR/final.pt (single process) or
OUT_DIR/rank<r>.pt (torchrun) with the student, the generator, the history and the first noise batch.
"""
import os
import signal
import sys

# tests/ (shared helpers) and the test modules this worker reuses, as pytest sees them.
TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, TESTS_DIR)

import torch

from kdfast import models
from kdfast.methods import dafl, dfad, rdskd

MODULES = {"dafl": dafl, "dfad": dfad, "rdskd": rdskd}
ENGINES = {"dafl": [dafl.DAFLDistiller], "dfad": [dfad.DFADDistiller],
           "rdskd": [rdskd.RDSKDGeneratorStage, rdskd.RDSKDStudentStage]}
STEPS_PER_EPOCH = 3


def main(out_dir, method, kill_at=None, kill_stage=None):
    first_batch = {}
    for cls in ENGINES[method]:
        orig = cls.training_step

        def step(self, batch, _orig=orig):
            first_batch.setdefault(self.stage, batch.clone())
            out = _orig(self, batch)
            if kill_at is not None and self.step + 1 == kill_at and self.stage == kill_stage:
                os.kill(os.getpid(), signal.SIGKILL)
            return out

        cls.training_step = step
    torch.manual_seed(0)
    teacher = models.build("vgg8", num_classes=4, in_channels=1, width_mult=0.125).eval()
    student = models.build("vgg8", num_classes=4, in_channels=1, width_mult=0.0625)
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    options = dict(latent_dim=8, image_size=8, ngf=4, batch_size=8, steps_per_epoch=STEPS_PER_EPOCH, epochs=3,
                   collapse_warmup=100, device="cpu", seed=3, progress=False, log_every=1)
    if method == "rdskd":
        options.update(generator_epochs=2)
    if not ddp:
        options.update(checkpoint_dir=os.path.join(out_dir, "ckpt"), resume=True,
                       log_path=os.path.join(out_dir, "metrics.jsonl"))
    engine = MODULES[method].build(teacher, student, **options)
    history = engine.fit(None)
    generator = engine.generator
    rank = int(os.environ.get("RANK", "0"))
    name = f"rank{rank}.pt" if ddp else "final.pt"
    if ddp:  # parameters only: BN running statistics are per rank under DDP (rank 0's are checkpointed)
        state = {"student": dict(student.named_parameters()), "generator": dict(generator.named_parameters())}
        state = {part: {k: v.detach() for k, v in d.items()} for part, d in state.items()}
    else:
        state = {"student": student.state_dict(), "generator": generator.state_dict()}
    torch.save({**state, "history": history, "first_batch": first_batch}, os.path.join(out_dir, name))
    engine.close()


if __name__ == "__main__":
    args = sys.argv[1:]
    stage = args[3] if len(args) > 3 and args[3] != "None" else None
    main(args[0], args[1], int(args[2]) if len(args) > 2 else None, stage)
