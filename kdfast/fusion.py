"""Inference fusion: :func:`fuse_for_inference` folds eval-mode BatchNorm into the conv before it and
moves ReLU and the residual add into the Tucker kernel's epilogue.

    student = kdfast.fuse_for_inference(student)     # a copy, in eval mode
    with torch.no_grad():
        y = student(x)                               # equals the unfused eval-mode model's output

Rewrites, on the torch.fx graph of the model (PyTorch's own conv-BN fusion,
torch.fx.experimental.optimization.fuse, works the same way):
  * ``Conv2d -> BatchNorm2d``: the BN is folded into the conv's weight and bias
    (torch.nn.utils.fusion.fuse_conv_bn_eval);
  * ``TuckerConv2d -> BatchNorm2d``: folded into the last factor and the bias,
    ``last' = diag(s) last``, ``bias' = s (bias - mean) + beta`` with ``s = gamma / sqrt(var + eps)``;
  * ``TuckerConv2d [-> add(., r)] [-> ReLU]``: replaced by one :class:`kdfast.nn.FusedTuckerConv2d`
    whose kernel adds r and applies the ReLU while writing y.
A rewrite happens only where the intermediate result has no other user and the module is called once.
Models whose forward torch.fx cannot trace (data-dependent Python control flow) are handled child
by child: each traceable submodule is fused, and a warning names the modules that were not
(``strict=True`` raises instead).
"""
from __future__ import annotations

import copy
import inspect
import operator
import warnings

import torch
import torch.nn.functional as F
from torch import fx, nn

from .nn import FusedTuckerConv2d, TuckerConv2d

__all__ = ["FusionError", "fuse_for_inference"]


class FusionError(TypeError):
    """fuse_for_inference(strict=True) met a module whose forward torch.fx cannot trace."""


