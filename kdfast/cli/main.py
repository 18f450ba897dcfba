"""The ``kdfast`` command line (also ``python -m kdfast``).

    kdfast info [--json]                            what was built: versions, kernels and CUDA path per op
    kdfast demo [--out DIR] [--device cpu|cuda] [--epochs N] [--seed S]
                                                    teacher -> Tucker student -> CE / KD fine-tuning
                                                    -> robustness (kdfast.cli.demo); report in DIR
    kdfast experiment NAME [--dataset D] [--data-root DIR] [--budget quick|full] [--seeds 0,1,2] [--out DIR]
                                                    one source paper's experiment (kdfast.experiments)
    kdfast distill --config run.yaml                a training run described by a YAML file
                                                    (kdfast.cli.config.run_config)
    kdfast robustness --checkpoint FILE [--eps 0,2/255,8/255] [--pgd-steps N] ...
                                                    clean / FGSM / PGD accuracy of a saved model
    kdfast decompose --checkpoint FILE [--ranks evbmf|0.5|R_OUT,R_IN] [--out FILE]
                                                    Tucker-2 decompose a saved model
    kdfast export MODEL_FILE --format plain|exported|onnx --out PATH [--input-shape 1,3,32,32]
                                                    a saved model without kdfast (kdfast.cli.export)

The checkpoints are kdfast model checkpoints (kdfast.model_file: model name + kwargs + Tucker
layer structure + state dict, loadable with torch.load(weights_only=True)); `kdfast demo` and
`kdfast decompose` write them. Bad arguments exit with status 2 and a message naming the argument.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from fractions import Fraction


class CLIError(Exception):
    """A user error found after parsing (bad file, bad value): printed as ``kdfast <cmd>: error: ...``."""


# =============================================================================================== parsing helpers
def _int_at_least(minimum: int, what: str):
    """An argparse type: an int >= ``minimum`` ("a positive integer" for 1, "a non-negative integer" for 0)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_non_negative_int = _int_at_least(0, "a non-negative integer")


def parse_seeds(text: str) -> list:
    """``"0,1,2"`` -> [0, 1, 2]: distinct non-negative integers."""
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated non-negative integers, got {text!r}") from None
    if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct non-negative integers, got {text!r}")
    return seeds


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
    return value


def parse_eps(text: str) -> list[float]:
    """'0,2/255,8/255' or '0 0.01 0.03' -> [0.0, 0.00784..., ...] (fractions allowed)."""
    parts = [p for p in text.replace(",", " ").split() if p]
    if not parts:
        raise argparse.ArgumentTypeError("expected at least one epsilon, e.g. 0,2/255,8/255")
    out = []
    for p in parts:
        try:
            value = float(Fraction(p))
        except (ValueError, ZeroDivisionError):
            raise argparse.ArgumentTypeError(f"bad epsilon {p!r}: expected a number or a fraction such as 8/255") from None
        if value < 0:
            raise argparse.ArgumentTypeError(f"bad epsilon {p!r}: must be >= 0")
        if value > 1:
            raise argparse.ArgumentTypeError(
                f"bad epsilon {p!r}: eps are in pixel units of [0, 1] images, so {value:g} would be "
                f"{value * 255:g}/255 (more than the whole range); did you mean {p}/255?")
        out.append(value)
    return out


def parse_ranks(text: str):
    """'evbmf' | a fraction in (0, 1] such as '0.5' | 'R_OUT,R_IN' (the same pair for every layer)."""
    if text == "evbmf":
        return "evbmf"
    if "," in text:
        parts = text.split(",")
        try:
            pair = tuple(int(p) for p in parts)
        except ValueError:
            pair = ()
        if len(pair) != 2 or min(pair) < 1:
            raise argparse.ArgumentTypeError(f"bad ranks {text!r}: expected 'evbmf', a fraction in (0, 1] or 'R_OUT,R_IN' with positive ints")
        return pair
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad ranks {text!r}: expected 'evbmf', a fraction in (0, 1] or 'R_OUT,R_IN'") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"bad ranks {text!r}: a fraction must be in (0, 1]")
    return value


def _device(text: str) -> str:
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; expected cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"unsupported device {text!r}; expected cpu, cuda or cuda:N")
    return text


def _check_device(device: str) -> None:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--device {device}: CUDA is not available (torch {torch.__version__})")


