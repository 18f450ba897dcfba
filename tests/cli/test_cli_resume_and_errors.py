"""What a user of `kdfast distill` sees on resume, Ctrl-C and bad input (issue 26): each trap first, as a
new user hit it, then the one line that replaces it."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from kdfast.cli.main import main

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

RUN = {"seed": 0, "epochs": 1, "device": "cpu", "student": {"name": "lenet5"},
       "data": {"name": "digits", "batch_size": 256}, "losses": {"ce": {"type": "cross_entropy"}},
       "optimizer": {"lr": 0.05}, "log": {"progress": False}}


def _yaml(tmp_path, cfg, name="run.yaml"):
    yaml = pytest.importorskip("yaml")
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _with_checkpoints(tmp_path, **changes):
    cfg = {**RUN, "checkpoint": {"dir": str(tmp_path / "ckpt"), "resume": True}}
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            cfg[section] = {**cfg[section], field: value}
        else:
            cfg[section] = value
    return cfg


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _one_error_line(err: str, command: str = "distill") -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"kdfast {command}: "), err
    assert "Traceback" not in err
    return lines[0]


# ============================================================================================ resume
def test_changed_lr_stops_with_the_keys_then_override_resumes(tmp_path, capsys):
    # The trap: changing lr in the YAML and re-running resumed silently with the old lr.
    assert main(["distill", "--config", _yaml(tmp_path, _with_checkpoints(tmp_path))]) == 0
    capsys.readouterr()
    changed = _yaml(tmp_path, _with_checkpoints(tmp_path, optimizer__lr=0.01, epochs=2), "changed.yaml")
    assert main(["distill", "--config", changed]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "epochs 1 -> 2" in line and "optimizer.lr 0.05 -> 0.01" in line
    assert "new checkpoint folder" in line and "--override" in line
    assert main(["distill", "--config", changed, "--override"]) == 0
    err = capsys.readouterr().err
    assert f"resumed from epoch 1, step 6 of {tmp_path / 'ckpt' / 'last.pt'}" in err
    assert torch.load(tmp_path / "ckpt" / "last.pt", weights_only=True)["epoch"] == 2


def test_another_architecture_is_one_line(tmp_path, capsys):
    # The trap: a raw "RuntimeError: Error(s) in loading state_dict ... size mismatch" traceback.
    assert main(["distill", "--config", _yaml(tmp_path, _with_checkpoints(tmp_path))]) == 0
    capsys.readouterr()
    other = _yaml(tmp_path, _with_checkpoints(tmp_path, student={"name": "resnet8", "width_mult": 0.25}), "other.yaml")
    assert main(["distill", "--config", other]) == 2
    assert "student.name 'lenet5' -> 'resnet8'" in _one_error_line(capsys.readouterr().err)
    assert main(["distill", "--config", other, "--override"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "another architecture" in line and "new checkpoint folder" in line


def test_override_needs_a_checkpoint_section(tmp_path, capsys):
    assert main(["distill", "--config", _yaml(tmp_path, RUN), "--override"]) == 2
    assert "no checkpoint section" in _one_error_line(capsys.readouterr().err)


def test_ctrl_c_is_one_line_status_130_and_the_same_command_resumes(tmp_path, capsys, monkeypatch):
    # The trap: Ctrl-C printed a raw KeyboardInterrupt traceback and no hint that re-running resumes.
    from kdfast.distill import Distiller

    step = Distiller.training_step

    def interrupted_in_epoch_2(self, batch):
        if self.step == 8:  # 6 steps per epoch: the third step of epoch 2
            raise KeyboardInterrupt
        return step(self, batch)

    path = _yaml(tmp_path, _with_checkpoints(tmp_path, epochs=3))
    monkeypatch.setattr(Distiller, "training_step", interrupted_in_epoch_2)
    assert main(["distill", "--config", path]) == 130
    line = _one_error_line(capsys.readouterr().err)
    assert line == (f"kdfast distill: interrupted at epoch 2, step 8; run the same command to resume from "
                    f"{tmp_path / 'ckpt' / 'last.pt'}")
    monkeypatch.setattr(Distiller, "training_step", step)
    assert main(["distill", "--config", path]) == 0
    assert f"resumed from epoch 1, step 6 of {tmp_path / 'ckpt' / 'last.pt'}" in capsys.readouterr().err


def test_real_sigint_exits_130_with_one_line(tmp_path):
    # A real Ctrl-C (SIGINT to the process), once the first epoch's checkpoint exists.
    path = _yaml(tmp_path, _with_checkpoints(tmp_path, epochs=200))
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "kdfast", "distill", "--config", path], cwd=str(tmp_path), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "ckpt" / "last.pt").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    line = _one_error_line(err)
    assert line.startswith("kdfast distill: interrupted at epoch ")
    assert line.endswith(f"; run the same command to resume from {tmp_path / 'ckpt' / 'last.pt'}")


# ============================================================================================ errors
def test_wrong_data_root_is_one_line(tmp_path, capsys):
    # The trap: a full FileNotFoundError traceback.
    cfg = {**RUN, "data": {"name": "mnist", "root": str(tmp_path / "no-such-folder"), "batch_size": 64}}
    assert main(["distill", "--config", _yaml(tmp_path, cfg)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "data.root" in line and "no-such-folder" in line and "does not exist" in line


@pytest.mark.parametrize("argv, command, message", [
    (["demo", "--bogus"], "demo", "unrecognized arguments: --bogus"),
    (["experiment", "kd", "--quick"], "experiment", "unrecognized arguments: --quick"),  # the flag before --budget
    (["robustness", "--checkpoint", "x.pt", "--epz", "1"], "robustness", "unrecognized arguments: --epz 1"),
    (["decompose", "--checkpoint", "x.pt", "--ranks", "4,0"], "decompose", "bad ranks '4,0'"),
])
def test_bad_subcommand_argument_prints_the_subcommands_usage(argv, command, message, capsys):
    # The trap: a bad argument to a subcommand printed the top-level usage ("usage: kdfast [-h] {info,...").
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: kdfast {command} ")
    assert err.strip().splitlines()[-1] == f"kdfast {command}: error: " + err.strip().splitlines()[-1].split(": error: ", 1)[1]
    assert message in err.strip().splitlines()[-1]
