"""Worker of test_kr.py::test_kr_distiller_ddp (run by torchrun, 2 CPU processes, gloo):
one epoch of KRDistiller, then each rank saves its student, aggregators and thresholds."""
import os
import sys

# tests/ (shared helpers) and the test modules this worker reuses, as pytest sees them.
TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [TESTS_DIR] + [os.path.join(TESTS_DIR, d) for d in ["methods"]]

import torch
import torch.nn as nn

from kdfast.methods.kr import KRDistiller
from kdfast.losses import KDLoss
from test_kr import S_LAYERS, T_LAYERS, Student, Teacher, _data


def main(out_dir):
    torch.manual_seed(0)
    d = KRDistiller(Teacher(), Student(), {"ce": nn.CrossEntropyLoss(), "kd": KDLoss(4.0, alpha=1.0)},
                    teacher_layers=T_LAYERS, student_layers=S_LAYERS, example_input=torch.randn(2, 1, 8, 8),
                    device="cpu", lr=0.05, aggregator_lr=0.1, batch_size=4, progress=False, epochs=1,
                    sparse_recoding=dict(boost=2.0, damp=0.5, shrink=0.001, tau_rate=0.1))
    assert d.world_size == 2
    d.fit(_data(16))
    torch.save({"student": d.student.state_dict(), "aggregation": d.aggregation.state_dict(),
                "taus": torch.stack(d.recoding.taus)}, os.path.join(out_dir, f"rank{d.rank}.pt"))
    d.close()


if __name__ == "__main__":
    main(sys.argv[1])