# =============================================================================================== parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdfast", description="kdfast: fast knowledge distillation for CNNs")
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{info,demo,experiment,distill,robustness,decompose,export}")
    info = sub.add_parser(
        "info",
        help="version, the torch it was built against, compiled kernels per op, the CUDA path of each op",
        description="Build and runtime facts, and per op: the compiled backends, the path CUDA runs by default "
        "('aten': ATen calls only; 'kernel': the hand-written CUDA kernel, only where it is verified on a GPU) "
        "and the path the current KDFAST_CUDA_KERNELS / KDFAST_CPU_KERNELS select.",
    )
    info.add_argument("--json", action="store_true",
                      help='print JSON: {"ops": {"<op>": {..., "cuda_default_path": "aten" | "kernel", '
                      '"cuda_kernel_verified": true | false}}, ...}')

    demo = sub.add_parser(
        "demo",
        help="the tour of every source paper on the embedded digits data, one report",
        description="Trains one teacher on scikit-learn's digits, then runs a compact section per registered "
        "method (kdfast.methods.available()): first the protocol of Sadhukhan et al. (ICIP 2020) (Tucker-2 "
        "decomposition, CE vs KD fine-tuning, FGSM/PGD robustness, parameters, MACs, latency), then each other "
        "paper's method. Writes report.md (a section per paper), results.json, PNGs and checkpoints in --out.",
    )
    demo.add_argument("--out", default="demo-output", help="output directory (default demo-output)")
    demo.add_argument("--device", default="cpu", type=_device, help="cpu (default), cuda or cuda:N")
    demo.add_argument("--epochs", type=_positive_int, default=None,
                      help="teacher epochs; each student is fine-tuned ceil(N/2) epochs (default 12 and 6)")
    demo.add_argument("--seed", type=_non_negative_int, default=0, help="random seed (default 0)")
    demo.add_argument("--model", default=None, help="teacher architecture, a kdfast.models name (default vgg8)")
    demo.add_argument("--width", type=_positive_float, default=None, help="width multiplier of the teacher (default 0.25)")
    demo.add_argument("--ranks", type=parse_ranks, default=None,
                      help="Tucker ranks: evbmf (default), a fraction in (0, 1], or R_OUT,R_IN")
    demo.add_argument("--repeats", type=_positive_int, default=None,
                      help="fine-tuning runs per method with seeds S, S+1, ... (default 3): mean and spread of the comparison")
    demo.add_argument("--latency-batch", type=_positive_int, default=None, help="batch size of the latency measurement (default 64)")
    # Seconds-long run for the test suite: tiny model, data subset, 2-step PGD. Not part of the user interface.
    demo.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)

    from .. import experiments
    from ..experiments.common import BUDGETS, DATASETS

    exp = sub.add_parser(
        "experiment", help="one source paper's experiment (teacher, students, seeds, plots)",
        description="Runs a source paper's experiment (kdfast.experiments) on a dataset and writes report.md, "
        "results.json (with the command that produced it) and PNG plots into --out. Experiments: "
        + ", ".join(experiments.available()) + ".")
    exp.add_argument("name", help="an experiment (" + ", ".join(experiments.available()) + ") or "
                     + ", ".join(experiments.ALIASES) + " (the data-free methods' shared experiment)")
    exp.add_argument("--dataset", choices=DATASETS, default="digits",
                     help="digits (embedded, default), fashion-mnist (default root: the Debian package "
                     "dataset-fashion-mnist), mnist, cifar10 or cifar100 (with --data-root)")
    exp.add_argument("--data-root", default=None, help="directory of the dataset's files")
    exp.add_argument("--budget", choices=BUDGETS, default="quick",
                     help="quick (default: minutes on 2 CPU cores, shows that everything runs) or full (the "
                     "comparison the report is about)")
    exp.add_argument("--seeds", type=parse_seeds, default=None,
                     help="comma-separated seeds, e.g. 0,1,2 (default: the budget's)")
    exp.add_argument("--out", default=None,
                     help="output directory (default experiments/results/<name>-<dataset>-<budget>)")
    exp.add_argument("--device", default="cpu", type=_device, help="cpu (default), cuda or cuda:N")

    distill = sub.add_parser(
        "distill", help="run a distillation described by a YAML config (kdfast.cli.config)",
        description="Trains a student as a YAML file describes it: any registered method (method:, "
        "method_options:) or a weighted sum of losses, on the engine (AMP, torchrun DDP, checkpoints, exact "
        "resume). With save_student, also writes a model checkpoint for `kdfast robustness` / `kdfast decompose`.")
    distill.add_argument("--config", required=True, help="path of the YAML file")
    distill.add_argument("--override", action="store_true",
                         help="resume from the checkpoint folder even though the config changed since the checkpoint "
                         "was written (the new settings apply from the resumed epoch on; same as checkpoint.resume: force)")
    distill.add_argument("--model-out", default=None,
                         help="model checkpoint of the trained student (default: <save_student>_model.pt when the "
                         "config sets save_student)")

    rob = sub.add_parser(
        "robustness", help="clean, FGSM and PGD accuracy of a saved model on its test data",
        description="Evaluates a kdfast model checkpoint on its recorded test data: clean accuracy and accuracy "
        "under white-box L-inf FGSM and PGD attacks at each --eps (pixel units of [0, 1] images).")
    rob.add_argument("--checkpoint", required=True, help="kdfast model checkpoint (.pt)")
    rob.add_argument("--eps", type=parse_eps, default=None,
                     help="L-inf radii in pixel units of [0, 1] images (default 0,1/255,2/255,4/255,8/255)")
    rob.add_argument("--pgd-steps", type=_positive_int, default=10, help="PGD iterations (default 10)")
    rob.add_argument("--step-size", type=_positive_float, default=None, help="PGD step in pixel units (default 2.5 eps / steps)")
    from ..data import NAMES as DATA_NAMES  # light: torch is imported with kdfast already

    rob.add_argument("--data", choices=DATA_NAMES, default=None,
                     help="dataset (default: the one recorded in the checkpoint)")
    rob.add_argument("--root", default=None, help="where the data's files are (default: as recorded; docs/data.md)")
    rob.add_argument("--image-size", type=_positive_int, default=None, help="resize images (default: as recorded)")
    rob.add_argument("--batch-size", type=_positive_int, default=256, help="evaluation batch size (default 256)")
    rob.add_argument("--max-batches", type=_positive_int, default=None, help="evaluate the first N batches only")
    rob.add_argument("--device", default="cpu", type=_device, help="cpu (default), cuda or cuda:N")
    rob.add_argument("--plot", default=None, help="write accuracy vs eps as a PNG here")
    rob.add_argument("--json", default=None, help="write the report as JSON here")
    rob.add_argument("--seed", type=_non_negative_int, default=0, help="seed of PGD's random start (default 0)")
    rob.add_argument("--force", action="store_true",
                     help="evaluate even when the data's channels, image size or number of classes differ from the "
                     "ones the model file records")

    dec = sub.add_parser(
        "decompose", help="Tucker-2 decompose the convolutions of a saved model",
        description="Replaces the convolutions of a kdfast model checkpoint by Tucker-2 layers (HOSVD "
        "initialisation; EVBMF or given ranks) and writes the decomposed model as a new checkpoint.")
    dec.add_argument("--checkpoint", required=True, help="kdfast model checkpoint (.pt)")
    dec.add_argument("--ranks", type=parse_ranks, default="evbmf", help="evbmf (default), a fraction in (0, 1], or R_OUT,R_IN")
    dec.add_argument("--out", default=None, help="output checkpoint (default: <checkpoint>_tucker.pt)")
    dec.add_argument("--eval", action="store_true", help="also report test accuracy before and after (on the recorded data)")
    dec.add_argument("--root", default=None, help="where the data's files are (with --eval; default: as recorded)")
    dec.add_argument("--image-size", type=_positive_int, default=None,
                     help="input size for the MAC counts (default: the one the model file records; needed for "
                     "files that record none)")

    from . import export

    export.add_parser(sub)
    return parser


