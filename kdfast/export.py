"""Compressed students leave kdfast: plain PyTorch, torch.export and ONNX.

    plain = kdfast.to_plain(student)                        # only torch.nn layers, same outputs
    program = kdfast.export.export_program(student, x)      # torch.export, kdfast's ops kept
    kdfast.export_onnx(student, x, "student.onnx")          # ONNX (opset 20), dynamic batch size

A kdfast student is a tree of :class:`kdfast.nn.TuckerConv2d` layers (and, after
:func:`kdfast.fuse_for_inference`, :class:`kdfast.nn.FusedTuckerConv2d` layers called from a torch.fx
graph) whose forward calls ``torch.ops.kdfast.tucker_conv2d``: it runs only where kdfast is built.
:func:`to_plain` replaces each one by the sequence it factors, ``nn.Sequential(first=Conv2d 1x1,
core=Conv2d kxk, last=Conv2d 1x1 + bias)`` (Kim et al., ICLR 2016, Sec. 3), so the result runs,
pickles and exports with PyTorch alone. A fused layer keeps its folded BatchNorm in ``last`` and
``bias``; its residual add and ReLU become graph nodes (``operator.add``, ``torch.relu``) of the fx
graph that called it, because an nn.Sequential takes one input.

ONNX goes through the torch.export-based exporter (``torch.onnx.export(..., dynamo=True)``), the
default and recommended one since PyTorch 2.9 (the TorchScript exporter is deprecated). kdfast's
custom ops have no ONNX translation, so :func:`export_onnx` exports ``to_plain(model)``.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import operator
import os
import warnings
from collections import OrderedDict

import torch
from torch import fx, nn

from . import _ext
from .nn import FusedTuckerConv2d, TuckerConv2d

__all__ = ["DEFAULT_OPSET", "ExportError", "check_example_input", "export_onnx", "export_program", "find_kdfast_ops",
           "plain_graph_module", "run_onnx", "to_plain"]

# torch 2.13's default ONNX opset for the torch.export-based exporter (torch.onnx._constants.ONNX_DEFAULT_OPSET);
# stated here so an exported file does not change opset when torch does. ONNX Runtime >= 1.17 runs it.
DEFAULT_OPSET = 20


class ExportError(ValueError):
    """A model (or one of its layers) cannot be converted or exported; the message names the layer."""


# =============================================================================================== to_plain
def _plain_tucker(layer: TuckerConv2d, relu: bool) -> nn.Sequential:
    """The 1x1 -> kxk -> 1x1 nn.Conv2d sequence equal to ``layer`` (with an nn.ReLU when ``relu``)."""
    r_out, r_in = layer.ranks
    factory = {"device": layer.core.device, "dtype": layer.core.dtype}
    first = nn.Conv2d(layer.in_channels, r_in, 1, bias=False, **factory)
    core = nn.Conv2d(r_in, r_out, layer.kernel_size, stride=layer.stride, padding=layer.padding,
                     dilation=layer.dilation, bias=False, **factory)
    last = nn.Conv2d(r_out, layer.out_channels, 1, bias=layer.bias is not None, **factory)
    with torch.no_grad():
        first.weight.copy_(layer.first[:, :, None, None])
        core.weight.copy_(layer.core)
        last.weight.copy_(layer.last[:, :, None, None])
        if layer.bias is not None:
            last.bias.copy_(layer.bias)
    parts = OrderedDict(first=first, core=core, last=last)
    if relu:
        parts["relu"] = nn.ReLU()
    seq = nn.Sequential(parts)
    seq.train(layer.training)
    return seq


def _unconvertible_reason(module: nn.Module) -> str | None:
    cls = type(module)
    if isinstance(module, TuckerConv2d) and cls not in (TuckerConv2d, FusedTuckerConv2d):
        return (f"{cls.__module__}.{cls.__qualname__} subclasses kdfast.nn.TuckerConv2d and may change its forward; "
                "to_plain converts TuckerConv2d and FusedTuckerConv2d only")
    if cls.__module__ == "kdfast.losses":
        return (f"kdfast.losses.{cls.__qualname__} is a distillation loss (its forward calls torch.ops.kdfast.*), "
                "not an inference layer: remove it from the model before exporting")
    return None


def _rewrite_residual_calls(gm: fx.GraphModule, residual_layers: set) -> None:
    """In ``gm``'s graph, ``fused(x, r)`` -> ``relu?(fused(x) + r)``: the residual add and ReLU leave the layer."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        layer = gm.get_submodule(node.target)
        if not isinstance(layer, FusedTuckerConv2d) or not layer.add_residual:
            continue
        if len(node.args) != 2 or node.kwargs:
            raise ExportError(f"layer {node.target!r}: a FusedTuckerConv2d with add_residual=True must be called as "
                              f"layer(x, residual); the graph calls it with args {node.args} kwargs {node.kwargs}")
        x, residual = node.args
        with gm.graph.inserting_before(node):
            out = gm.graph.call_module(node.target, (x,))
            out = gm.graph.call_function(operator.add, (out, residual))
            if layer.relu:
                out = gm.graph.call_function(torch.relu, (out,))
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
        residual_layers.add(id(layer))
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()


