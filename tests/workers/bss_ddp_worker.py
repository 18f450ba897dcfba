"""Worker of test_bss.py::test_bss_ddp_matches_single_process (torchrun, 2 CPU processes, gloo):
two epochs of BSSDistiller; each rank saves its student, history and BSS statistics."""
import os
import sys

# tests/ (shared helpers) and the test modules this worker reuses, as pytest sees them.
TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [TESTS_DIR] + [os.path.join(TESTS_DIR, d) for d in ["methods"]]

import torch

from test_bss import build_ddp_case


def main(out_dir):
    torch.set_num_threads(1)
    d, loader, student = build_ddp_case(int(os.environ["WORLD_SIZE"]))
    assert d.world_size == 2
    history = d.fit(loader, epochs=2)
    torch.save({"student": {k: v.clone() for k, v in student.state_dict().items()}, "history": history,
                "stats": d.bss_epoch_stats}, os.path.join(out_dir, f"rank{d.rank}.pt"))
    d.close()


if __name__ == "__main__":
    main(sys.argv[1])