class _Tracer(fx.Tracer):
    """Keeps kdfast's Tucker layers as leaves (their forward calls the custom op with Python checks)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, TuckerConv2d) or super().is_leaf_module(m, qualname)


def _trace(model: nn.Module) -> fx.GraphModule:
    # Non-tensor arguments with defaults (flags such as is_feat=False) are traced at their default.
    params = list(inspect.signature(model.forward).parameters.values())[1:]
    concrete = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    graph = _Tracer().trace(model, concrete_args=concrete or None)
    return fx.GraphModule(model, graph, model.__class__.__name__)


def _is_relu(node: fx.Node, modules: dict) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(node.target), nn.ReLU)
    if node.op == "call_function":
        return node.target in (torch.relu, torch.relu_, F.relu) and len(node.args) == 1
    if node.op == "call_method":
        return node.target in ("relu", "relu_") and len(node.args) == 1
    return False


def _residual_of(node: fx.Node, conv: fx.Node):
    """The other operand r if ``node`` is ``conv + r`` (or r + conv) without alpha, else None."""
    if node.kwargs:
        return None
    is_add = (node.op == "call_function" and node.target in (operator.add, operator.iadd, torch.add)) or (
        node.op == "call_method" and node.target in ("add", "add_"))
    if not is_add or len(node.args) != 2:
        return None
    a, b = node.args
    other = b if a is conv else a if b is conv else None
    return other if isinstance(other, fx.Node) and other is not conv else None


def _fold_bn_into_tucker(layer: TuckerConv2d, bn: nn.BatchNorm2d) -> None:
    with torch.no_grad():
        inv_std = torch.rsqrt(bn.running_var + bn.eps)
        s = inv_std * bn.weight if bn.affine else inv_std
        shift = -bn.running_mean * s + (bn.bias if bn.affine else 0)
        layer.last.mul_(s.to(layer.last.dtype)[:, None])
        bias = layer.bias.detach() * s + shift if layer.bias is not None else shift
        layer.bias = nn.Parameter(bias.to(dtype=layer.last.dtype, device=layer.last.device))


def _foldable_bn(bn) -> bool:
    return (isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats and bn.running_mean is not None
            and bn.running_var is not None)


def _fuse_graph(gm: fx.GraphModule) -> fx.GraphModule:
    modules = dict(gm.named_modules())
    calls = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    once = lambda node: node.op == "call_module" and calls[node.target] == 1  # noqa: E731

    # 1. conv -> BN: fold.
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not _foldable_bn(modules.get(node.target)) or len(node.args) != 1:
            continue
        conv_node = node.args[0]
        if not isinstance(conv_node, fx.Node) or not once(conv_node) or len(conv_node.users) != 1:
            continue
        conv, bn = modules[conv_node.target], modules[node.target]
        if isinstance(conv, TuckerConv2d) and not isinstance(conv, FusedTuckerConv2d):
            _fold_bn_into_tucker(conv, bn)
        elif type(conv) is nn.Conv2d:
            _replace_module(gm, modules, conv_node.target, torch.nn.utils.fusion.fuse_conv_bn_eval(conv, bn))
        else:
            continue
        node.replace_all_uses_with(conv_node)
        gm.graph.erase_node(node)

    # 2. Tucker -> (+ r) -> (ReLU): one FusedTuckerConv2d.
    for node in list(gm.graph.nodes):
        if not (once(node) and type(modules.get(node.target)) is TuckerConv2d) or len(node.args) != 1 or node.kwargs:
            continue
        chain, residual, relu, tail = [node], None, False, node
        if len(tail.users) == 1:
            user = next(iter(tail.users))
            r = _residual_of(user, tail)
            if r is not None:
                residual, tail = r, user
                chain.append(user)
        if len(tail.users) == 1 and _is_relu(next(iter(tail.users)), modules):
            relu, tail = True, next(iter(tail.users))
            chain.append(tail)
        if tail is node:
            continue
        fused = FusedTuckerConv2d.from_tucker(modules[node.target], relu=relu, add_residual=residual is not None)
        _replace_module(gm, modules, node.target, fused)
        with gm.graph.inserting_before(tail):
            args = (node.args[0],) if residual is None else (node.args[0], residual)
            new = gm.graph.call_module(node.target, args)
        tail.replace_all_uses_with(new)
        for dead in reversed(chain):
            gm.graph.erase_node(dead)

    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def _replace_module(gm: nn.Module, modules: dict, target: str, new: nn.Module) -> None:
    parent_name, _, name = target.rpartition(".")
    setattr(gm.get_submodule(parent_name) if parent_name else gm, name, new)
    modules[target] = new


def _fuse(module: nn.Module, path: str, untraced: list, strict: bool) -> nn.Module:
    if isinstance(module, TuckerConv2d) or not list(module.children()):
        return module  # a leaf: nothing inside to rewrite
    try:
        gm = _trace(module)
    except Exception as exc:  # noqa: BLE001  (fx raises TraceError, TypeError, ... for untraceable code)
        where = path or type(module).__name__
        if strict:
            raise FusionError(
                f"fuse_for_inference cannot trace {where} ({type(module).__name__}) with torch.fx: {exc}. "
                "Its submodules can still be fused one by one with strict=False."
            ) from exc
        untraced.append(f"{where} ({type(module).__name__}: {type(exc).__name__}: {exc})")
        for name, child in list(module.named_children()):
            setattr(module, name, _fuse(child, f"{path}.{name}" if path else name, untraced, strict))
        return module
    return _fuse_graph(gm)


def fuse_for_inference(model: nn.Module, inplace: bool = False, strict: bool = False, *,
                       example_input=None) -> nn.Module:
    """The eval-mode ``model`` with BatchNorm folded and Tucker epilogues fused (see module docstring).

    Args:
        model: any nn.Module. Deep-copied first unless ``inplace=True``. The result is in eval mode and
            computes what ``model.eval()`` computes, within float rounding: use it for inference only
            (BatchNorm running statistics are baked into the weights).
        inplace: rewrite ``model``'s modules in place (the returned module is still a new
            torch.fx.GraphModule when the model could be traced).
        strict: raise :class:`FusionError` when torch.fx cannot trace a module that has children,
            instead of fusing its children one by one with a warning.
        example_input: a tensor (or tuple of forward args) of the deployment's shape. The fused model then
            runs it once (no grad), so that each Tucker layer's CPU path is measured now, at its real input
            and with its fused epilogue (the run-time autotuning of kdfast.backends.tucker, whose cache
            ``save_cache`` can write for deployment), instead of on the first real call.
    Returns:
        a torch.fx.GraphModule (or, where tracing failed, the model with its children fused).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(inplace, bool) or not isinstance(strict, bool):
        raise TypeError("inplace and strict must be bools")
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    untraced: list = []
    fused = _fuse(model, "", untraced, strict)
    if untraced:
        warnings.warn(
            "fuse_for_inference could not trace these modules with torch.fx and fused only inside their "
            "children: " + "; ".join(untraced),
            stacklevel=2,
        )
    fused = fused.eval()
    if example_input is not None:
        args = tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)
        with torch.no_grad():
            fused(*args)
    return fused