def to_plain(model: nn.Module, inplace: bool = False) -> nn.Module:
    """``model`` with every kdfast layer replaced by standard torch.nn modules computing the same function.

    * :class:`~kdfast.nn.TuckerConv2d` -> ``nn.Sequential(first=Conv2d(C, R_in, 1), core=Conv2d(R_in,
      R_out, k, stride, padding, dilation), last=Conv2d(R_out, O, 1, bias))``;
    * :class:`~kdfast.nn.FusedTuckerConv2d` (from :func:`kdfast.fuse_for_inference`): the same
      sequence with its folded BatchNorm in ``last``; its ReLU an ``nn.ReLU`` appended to it, or, where
      it adds a residual, ``relu?(sequence(x) + r)`` as nodes of the torch.fx graph that calls it.

    Every other module is kept. The result computes what ``model`` computes (float rounding apart),
    keeps its training/eval mode, device and dtype, and its ``state_dict`` holds only nn.Conv2d /
    nn.BatchNorm2d / nn.Linear ... entries (a Tucker layer ``name`` becomes ``name.first.weight``,
    ``name.core.weight``, ``name.last.weight`` [, ``name.last.bias``]). A fused model (a
    torch.fx.GraphModule) comes back as a GraphModule of plain torch modules, which ``torch.save``
    pickles and ``torch.load`` reads without kdfast; an eager model keeps its container classes
    (e.g. kdfast.models.CifarResNet), so ``torch.fx.symbolic_trace(to_plain(model))`` is the form
    to pickle for a process without kdfast.

    Args:
        model: an nn.Module. Deep-copied first unless ``inplace=True``.
        inplace: convert ``model`` itself (its kdfast layers are swapped, its graphs rewritten).
    Raises:
        ExportError (a ValueError) naming the layer and the reason when a layer cannot be converted:
        a TuckerConv2d subclass other than FusedTuckerConv2d, a kdfast.losses module, or a
        FusedTuckerConv2d that adds a residual but is called from Python code rather than a torch.fx
        graph (only graphs can be rewritten to take the add out of the layer). A custom module of yours
        that calls ``torch.ops.kdfast.*`` directly is only found by running it:
        :func:`find_kdfast_ops` (which :func:`export_onnx` calls) names it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {type(inplace).__name__}")
    for name, module in model.named_modules(remove_duplicate=False):
        reason = _unconvertible_reason(module)
        if reason is not None:
            raise ExportError(f"to_plain cannot convert layer {name or '<root>'!r}: {reason}")
    if not inplace:
        model = copy.deepcopy(model)

    residual_layers: set = set()
    for gm in [m for m in model.modules() if isinstance(m, fx.GraphModule)]:
        _rewrite_residual_calls(gm, residual_layers)
        # fuse_for_inference's tracer class (kdfast.fusion._Tracer) is kept on the module and its graph
        # and would be pickled with it; torch.fx's default tracer re-traces the same graph.
        if getattr(gm, "_tracer_cls", None) is not None and gm._tracer_cls.__module__.startswith("kdfast"):
            gm._tracer_cls = None
            gm.graph._tracer_cls = None

    if isinstance(model, TuckerConv2d):  # a bare layer: its replacement is the result
        return _replacement(model, "<root>", residual_layers, {})
    plain_of: dict = {}  # id(kdfast layer) -> its replacement (a layer shared by two names stays shared)
    for name, module in list(model.named_modules(remove_duplicate=False)):
        for child_name, child in list(module._modules.items()):  # named_children() skips a repeated child
            if isinstance(child, TuckerConv2d):
                qualified = f"{name}.{child_name}" if name else child_name
                setattr(module, child_name, _replacement(child, qualified, residual_layers, plain_of))
    return model


def _replacement(layer: TuckerConv2d, name: str, residual_layers: set, plain_of: dict) -> nn.Module:
    if id(layer) in plain_of:
        return plain_of[id(layer)]
    fused = isinstance(layer, FusedTuckerConv2d)
    if fused and layer.add_residual and id(layer) not in residual_layers:
        raise ExportError(
            f"to_plain cannot convert layer {name!r}: a FusedTuckerConv2d with add_residual=True called from Python "
            "code, not from a torch.fx graph; only a graph call can be rewritten to take the residual add out of the "
            "layer (convert the model before fusing it, or fuse it with kdfast.fuse_for_inference)")
    # A residual layer's ReLU is a graph node after the add; a plain fused layer's ReLU goes into the sequence.
    plain = _plain_tucker(layer, relu=fused and layer.relu and not layer.add_residual)
    plain_of[id(layer)] = plain
    return plain


def plain_graph_module(model: nn.Module) -> fx.GraphModule:
    """``torch.fx.symbolic_trace(to_plain(model))``: a GraphModule whose modules are all torch classes, so
    ``torch.save`` pickles it and ``torch.load(path, weights_only=False)`` rebuilds it without kdfast.
    Raises what torch.fx raises for a forward it cannot trace (data-dependent Python control flow)."""
    plain = to_plain(model)  # first: torch.fx would trace into a Tucker layer's custom-op call
    gm = plain if isinstance(plain, fx.GraphModule) else fx.symbolic_trace(plain)
    # Annotations written under `from __future__ import annotations` are strings, which the pickled
    # GraphModule's import block cannot name: drop them (they are not used at run time).
    for node in gm.graph.nodes:
        if isinstance(node.type, str):
            node.type = None
    gm.recompile()
    return gm


# =============================================================================================== checks
def _first_layer(model: nn.Module):
    """(name, module) of the first registered conv or linear layer: the input layer of kdfast's models."""
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, TuckerConv2d, nn.Linear)):
            return name, module
    return None, None