# =============================================================================================== commands
def cmd_info(args) -> int:
    from .. import info

    print(json.dumps(info.collect_json(), indent=2) if args.json else info.render())
    return 0


def cmd_demo(args) -> int:
    _check_device(args.device)
    if args.model is not None:
        from .. import models

        if args.model.strip().lower() not in models.available():
            raise CLIError(f"--model {args.model!r} is not a kdfast model; available: {', '.join(models.available())}")
    from .demo import main_demo

    return main_demo(args)


def cmd_experiment(args) -> int:
    _check_device(args.device)
    from .. import experiments

    try:
        name = experiments.resolve(args.name)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    if args.data_root is not None and not os.path.isdir(args.data_root):
        raise CLIError(f"--data-root {args.data_root!r}: no such directory")
    if args.data_root is None and args.dataset not in ("digits", "fashion-mnist"):
        raise CLIError(f"--dataset {args.dataset} needs --data-root DIR (the directory of its files)")
    out = args.out or os.path.join("experiments", "results", f"{name}-{args.dataset}-{args.budget}")
    try:
        experiments.get(name).run(out, dataset=args.dataset, data_root=args.data_root, budget=args.budget,
                                  seeds=args.seeds, device=args.device)
    except FileNotFoundError as exc:  # the dataset's files are missing: a user error, not a crash
        raise CLIError(f"--dataset {args.dataset}: {exc}") from None
    print(f"experiment {name}: report {os.path.join(out, 'report.md')}")
    return 0


