"""A run killed with SIGKILL in the middle of epoch 2 and restarted with resume=True ends with exactly the
same weights (torch.equal) as an uninterrupted run: the last epoch checkpoint restores model, optimizer,
scheduler and RNG states, and the data order is a function of (seed, epoch) only."""
import json
import os
import signal
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
STEPS_PER_EPOCH = 4  # 24 samples, batch 6


def _run(out_dir, *extra):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, HERE, os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, os.path.join(HERE, "distill_resume_worker.py"), str(out_dir), *map(str, extra)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(tmp_path):
    full = _run(tmp_path / "full")
    assert full.returncode == 0, full.stderr[-3000:]

    run_dir = tmp_path / "killed"
    kill_at = STEPS_PER_EPOCH + 2  # second step of epoch 2 (0-based epoch 1)
    killed = _run(run_dir, kill_at)
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-3000:])
    assert not (run_dir / "final.pt").exists()
    ckpt = torch.load(run_dir / "ckpt" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["step"] == STEPS_PER_EPOCH  # epoch 1 was saved, epoch 2 was lost
    assert [f for f in os.listdir(run_dir / "ckpt") if f != "last.pt"] == []  # no temp files
    steps_before_kill = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()
                         if json.loads(x)["type"] == "step"]
    assert steps_before_kill[-1] == kill_at - 1

    resumed = _run(run_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = torch.load(tmp_path / "full" / "final.pt", weights_only=True)
    b = torch.load(run_dir / "final.pt", weights_only=True)
    for part in ("student", "hint"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs after resume"
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(r["type"] == "resume" and r["epoch"] == 1 for r in records)
