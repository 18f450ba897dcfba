"""The kdfast command line: the demo end to end at a tiny size, the checkpoint chain
(demo -> robustness / decompose), and clear errors for bad arguments."""
import json
import os
import subprocess
import sys

import pytest
import torch

from kdfast import model_file as checkpoint
from kdfast.cli.main import main, parse_eps, parse_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    # One intra-op thread: the tiny models' ops are too small to gain from two, and on a shared
    # machine two spinning OpenMP threads per op make a seconds-long run take minutes.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["demo", "--tiny", "--epochs", "1", "--out", str(out), "--seed", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def test_demo_writes_report_results_plots_and_checkpoints(demo_dir):
    for name in ("report.md", "results.json", "training_curves.png", "robustness.png", "teacher.pt",
                 "student_decomposed.pt", "student_ce.pt", "student_kd.pt", "student_kd_nst.pt", "student_kd_at.pt"):
        assert (demo_dir / name).is_file(), name
    for png in ("training_curves.png", "robustness.png"):
        assert (demo_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tour = json.loads((demo_dir / "results.json").read_text())
    from kdfast import experiments

    # one section per paper, in the experiments registry's order (one experiment for the data-free methods)
    sections = experiments.available()
    assert list(tour["sections"]) == sections
    assert all(t >= 0 for t in tour["section_time_s"].values())
    results = tour["sections"]["kd"]
    rows = results["models"]
    assert list(rows) == ["teacher", "decomposed", "ce", "kd", "kd_nst", "kd_at"]
    teacher = rows["teacher"]
    for key, row in rows.items():
        assert 0.0 <= row["clean_accuracy"] <= 1.0
        rob = row["robustness"]
        assert rob["eps"][0] == 0 and rob["pgd"][0] == row["clean_accuracy"] == rob["fgsm"][0]
        assert all(p <= row["clean_accuracy"] + 1e-9 for p in rob["pgd"])
        assert row["latency"]["median_ms"] > 0 and row["latency"]["batch"] == 8
        if key != "teacher":  # every student is the Tucker-decomposed teacher: fewer parameters and MACs
            assert row["parameters"] < teacher["parameters"] and row["macs"] < teacher["macs"]
    # the students differ only by their fine-tuning loss: NST/AT terms show up in the histories
    hist = results["history"]
    assert "loss/nst" in hist["kd_nst"][0] and "loss/at" in hist["kd_at"][0] and "loss/kd" in hist["kd"][0]
    # the tiny config fine-tunes each method twice (seeds 1 and 2): the first run is the saved student
    reps = results["repeats"]
    assert list(reps) == ["ce", "kd", "kd_nst", "kd_at"]
    assert all([r["seed"] for r in runs] == [1, 2] for runs in reps.values())
    assert reps["kd"][0]["pgd"] == rows["kd"]["robustness"]["pgd"]
    report = (demo_dir / "report.md").read_text()
    assert "| Tucker + KD |" in report and "| Teacher |" in report and "KD vs CE" in report
    assert "### Over 2 fine-tuning seeds (1, 2;" in report
    for name in sections:  # a section per paper, with its citation
        module = experiments.get(name)
        assert f"## {module.TITLE}" in report and module.PAPER in report
    assert "NaN" not in (demo_dir / "results.json").read_text()


def test_checkpoints_load_weights_only_and_reproduce_accuracy(demo_dir):
    raw = torch.load(demo_dir / "student_kd.pt", weights_only=True)
    assert raw["format"] == checkpoint.MODEL_FORMAT and raw["tucker"] and raw["data"]["name"] == "digits"
    model, ckpt = checkpoint.load_model(demo_dir / "student_kd.pt")
    from kdfast import data
    from kdfast.distill import evaluate
    from kdfast.experiments import common

    # the tiny demo evaluates on a fixed 96-image subset of the test split: the reloaded model
    # must reproduce the accuracy recorded for it, image for image
    test = common.subset(data.load("digits", split="test", image_size=ckpt["data"]["image_size"]), 96)
    loader = torch.utils.data.DataLoader(test, batch_size=256)
    results = json.loads((demo_dir / "results.json").read_text())["sections"]["kd"]
    assert evaluate(model, loader)["accuracy"] == ckpt["meta"]["test_accuracy"]
    assert ckpt["meta"]["test_accuracy"] == results["models"]["kd"]["clean_accuracy"]


def test_robustness_command_on_saved_checkpoint(demo_dir, tmp_path, capsys):
    out_json, out_png = tmp_path / "rob.json", tmp_path / "rob.png"
    rc = main(["robustness", "--checkpoint", str(demo_dir / "teacher.pt"), "--eps", "0,4/255,8/255", "--pgd-steps", "2",
               "--max-batches", "1", "--batch-size", "64", "--json", str(out_json), "--plot", str(out_png)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| eps | clean acc (%) | FGSM acc (%) | PGD acc (%) |" in text
    rep = json.loads(out_json.read_text())
    assert rep["n"] == 64 and rep["eps"] == pytest.approx([0, 4 / 255, 8 / 255]) and len(rep["pgd"]) == 3
    assert out_png.read_bytes()[:4] == b"\x89PNG"


def test_decompose_command_chain(demo_dir, tmp_path, capsys):
    out = tmp_path / "teacher_half.pt"
    assert main(["decompose", "--checkpoint", str(demo_dir / "teacher.pt"), "--ranks", "0.5", "--out", str(out), "--eval"]) == 0
    text = capsys.readouterr().out
    assert "parameters" in text and "test accuracy" in text and f"wrote {out}" in text
    model, ckpt = checkpoint.load_model(out)
    teacher, _ = checkpoint.load_model(demo_dir / "teacher.pt")
    assert ckpt["tucker"] and all(spec["ranks"][0] <= spec["out_channels"] for spec in ckpt["tucker"].values())
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in teacher.parameters())
    assert ckpt["meta"]["before"]["macs"] > ckpt["meta"]["after"]["macs"]
    # the decomposed model chains into the robustness command
    assert main(["robustness", "--checkpoint", str(out), "--eps", "0", "--max-batches", "1", "--pgd-steps", "1"]) == 0
    # an already decomposed checkpoint is refused
    assert main(["decompose", "--checkpoint", str(out)]) == 2
    assert "already Tucker-decomposed" in capsys.readouterr().err


def test_checkpoint_round_trip_with_tucker_layers(tmp_path):
    from kdfast import models
    from kdfast.nn import TuckerConv2d

    torch.manual_seed(0)
    model = models.build("resnet8", num_classes=4, in_channels=1, width_mult=0.5).eval()
    conv = model.layer1[0].conv1
    model.layer1[0].conv1 = TuckerConv2d.from_conv(conv, ranks=(3, 2))
    path = checkpoint.save_model(tmp_path / "m.pt", model, "resnet8", {"num_classes": 4, "in_channels": 1, "width_mult": 0.5})
    loaded, ckpt = checkpoint.load_model(path)
    assert ckpt["tucker"] == {"layer1.0.conv1": checkpoint.tucker_structure(model)["layer1.0.conv1"]}
    x = torch.randn(2, 1, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    assert not any(p.name.startswith(".m.pt.") for p in tmp_path.iterdir())  # atomic write left no temp file


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        checkpoint.load_model(tmp_path / "none.pt")
    torch.save({"format": "kdfast.distill/1", "student": {}}, tmp_path / "train.pt")
    with pytest.raises(ValueError, match="training checkpoint"):
        checkpoint.load_model(tmp_path / "train.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a loadable"):
        checkpoint.load_model(tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="not have"):
        checkpoint.build_model("resnet8", {}, {"layer9.conv": {}})


def test_distill_config_then_robustness(tmp_path, capsys):
    yaml = pytest.importorskip("yaml")
    cfg = {
        "seed": 0, "epochs": 1, "device": "cpu",
        "student": {"name": "resnet8", "width_mult": 0.25},
        "data": {"name": "digits", "batch_size": 128},
        "losses": {"ce": {"type": "CrossEntropyLoss"}},
        "optimizer": {"lr": 0.05},
        "log": {"progress": False},
        "save_student": str(tmp_path / "student.pt"),
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["distill", "--config", str(path)]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert '"type": "epoch"' in out and f"{tmp_path / 'student_model.pt'} (model checkpoint)" in out
    model, ckpt = checkpoint.load_model(tmp_path / "student_model.pt")
    assert ckpt["model"] == "resnet8" and ckpt["model_kwargs"] == {"width_mult": 0.25, "num_classes": 10, "in_channels": 1}
    state = torch.load(tmp_path / "student.pt", weights_only=True)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert main(["robustness", "--checkpoint", str(tmp_path / "student_model.pt"), "--eps", "0,8/255",
                 "--pgd-steps", "1", "--max-batches", "1"]) == 0
    # a config error names the key
    path.write_text(yaml.safe_dump({**cfg, "epochz": 3}))
    assert main(["distill", "--config", str(path)]) == 2
    assert "epochz" in capsys.readouterr().err


# ============================================================================================ errors
@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--epochs", "0"], "--epochs: expected a positive integer"),
        (["demo", "--device", "tpu"], "argument --device: unknown device 'tpu'"),
        (["demo", "--bogus"], "unrecognized arguments: --bogus"),
        (["demo", "--ranks", "1.5"], "a fraction must be in (0, 1]"),
        (["robustness"], "the following arguments are required: --checkpoint"),
        (["robustness", "--checkpoint", "x.pt", "--eps", "1/0"], "bad epsilon '1/0'"),
        (["robustness", "--checkpoint", "x.pt", "--eps", "-0.1"], "must be >= 0"),
        (["robustness", "--checkpoint", "x.pt", "--eps", "2"], "did you mean 2/255?"),
        (["decompose", "--checkpoint", "x.pt", "--ranks", "4,0"], "bad ranks '4,0'"),
        (["distill"], "the following arguments are required: --config"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["experiment", "bss", "--quick"], "unrecognized arguments: --quick"),
        (["experiment", "bss", "--dataset", "svhn"], "argument --dataset: invalid choice: 'svhn'"),
        (["experiment", "bss", "--budget", "huge"], "argument --budget: invalid choice: 'huge'"),
        (["experiment", "bss", "--seeds", "0,x"], "expected comma-separated non-negative integers, got '0,x'"),
        (["experiment", "bss", "--seeds", "1,1"], "expected distinct non-negative integers, got '1,1'"),
    ],
)
def test_bad_arguments_exit_2_with_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["robustness", "--checkpoint", "does-not-exist.pt"], "checkpoint not found: does-not-exist.pt"),
        (["decompose", "--checkpoint", "does-not-exist.pt"], "checkpoint not found"),
        (["distill", "--config", "does-not-exist.yaml"], "no such file"),
        (["demo", "--model", "resnet1000", "--tiny"], "not a kdfast model"),
        (["experiment", "frobnicate"], "unknown experiment 'frobnicate'; experiments: kd, bss, datafree, kr, srm"),
        (["experiment", "bss", "--dataset", "cifar10"], "--dataset cifar10 needs --data-root DIR"),
        (["experiment", "bss", "--dataset", "mnist", "--data-root", "no/such/dir"], "--data-root 'no/such/dir': no such"),
    ],
)
def test_errors_after_parsing_return_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith(f"kdfast {argv[0]}: error:")


