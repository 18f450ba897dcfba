"""A run killed with SIGKILL in the middle of epoch 2 and restarted with resume=True ends with exactly the
same weights (torch.equal) as an uninterrupted run: the last epoch checkpoint restores model, optimizer,
scheduler and RNG states, and the data order is a function of (seed, epoch) only."""
import json
import os
import signal
import subprocess
import sys

import torch

HERE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "workers")
ROOT = os.path.dirname(os.path.dirname(HERE))
STEPS_PER_EPOCH = 4  # 24 samples, batch 6


def _run(out_dir, *extra, mode="plain"):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, HERE, os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, os.path.join(HERE, "distill_resume_worker.py"), str(out_dir), mode, *map(str, extra)]
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
    steps = [r["step"] for r in records if r["type"] == "step"]
    assert steps == sorted(set(steps)) == list(range(1, 3 * STEPS_PER_EPOCH + 1))  # replayed steps logged once


def _kill_and_resume(tmp_path, mode, kill_at):
    full = _run(tmp_path / "full", mode=mode)
    assert full.returncode == 0, full.stderr[-3000:]
    run_dir = tmp_path / "killed"
    killed = _run(run_dir, kill_at, mode=mode)
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-3000:])
    assert not (run_dir / "final.pt").exists()
    resumed = _run(run_dir, mode=mode)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = torch.load(tmp_path / "full" / "final.pt", weights_only=True)
    b = torch.load(run_dir / "final.pt", weights_only=True)
    return run_dir, a, b


def test_auxiliary_generator_noise_source_sigkill_then_resume_is_exact(tmp_path):
    # An auxiliary trainable (generator with Adam, a step schedule and clipping), noise batches drawn per
    # (seed, epoch, rank), two student steps and one generator step per batch: all resume bit-identically.
    run_dir, a, b = _kill_and_resume(tmp_path, "aux", STEPS_PER_EPOCH + 3)
    for part in ("student", "generator"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs after resume"
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    ckpt = torch.load(run_dir / "ckpt" / "last.pt", weights_only=True)
    assert set(ckpt["auxiliaries"]["generator"]) == {"module", "optimizer", "scheduler"}
    assert ckpt["auxiliaries"]["generator"]["scheduler"]["last_epoch"] == 3


def test_staged_run_sigkill_in_second_stage_then_resume_is_exact(tmp_path):
    run_dir, a, b = _kill_and_resume(tmp_path, "staged", STEPS_PER_EPOCH + 2)
    for part in ("student", "hint"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs after resume"
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    assert [h["loss"] for h in a["hint_history"]] == [h["loss"] for h in b["hint_history"]]
    assert sorted(os.listdir(run_dir / "ckpt")) == ["hint", "kd"]
    assert torch.load(run_dir / "ckpt" / "kd" / "last.pt", weights_only=True)["stage"] == "kd"
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for stage, epochs in (("hint", 2), ("kd", 3)):
        epoch_records = [r["epoch"] for r in records if r["type"] == "epoch" and r.get("stage") == stage]
        assert epoch_records == list(range(epochs)), (stage, epoch_records)


def test_resume_from_truncated_checkpoint_names_the_file(tmp_path):
    import pytest

    from kdfast.distill import load_checkpoint

    bad = tmp_path / "last.pt"
    bad.write_bytes(b"")
    with pytest.raises(ValueError, match=r"cannot read the checkpoint .*last.pt: the file is empty, truncated"):
        load_checkpoint(bad)
    good = tmp_path / "good.pt"
    torch.save({"format": "kdfast.distill/1", "x": torch.ones(100)}, good)
    bad.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ValueError, match="delete it to start afresh"):
        load_checkpoint(bad)