def check_example_input(model: nn.Module, example_input) -> None:
    """Raise ExportError saying which dimension of ``example_input`` does not fit ``model``.

    Checks the rank (4-D for a model whose first layer is a 2-D convolution) and the channel count
    (dimension 1) against the first registered conv layer, then runs the model once (eval mode,
    no_grad) and names the layer where a remaining mismatch (e.g. a too small image) fails.
    """
    if not isinstance(example_input, torch.Tensor):
        raise TypeError(f"example_input must be a torch.Tensor, got {type(example_input).__name__}")
    if not example_input.is_floating_point():
        raise TypeError(f"example_input must be a floating-point tensor, got dtype {example_input.dtype}")
    shape = tuple(example_input.shape)
    name, first = _first_layer(model)
    if isinstance(first, (nn.Conv2d, TuckerConv2d)):
        if example_input.dim() != 4:
            raise ExportError(f"example_input has {example_input.dim()} dimensions {shape}; the model's first layer "
                              f"{name!r} is a 2-D convolution, which takes 4 (batch, channels, height, width)")
        if shape[1] != first.in_channels:
            raise ExportError(f"example_input dimension 1 (channels) is {shape[1]}, but the model's first layer "
                              f"{name!r} takes {first.in_channels} channels (example_input shape {shape})")
    names = ("batch", "channels", "height", "width") if len(shape) == 4 else ()
    for dim, size in enumerate(shape):
        if size < 1:
            what = f" ({names[dim]})" if names else ""
            raise ExportError(f"example_input dimension {dim}{what} is {size}; every dimension must be at least 1")
    running = []  # names of the modules whose forward has started and not returned: the last one failed
    hooks = []
    for n, m in model.named_modules():
        hooks.append(m.register_forward_pre_hook(lambda m, args, n=n: running.append(n)))
        hooks.append(m.register_forward_hook(lambda m, args, out: running.pop() and None))  # None: keep the output
    modes = {m: m.training for m in model.modules()}  # restored one by one: a model may mix modes
    try:
        model.eval()
        with torch.no_grad():
            model(example_input)
    except (RuntimeError, ValueError) as exc:
        where = f"in layer {running[-1]!r} " if running and running[-1] else "in its forward "
        raise ExportError(f"the model fails {where}on example_input of shape {shape} (dimension 0 is the batch, 1 the "
                          f"channels, 2 and 3 the height and width): {exc}") from exc
    finally:
        for h in hooks:
            h.remove()
        for m, training in modes.items():
            m.training = training


