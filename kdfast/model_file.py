"""Model checkpoints of the kdfast CLI: what `kdfast demo` / `kdfast distill` write and
`kdfast robustness` / `kdfast decompose` read.

A model checkpoint is a dict that ``torch.load(path, weights_only=True)`` loads (only tensors,
numbers, strings, None, lists and dicts):

    {
      "format": "kdfast.model/1",
      "model": "resnet20",                       # a kdfast.models.build name
      "model_kwargs": {"num_classes": 10, "in_channels": 1},
      "tucker": {                                # Tucker-2 layers replacing the named nn.Conv2d
        "layer1.0.conv1": {"in_channels": 16, "out_channels": 16, "kernel_size": [3, 3],
                           "ranks": [8, 6], "stride": [1, 1], "padding": [1, 1],
                           "dilation": [1, 1], "bias": False},
        ...
      },                                         # {} for a dense model
      "state_dict": {...},                       # of the model with those layers in place
      "data": {"name": "digits", "image_size": 16, "root": None,     # what it was trained on
               "in_channels": 1, "num_classes": 10},                 # (data_record; older files: name/size/root)
      "meta": {...}                              # free-form: metrics, decomposition report, ...
    }

:func:`load_model` rebuilds the dense model with ``kdfast.models.build(model, **model_kwargs)``,
swaps in a ``kdfast.nn.TuckerConv2d`` of the recorded shape and ranks at each "tucker" name, and
loads the state dict strictly. Files are written atomically (temporary file + os.replace).
"""
from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

MODEL_FORMAT = "kdfast.model/1"


def _tucker_spec(module) -> dict:
    return {
        "in_channels": int(module.in_channels),
        "out_channels": int(module.out_channels),
        "kernel_size": [int(k) for k in module.kernel_size],
        "ranks": [int(r) for r in module.ranks],
        "stride": [int(s) for s in module.stride],
        "padding": [int(p) for p in module.padding],
        "dilation": [int(d) for d in module.dilation],
        "bias": module.bias is not None,
    }


def tucker_structure(model: nn.Module) -> dict:
    """{module name: TuckerConv2d spec} of every TuckerConv2d in ``model``."""
    from .nn import TuckerConv2d

    return {name: _tucker_spec(m) for name, m in model.named_modules() if isinstance(m, TuckerConv2d)}


def _target(model: nn.Module, name: str):
    """(parent module, attribute name) of the nn.Conv2d a Tucker entry replaces."""
    parent_name, _, child = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)  # nn.Sequential children are attributes "0", "1", ... too
    except AttributeError:
        raise ValueError(f"checkpoint names a Tucker layer {name!r} that the model does not have") from None
    if not isinstance(old, nn.Conv2d):
        raise ValueError(f"checkpoint replaces {name!r} by a Tucker layer, but it is a {type(old).__name__}, not an nn.Conv2d")
    return parent, child


_SPEC_FIELDS = ("in_channels", "out_channels", "kernel_size", "ranks", "stride", "padding", "dilation", "bias")


def build_model(model_name: str, model_kwargs: dict | None = None, tucker: dict | None = None) -> nn.Module:
    """The (untrained) model a checkpoint describes: dense model, Tucker layers swapped in."""
    from . import models

    model = models.build(model_name, **(model_kwargs or {}))
    if tucker:
        from .nn import TuckerConv2d

        for name, spec in tucker.items():
            parent, child = _target(model, name)
            if not isinstance(spec, dict) or set(spec) != set(_SPEC_FIELDS):
                got = sorted(spec) if isinstance(spec, dict) else type(spec).__name__
                raise ValueError(f"Tucker layer {name!r}: expected the fields {list(_SPEC_FIELDS)}, got {got}")
            layer = TuckerConv2d(
                spec["in_channels"], spec["out_channels"], tuple(spec["kernel_size"]), tuple(spec["ranks"]),
                stride=tuple(spec["stride"]), padding=tuple(spec["padding"]), dilation=tuple(spec["dilation"]),
                bias=bool(spec["bias"]),
            )
            setattr(parent, child, layer)
    return model


def data_record(dataset, name: str | None = None, root=None) -> dict:
    """What a model file records about its data: ``{"name", "root", "image_size", "in_channels",
    "num_classes"}``, the sizes read from ``dataset`` (a kdfast.data.ImageDataset or anything with those
    attributes), so that readers need not guess them (a YAML run that left ``image_size`` unset trained at
    the dataset's native size, not at "None")."""
    return {"name": name if name is not None else getattr(dataset, "name", None),
            "root": None if root is None else os.fspath(root),
            "image_size": getattr(dataset, "image_size", None), "in_channels": getattr(dataset, "in_channels", None),
            "num_classes": getattr(dataset, "num_classes", None)}


def input_spec(ckpt: dict) -> dict:
    """``{"in_channels", "image_size", "num_classes"}`` of the inputs a model checkpoint was trained on:
    from its data record, else from the model's kwargs (in_channels, num_classes); None where unknown."""
    data = dict(ckpt.get("data") or {})
    kwargs = dict(ckpt.get("model_kwargs") or {})
    return {"in_channels": data.get("in_channels") or kwargs.get("in_channels"),
            "image_size": data.get("image_size"),
            "num_classes": data.get("num_classes") or kwargs.get("num_classes")}


def save_model(
    path: str | os.PathLike,
    model: nn.Module,
    model_name: str,
    model_kwargs: dict | None = None,
    data: dict | None = None,
    meta: dict | None = None,
) -> str:
    """Writes a model checkpoint (see the module docstring) atomically; returns the path."""
    from .distill.checkpoint import atomic_save

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    ckpt = {
        "format": MODEL_FORMAT,
        "model": model_name,
        "model_kwargs": dict(model_kwargs or {}),
        "tucker": tucker_structure(model),
        "state_dict": state,
        "data": dict(data or {}),
        "meta": dict(meta or {}),
    }
    atomic_save(ckpt, path)
    return os.fspath(path)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint dict, loaded with weights_only=True and validated."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not a checkpoint"
        # torch's own message suggests weights_only=False; a model checkpoint never needs it
        raise ValueError(
            f"{path} is not a loadable kdfast model checkpoint (torch.load(weights_only=True) failed: {type(exc).__name__})"
        ) from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != MODEL_FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        hint = (
            "; it is a training checkpoint (kdfast.distill), which holds the student's state dict but not its "
            "architecture: use the model checkpoint the run wrote next to it"
            if found == "kdfast.distill/1"
            else ""
        )
        raise ValueError(f"{path} is not a kdfast model checkpoint (format {found!r}, expected {MODEL_FORMAT!r}){hint}")
    for key in ("model", "model_kwargs", "tucker", "state_dict"):
        if key not in ckpt:
            raise ValueError(f"{path}: model checkpoint lacks the key {key!r}")
    return ckpt


def load_model(path: str | os.PathLike, map_location="cpu") -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode, checkpoint dict) from a model checkpoint. When the file records its input size,
    ``model.kdfast_input_shape`` is (C, H, W) of one input (kdfast.decompose measures MACs there)."""
    ckpt = read_checkpoint(path)
    model = build_model(ckpt["model"], ckpt["model_kwargs"], ckpt["tucker"])
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{os.fspath(path)}: the state dict does not fit {ckpt['model']} with its Tucker layers: {exc}") from exc
    spec = input_spec(ckpt)
    if spec["in_channels"] and spec["image_size"]:
        model.kdfast_input_shape = (int(spec["in_channels"]), int(spec["image_size"]), int(spec["image_size"]))
    return model.to(map_location).eval(), ckpt
