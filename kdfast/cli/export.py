"""``kdfast export MODEL_FILE --format plain|exported|onnx --out PATH [--input-shape N,C,H,W]``.

Reads a kdfast model checkpoint (kdfast.model_file, written by `kdfast distill` / `kdfast decompose`)
and writes the model for deployment (kdfast.export):

  plain     torch.save of a torch.fx.GraphModule made only of torch.nn modules (kdfast.to_plain, then
            torch.fx.symbolic_trace): ``torch.load(path, weights_only=False)`` returns a runnable
            module in a process that never imports kdfast.
  exported  torch.export.save of the ExportedProgram of the to_plain model (.pt2; torch.export.load,
            no kdfast needed); ``--kdfast-ops`` keeps kdfast's Tucker kernels instead (then loading
            needs ``import kdfast``).
  onnx      kdfast.export_onnx: ONNX (opset 20 unless --opset), dynamic batch, checked in ONNX Runtime.
"""
from __future__ import annotations

import argparse
import os

FORMATS = ("plain", "exported", "onnx")


class CLIError(Exception):
    """A user error of `kdfast export`; kdfast.cli.main prints it as ``kdfast export: error: ...`` (exit 2)."""


def parse_input_shape(text: str) -> tuple:
    """'1,3,32,32' -> (1, 3, 32, 32): four positive ints (batch, channels, height, width)."""
    parts = [p for p in text.replace("x", ",").split(",") if p.strip()]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if len(shape) != 4 or min(shape) < 1:
        raise argparse.ArgumentTypeError(
            f"bad input shape {text!r}: expected four positive ints N,C,H,W (batch, channels, height, width), e.g. 1,3,32,32")
    return shape


def add_parser(sub) -> None:
    exp = sub.add_parser(
        "export", help="write a saved model as plain PyTorch, a torch.export program or ONNX",
        description="Converts a kdfast model checkpoint (from `kdfast distill` or `kdfast decompose`) for deployment "
        "without kdfast: its Tucker layers become 1x1 -> kxk -> 1x1 nn.Conv2d sequences (kdfast.to_plain). "
        "plain: a pickled torch.fx.GraphModule (torch.load(path, weights_only=False)); exported: a torch.export "
        ".pt2 file (torch.export.load); onnx: an ONNX file (opset 20, dynamic batch) checked in ONNX Runtime "
        "(needs pip install 'kdfast[export]').")
    exp.add_argument("model_file", metavar="MODEL_FILE", help="kdfast model checkpoint (.pt)")
    exp.add_argument("--format", required=True, choices=FORMATS, help="plain, exported or onnx")
    exp.add_argument("--out", required=True, help="output file")
    exp.add_argument("--input-shape", type=parse_input_shape, default=None,
                     help="N,C,H,W of the example input (default 1,<in_channels>,<image_size>,<image_size> of the "
                     "checkpoint, 32x32 when it records none); the batch size stays dynamic")
    exp.add_argument("--fuse", action="store_true",
                     help="kdfast.fuse_for_inference first (BatchNorm folded into the convolutions)")
    exp.add_argument("--kdfast-ops", action="store_true",
                     help="with --format exported: keep kdfast's Tucker kernels (loading then needs import kdfast)")
    exp.add_argument("--opset", type=int, default=None, help="ONNX opset (default 20)")


def cmd_export(args) -> int:
    import torch

    from .. import export, fusion, model_file

    if args.kdfast_ops and args.format != "exported":
        raise CLIError("--kdfast-ops applies to --format exported only")
    if args.opset is not None and args.format != "onnx":
        raise CLIError("--opset applies to --format onnx only")
    if args.format == "exported" and not args.out.endswith(".pt2"):
        raise CLIError(f"--out {args.out!r}: a torch.export program file must end in .pt2 (torch.export.load expects it)")
    try:
        model, ckpt = model_file.load_model(args.model_file)
    except (FileNotFoundError, ValueError) as exc:
        raise CLIError(f"MODEL_FILE: {exc}") from None
    shape = args.input_shape
    if shape is None:
        size = (ckpt.get("data") or {}).get("image_size") or 32
        shape = (1, ckpt["model_kwargs"].get("in_channels", 3), size, size)
    example = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    if args.fuse:
        model = fusion.fuse_for_inference(model)
    what = f"--input-shape {','.join(map(str, shape))}"
    try:
        export.check_example_input(model, example)
        if args.format == "plain":
            try:
                traced = export.plain_graph_module(model.eval())
            except Exception as exc:  # noqa: BLE001 - fx raises many types for untraceable forwards
                raise CLIError(f"torch.fx cannot trace {ckpt['model']} ({type(exc).__name__}: {exc}); "
                               "use --format exported") from None
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            torch.save(traced, args.out)
        elif args.format == "exported":
            program = export.export_program(model, example, plain=not args.kdfast_ops)
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            torch.export.save(program, args.out)
        else:
            kwargs = {} if args.opset is None else {"opset_version": args.opset}
            export.export_onnx(model, example, args.out, **kwargs)
    except export.ExportError as exc:
        raise CLIError(f"{what}: {exc}" if "example_input" in str(exc) else str(exc)) from None
    except (ImportError, ValueError) as exc:
        raise CLIError(str(exc)) from None
    print(f"wrote {args.out} ({args.format}, {ckpt['model']}, {len(ckpt['tucker'])} Tucker layers, "
          f"example input {tuple(shape)})")
    return 0