def find_kdfast_ops(program: torch.export.ExportedProgram) -> list[tuple[str, str]]:
    """[(layer name, op name)] of every ``torch.ops.kdfast.*`` call in an exported program's graph,
    the layer being the innermost module the call was traced in (``node.meta["nn_module_stack"]``)."""
    found = []
    for node in program.graph.nodes:
        if node.op == "call_function" and getattr(node.target, "namespace", None) == "kdfast":
            stack = node.meta.get("nn_module_stack") or {}
            layer = list(stack.values())[-1][0] if stack else "<root>"
            found.append((layer or "<root>", str(node.target)))
    return found


# =============================================================================================== torch.export
def _traceable_input(example_input: torch.Tensor, dynamic_batch: bool) -> torch.Tensor:
    # torch.export specialises a dimension of size 1 to the constant 1: trace a batch of 2 instead.
    if dynamic_batch and example_input.shape[0] == 1:
        return example_input.expand(2, *example_input.shape[1:]).contiguous()
    return example_input


def export_program(model: nn.Module, example_input: torch.Tensor, *, plain: bool = False,
                   dynamic_batch: bool = True) -> torch.export.ExportedProgram:
    """``torch.export.export`` of ``model`` for inference (an eval-mode copy, traced under no_grad).

    kdfast's ops have fake kernels (kdfast/_registrations.py), so a kdfast model exports as it is:
    its Tucker layers stay ``torch.ops.kdfast.tucker_conv2d`` calls (kdfast's kernels, and
    ``import kdfast`` needed to run or ``torch.export.load`` the program). ``plain=True`` exports
    :func:`to_plain` of the model instead: aten convolutions only, loadable by PyTorch alone.

    Args:
        model: an nn.Module; it is not modified.
        example_input: one input tensor (N, C, H, W); its dimensions are checked against the model.
        plain: convert with :func:`to_plain` first.
        dynamic_batch: export dimension 0 as a symbolic batch size (a batch of 1 is traced as 2,
            since torch.export specialises size-1 dimensions); False fixes every dimension.
    Raises:
        ExportError naming :func:`to_plain` when torch.export fails on a model that still has kdfast
        layers; shape errors as :func:`check_example_input`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model = to_plain(model) if plain else copy.deepcopy(model)
    model.eval()
    kdfast_layers = [n for n, m in model.named_modules() if isinstance(m, TuckerConv2d)]
    if kdfast_layers and _ext.problem() is not None:
        raise ExportError(f"the model's kdfast layers ({_some(kdfast_layers)}) cannot run here: {_ext.problem()} "
                          "Export kdfast.to_plain(model) instead (export_program(model, x, plain=True)): it computes "
                          "the same with torch.nn layers and needs no compiled kdfast op")
    check_example_input(model, example_input)
    x = _traceable_input(example_input, dynamic_batch)
    dynamic_shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    try:
        with torch.no_grad():  # inference graph: no saved intermediates, BatchNorm in eval mode
            return torch.export.export(model, (x,), dynamic_shapes=dynamic_shapes)
    except Exception as exc:
        if not kdfast_layers:
            raise
        raise ExportError(
            f"torch.export could not export the model ({type(exc).__name__}: {exc}). It has kdfast layers "
            f"({_some(kdfast_layers)}): export kdfast.to_plain(model) instead (or export_program(model, x, "
            "plain=True)), which computes the same with torch.nn layers only") from exc


def _some(names: list) -> str:
    return ", ".join(names[:3]) + (f", ... ({len(names)} in all)" if len(names) > 3 else "")


# =============================================================================================== ONNX
def export_onnx(model: nn.Module, example_input: torch.Tensor, path, *, opset_version: int = DEFAULT_OPSET,
                dynamic_batch: bool = True, input_name: str = "input", output_name: str = "logits",
                verify: bool = True, rtol: float = 1e-4, atol: float = 1e-5) -> str:
    """Write ``model`` (eval mode, :func:`to_plain`-converted) as an ONNX file ONNX Runtime runs.

    Uses the torch.export-based exporter (``torch.onnx.export(..., dynamo=True)``, PyTorch's default
    and recommended one) at ``opset_version`` (default 20, torch 2.13's default), weights inside the
    one file. Needs the optional packages onnx and onnxscript (``pip install kdfast[export]``);
    ``verify=True`` also needs onnxruntime and checks that ONNX Runtime's output on ``example_input``
    equals PyTorch's within ``rtol``/``atol`` (raising ExportError otherwise).

    Args:
        model: an nn.Module (not modified); kdfast layers are converted with :func:`to_plain`.
        example_input: one input tensor (N, C, H, W), checked against the model's first layer.
        path: the .onnx file to write.
        dynamic_batch: the ONNX input's dimension 0 is the symbolic "batch"; False fixes all of them.
        input_name, output_name: the ONNX graph's input and output names.
    Returns: ``path``.
    Raises: ExportError naming the layer when a layer cannot be converted (see :func:`to_plain`) or
        still calls a kdfast op after conversion; ImportError naming ``kdfast[export]`` when onnx or
        onnxscript is missing.
    """
    _require("onnx", "onnxscript", *(("onnxruntime",) if verify else ()))
    if isinstance(opset_version, bool) or not isinstance(opset_version, int) or opset_version < 18:
        raise ValueError(f"opset_version must be an int >= 18 (the torch.export-based exporter's minimum), "
                         f"got {opset_version!r}")
    program = export_program(model, example_input, plain=True, dynamic_batch=dynamic_batch)
    leftover = find_kdfast_ops(program)
    if leftover:
        layers = "; ".join(f"layer {layer!r} calls {op}" for layer, op in leftover[:5])
        raise ExportError(f"cannot export to ONNX: after kdfast.to_plain, {layers}. kdfast's custom ops have no ONNX "
                          "translation; replace that module by torch.nn layers")
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with _quiet_exporter():
        onnx_program = torch.onnx.export(program, (), dynamo=True, opset_version=opset_version, verbose=False,
                                         input_names=[input_name], output_names=[output_name])
    onnx_program.save(path, external_data=False)
    if dynamic_batch:
        _name_batch_dimension(path)
    if verify:
        with torch.no_grad():
            expected = program.module()(example_input)
        got = run_onnx(path, example_input)
        if not torch.allclose(torch.from_numpy(got), expected, rtol=rtol, atol=atol):
            err = (torch.from_numpy(got) - expected).abs().max().item()
            raise ExportError(f"ONNX Runtime's output of {path} differs from PyTorch's by up to {err:.3g} "
                              f"(rtol={rtol}, atol={atol})")
    return path


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter logs a warning per torchvision op it cannot register (torchvision is not needed here)."""
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*LeafSpec.*")
            yield
    finally:
        logger.setLevel(level)


def _name_batch_dimension(path: str) -> None:
    """Rename the exporter's symbol for dimension 0 (e.g. "s77") to "batch" in the saved ONNX file."""
    import onnx

    model = onnx.load(path)
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    symbol = dim.dim_param
    if not symbol or symbol == "batch":
        return
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for d in value.type.tensor_type.shape.dim:
            if d.dim_param == symbol:
                d.dim_param = "batch"
    onnx.checker.check_model(model)
    onnx.save(model, path)


def run_onnx(path, x: torch.Tensor):
    """ONNX Runtime's (CPU) output (a numpy array) of the one-input model at ``path`` on ``x``."""
    _require("onnxruntime")
    import onnxruntime as ort

    session = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return session.run(None, {name: x.detach().cpu().numpy()})[0]


def _require(*modules: str) -> None:
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"ONNX export needs the optional packages {', '.join(missing)}: "
                          "pip install 'kdfast[export]' (or pip install onnx onnxscript onnxruntime)")
