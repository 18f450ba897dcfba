"""DDP through torchrun with 2 CPU processes (gloo): both ranks end with identical parameters, equal to a
single-process run with the same global batch. The DDP run is split in two (epoch 1, then a resume from
the rank-0 checkpoint for epoch 2), so the DDP resume path is covered too.

Why this can be exact up to float rounding: the student has no BatchNorm (BN statistics are per-rank
unless SyncBatchNorm, which needs CUDA/NCCL), every loss is a batch mean, and DistributedSampler with the
same seed gives rank r the samples perm[r::2]; so the two ranks' batches at step i are exactly the
single-process batch i of size 8 and the averaged gradient equals the single-process gradient.
"""
import json

import pytest
import torch

from distill_ddp_worker import build
from helpers import load_ranks_assert_identical, run_torchrun


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")
def test_ddp_two_processes_match_single_process(tmp_path):
    run_torchrun("distill_ddp_worker.py", tmp_path)

    r0, r1 = load_ranks_assert_identical(tmp_path, ("student", "hint"))

    # Single process, same global batch (8) and seed.
    single_dir = tmp_path / "single"
    d, loader, student, hint = build(1, str(single_dir))
    assert d.world_size == 1
    history = d.fit(loader, epochs=2)
    for part, module in (("student", student), ("hint", hint)):
        for k, v in module.state_dict().items():
            torch.testing.assert_close(r0[part][k], v, rtol=1e-5, atol=1e-6, msg=f"{part}.{k}")
    # Epoch means are all-reduced across ranks, so they match the single-process means.
    for a, b in zip(r0["history"], history):
        for key in ("loss", "loss/ce", "loss/kd", "loss/hint", "train_accuracy", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key

    # Rank 0 alone wrote the checkpoint and the log (one line per global step, not per rank).
    ckpt = torch.load(tmp_path / "ckpt" / "last.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2 and ckpt["step"] == 8
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["type"] == "step"] == list(range(1, 9))