def test_robustness_needs_data_files(tmp_path, capsys):
    from kdfast import models

    model = models.build("lenet5", num_classes=10)
    path = checkpoint.save_model(tmp_path / "c.pt", model, "lenet5", {"num_classes": 10}, {"name": "cifar10", "root": str(tmp_path / "nodata")})
    assert main(["robustness", "--checkpoint", path]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_parsers():
    assert parse_eps("0, 2/255 0.5") == pytest.approx([0, 2 / 255, 0.5])
    assert parse_ranks("evbmf") == "evbmf" and parse_ranks("0.25") == 0.25 and parse_ranks("8,4") == (8, 4)


def test_module_entry_point_runs_info():
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "kdfast", "info"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "kd_loss" in proc.stdout and "tucker_conv2d" in proc.stdout


# ============================================================================ YAML runs as a new user writes them
def _yaml_run(tmp_path, cfg, name="run.yaml"):
    yaml = pytest.importorskip("yaml")
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


BASE_RUN = {"seed": 3, "epochs": 1, "device": "cpu", "data": {"name": "digits", "batch_size": 256},
            "optimizer": {"lr": 0.01}, "log": {"progress": False}}


def test_distill_decomposed_student_writes_a_model_checkpoint(tmp_path, capsys):
    from kdfast import models

    teacher = models.build("resnet8", num_classes=10, in_channels=1, width_mult=0.5)
    torch.save(teacher.state_dict(), tmp_path / "teacher.pt")
    cfg = dict(BASE_RUN, method="kd", teacher={"name": "resnet8", "width_mult": 0.5, "weights": "teacher.pt"},
               student={"decompose": {"ranks": 0.5}}, save_student=str(tmp_path / "student.pt"))
    path = _yaml_run(tmp_path, cfg)
    cwd = os.getcwd()
    os.chdir(ROOT)  # weights paths are relative to the YAML file, not the working directory
    try:
        assert main(["distill", "--config", str(path)]) == 0, capsys.readouterr().err
    finally:
        os.chdir(cwd)
    model, ckpt = checkpoint.load_model(tmp_path / "student_model.pt")
    assert ckpt["model"] == "resnet8" and ckpt["tucker"] and ckpt["meta"]["method"] == "kd"
    state = torch.load(tmp_path / "student.pt", weights_only=True)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert main(["robustness", "--checkpoint", str(tmp_path / "student_model.pt"), "--eps", "0,8/255",
                 "--pgd-steps", "1", "--max-batches", "1"]) == 0


def test_yaml_seed_makes_a_from_scratch_student_reproducible(tmp_path):
    from kdfast.cli.config import build_from_config

    cfg = dict(BASE_RUN, student={"name": "lenet5"}, losses={"ce": {"type": "cross_entropy"}})
    a, _ = build_from_config(cfg)
    torch.manual_seed(12345)  # whatever the global RNG was before, the seed decides
    b, _ = build_from_config(cfg)
    assert all(torch.equal(x, y) for x, y in zip(a.student.state_dict().values(), b.student.state_dict().values()))
    a.close()
    b.close()


def test_errors_while_building_a_run_are_one_line_naming_the_yaml_key(tmp_path, capsys):
    from kdfast import models

    good = models.build("lenet5", num_classes=10, in_channels=1)
    torch.save(good.state_dict(), tmp_path / "lenet.pt")
    (tmp_path / "trunc.pt").write_bytes((tmp_path / "lenet.pt").read_bytes()[:100])
    base = dict(BASE_RUN, losses={"kd": {"type": "KDLoss"}}, student={"name": "lenet5"})
    cases = [
        (dict(base, teacher={"name": "lenet5", "weights": "missing.pt"}), "teacher.weights: no such file"),
        (dict(base, teacher={"name": "lenet5", "weights": "trunc.pt"}), "teacher.weights"),
        (dict(base, teacher={"name": "resnet8", "weights": "lenet.pt"}), "weights of another architecture?"),
        (dict(base, teacher={"name": "lenet5"}, losses={"kd": {"type": "nope"}}), "unknown loss type 'nope'"),
        (dict(base, teacher={"name": "lenet5"}, losses={"kd": {"type": "KDLoss", "tau": 2}}), "losses.kd"),
        (dict(base, teacher={"name": "lenet5"}, amp="fp16"), "amp"),
        (dict(base, teacher={"name": "lenet5"}, losses={"at": {"type": "ATLoss"}}),
         "student_layers / teacher_layers"),
        (dict(base, teacher={"name": "lenet5"}, method="kd", method_options={"bogus": 1}), "has no option(s) bogus"),
        (dict(base, teacher={"name": "lenet5"}, method="nope"), "unknown method 'nope'"),
    ]
    for i, (cfg, message) in enumerate(cases):
        path = _yaml_run(tmp_path, cfg, f"run{i}.yaml")
        assert main(["distill", "--config", str(path)]) == 2, message
        err = capsys.readouterr().err
        assert err.startswith("kdfast distill: error:") and message in err, (message, err)
        assert "Traceback" not in err and len(err) < 1500, err