def cmd_distill(args) -> int:
    if not os.path.isfile(args.config):
        raise CLIError(f"--config {args.config!r}: no such file")
    from . import config

    try:
        cfg = config.load_config(args.config)
        if args.model_out and not cfg.get("save_student"):
            raise CLIError("--model-out needs save_student in the config (the trained student's weights)")
        if args.override:
            if cfg.get("checkpoint") is None:
                raise CLIError("--override resumes from the config's checkpoint.dir, but the config has no checkpoint section")
            cfg["checkpoint"]["resume"] = "force"
        history = config.run_config(cfg, model_out=args.model_out)
    except ValueError as exc:  # ConfigError (and engine errors) name the YAML key at fault
        raise CLIError(str(exc)) from None
    for record in history:
        print(json.dumps(record, default=str))
    if cfg.get("save_student"):
        out = args.model_out or os.path.splitext(cfg["save_student"])[0] + "_model.pt"
        print(f"wrote {cfg['save_student']} (state dict) and {out} (model checkpoint)")
    return 0


def _test_loader(ckpt: dict, args, batch_size: int):
    from .. import data

    recorded = dict(ckpt.get("data") or {})
    name = getattr(args, "data", None) or recorded.get("name")
    if name is None:
        raise CLIError("the checkpoint records no dataset: pass --data (and --root where the files are)")
    root = getattr(args, "root", None) or recorded.get("root")
    image_size = getattr(args, "image_size", None) or recorded.get("image_size")
    try:
        test_set = data.load(name, root=root, split="test", image_size=image_size)
    except (FileNotFoundError, ValueError) as exc:
        raise CLIError(str(exc)) from None
    if not getattr(args, "force", False):
        _check_data_fits(ckpt, test_set, name)
    import torch

    return test_set, torch.utils.data.DataLoader(test_set, batch_size=batch_size, shuffle=False)


def _check_data_fits(ckpt: dict, test_set, name: str) -> None:
    """Refuse data whose channels, image size or class count differ from the model file's (the accuracy
    of a model on data it was not trained for is a meaningless number, not an error the forward would raise)."""
    from .. import model_file

    expected = model_file.input_spec(ckpt)
    found = {"in_channels": test_set.in_channels, "image_size": test_set.image_size, "num_classes": test_set.num_classes}
    differ = [f"{key} {found[key]} (model file: {expected[key]})" for key in found
              if expected[key] is not None and int(expected[key]) != int(found[key])]
    if differ:
        trained = (ckpt.get("data") or {}).get("name")
        raise CLIError(f"the {name!r} test data does not fit the model: {', '.join(differ)}"
                       + (f"; it was trained on {trained!r}" if trained else "")
                       + "; evaluate on that data (--data, --root, --image-size), or pass --force to evaluate anyway")


def _load(path: str):
    from .. import model_file as checkpoint

    try:
        return checkpoint.load_model(path)
    except (FileNotFoundError, ValueError) as exc:
        raise CLIError(f"--checkpoint: {exc}") from None


def cmd_robustness(args) -> int:
    _check_device(args.device)
    from ..robustness import DEFAULT_EPS, robustness_report

    model, ckpt = _load(args.checkpoint)
    test_set, loader = _test_loader(ckpt, args, args.batch_size)
    model = model.to(args.device)
    eps = args.eps if args.eps is not None else list(DEFAULT_EPS)
    try:
        report = robustness_report(
            model, loader, eps=eps, pgd_steps=args.pgd_steps, step_size=args.step_size, clamp=test_set.clamp_range,
            std=test_set.std, plot=args.plot, device=args.device, max_batches=args.max_batches, seed=args.seed,
            name=os.path.basename(args.checkpoint),
        )
    except (ValueError, RuntimeError) as exc:  # the model cannot run on this data (e.g. with --force)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CLIError(f"the model cannot be evaluated on the {test_set.name!r} test data: {first[:300]}") from None
    print(report)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({**report.to_dict(), "checkpoint": args.checkpoint, "data": test_set.name}, fh, indent=1)
    return 0


def cmd_decompose(args) -> int:
    import kdfast

    from .. import cost
    from .. import model_file as checkpoint
    from ..distill import evaluate

    model, ckpt = _load(args.checkpoint)
    if ckpt["tucker"]:
        raise CLIError(f"--checkpoint {args.checkpoint!r} is already Tucker-decomposed ({len(ckpt['tucker'])} layers)")
    data_info = dict(ckpt.get("data") or {})
    spec = checkpoint.input_spec(ckpt)
    size = args.image_size or spec["image_size"]
    if size is None:
        raise CLIError(f"{args.checkpoint} records no input image size: pass --image-size (the size the model was "
                       "trained at) so that MACs are counted at it")
    shape = (1, spec["in_channels"] or 3, size, size)
    before = {"parameters": cost.parameters(model), "macs": cost.macs(model, shape)}
    try:
        student, report = kdfast.decompose(model, ranks=args.ranks, input_shape=shape[1:])
    except (TypeError, ValueError) as exc:
        raise CLIError(f"--ranks {args.ranks!r}: {exc}") from None
    after = {"parameters": cost.parameters(student), "macs": cost.macs(student, shape)}
    print(report)
    if student is model or after["parameters"] == before["parameters"]:
        print(f"warning: no convolution of {args.checkpoint} was decomposed (none matched the selection)",
              file=sys.stderr)
    print(
        f"parameters {before['parameters']:,} -> {after['parameters']:,} ({after['parameters'] / before['parameters']:.2f}x); "
        f"MACs/image at {size}x{size} {before['macs']:,} -> {after['macs']:,} ({after['macs'] / before['macs']:.2f}x)"
    )
    meta = {"decomposed_from": os.path.abspath(args.checkpoint), "ranks": str(args.ranks), "before": before, "after": after}
    if args.eval:
        _, loader = _test_loader(ckpt, args, 256)
        meta["test_accuracy_before"] = evaluate(model, loader, device="cpu")["accuracy"]
        meta["test_accuracy_after"] = evaluate(student, loader, device="cpu")["accuracy"]
        print(f"test accuracy {100 * meta['test_accuracy_before']:.2f}% -> {100 * meta['test_accuracy_after']:.2f}% (before fine-tuning)")
    out = args.out or os.path.splitext(args.checkpoint)[0] + "_tucker.pt"
    checkpoint.save_model(out, student, ckpt["model"], ckpt["model_kwargs"], data_info, meta)
    print(f"wrote {out}")
    return 0


def cmd_export(args) -> int:
    from . import export

    try:
        return export.cmd_export(args)
    except export.CLIError as exc:
        raise CLIError(str(exc)) from None


COMMANDS = {
    "info": cmd_info,
    "demo": cmd_demo,
    "experiment": cmd_experiment,
    "distill": cmd_distill,
    "robustness": cmd_robustness,
    "decompose": cmd_decompose,
    "export": cmd_export,
}


def _subcommand_parser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    for action in parser._actions:  # argparse keeps the subcommands' parsers in its subparsers action
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[command]
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # the subcommand's usage and name, not the top-level ones (exits with status 2)
        _subcommand_parser(parser, args.command).error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return COMMANDS[args.command](args)
    except (CLIError, OSError) as exc:  # OSError: a file the command needed (unreadable, missing, disk full)
        print(f"kdfast {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C: one line (where it stopped, how to resume), status 130
        from ..distill import TrainingInterrupted

        what = exc.describe("run the same command") if isinstance(exc, TrainingInterrupted) else "interrupted"
        print(f"kdfast {args.command}: {what}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
