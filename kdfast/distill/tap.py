"""FeatureTap: read intermediate module outputs by name, without changing the model's code.

Same idea as torchdistill's ``ForwardHookManager`` (module path such as ``layer1.0.bn2``, forward hooks),
kept deliberately small: one hook per requested module, the last output of each forward is kept.
"""
from __future__ import annotations

import difflib
from typing import Dict, Iterable, List, Sequence, Union

import torch
from torch import nn

# Wrappers whose submodule names get a prefix: DistributedDataParallel / DataParallel (``module.``)
# and torch.compile's OptimizedModule (``_orig_mod.``).
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's model inside DDP / DataParallel / torch.compile wrappers (any nesting)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(getattr(model, "_orig_mod"), nn.Module):
            model = model._orig_mod
        else:
            return model


def _strip_prefixes(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
                changed = True
    return name


def resolve_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name`` in ``model`` (wrapper prefixes ``module.``/``_orig_mod.`` optional).

    Raises ValueError naming the unknown layer and listing close matches.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"layer names must be non-empty strings, got {name!r}")
    inner = unwrap_model(model)
    modules = dict(inner.named_modules())
    key = _strip_prefixes(name)
    if key in modules and key != "":
        return modules[key]
    candidates = [n for n in modules if n]
    close = difflib.get_close_matches(key, candidates, n=5, cutoff=0.5)
    hint = f"; close matches: {close}" if close else ""
    sample = ", ".join(candidates[:12]) + (", ..." if len(candidates) > 12 else "")
    raise ValueError(
        f"unknown layer name {name!r} in {type(inner).__name__}{hint} (available: {sample})"
    )


class FeatureTap:
    """Record the outputs of named submodules during a forward pass.

    >>> tap = FeatureTap(model, ["layer1", "layer2.0.conv2"])
    >>> logits = model(x)
    >>> f1, f2 = tap.features          # list, in the order the names were given
    >>> tap.feature_dict["layer1"]     # or by name
    >>> tap.remove()                   # or use ``with FeatureTap(model, names) as tap:``

    * Works on plain models and on models wrapped in DistributedDataParallel / DataParallel /
      ``torch.compile`` (names may be given with or without the ``module.`` / ``_orig_mod.`` prefix).
      Hooks are registered on the inner modules, so wrapping the model after creating the tap is fine too.
    * ``torch.compile``: dynamo traces forward hooks that exist when the model is compiled; register the
      tap BEFORE the first compiled call (adding or removing hooks later triggers a recompile).
    * If a module runs more than once in one forward (weight sharing), the last output is kept.
    * ``detach=True`` stores detached outputs (for the teacher, or for logging).
    * Outputs are stored as returned (a Tensor, or a tuple for modules that return several values).
    """

    def __init__(self, model: nn.Module, names: Union[str, Sequence[str]], *, detach: bool = False):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(names, str):
            names = [names]
        names = list(names)
        if not names:
            raise ValueError("names must list at least one layer name")
        self.names: List[str] = names
        self.detach = detach
        self._outputs: Dict[str, object] = {}
        self._handles = []
        # One hook per distinct module; several names may point at the same module.
        for name in dict.fromkeys(names):
            module = resolve_module(model, name)
            self._handles.append(module.register_forward_hook(self._make_hook(name)))

    def _make_hook(self, name: str):
        def hook(module, inputs, output):
            if self.detach:
                output = output.detach() if isinstance(output, torch.Tensor) else output
            self._outputs[name] = output

        return hook

    @property
    def features(self) -> List[object]:
        """Outputs of the tapped layers from the last forward, in the order the names were given."""
        missing = [n for n in self.names if n not in self._outputs]
        if missing:
            raise RuntimeError(
                f"FeatureTap has no output for layers {missing}: run a forward pass first "
                "(or the layers are not used by the model's forward)"
            )
        return [self._outputs[n] for n in self.names]

    @property
    def feature_dict(self) -> Dict[str, object]:
        """Outputs of the tapped layers from the last forward, keyed by the given names."""
        return dict(zip(self.names, self.features))

    def clear(self) -> None:
        """Forget stored outputs (frees their memory; ``features`` raises until the next forward)."""
        self._outputs.clear()

    def remove(self) -> None:
        """Remove the hooks and stored outputs. Safe to call twice."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._outputs.clear()

    def __enter__(self) -> "FeatureTap":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"FeatureTap(names={self.names}, active={bool(self._handles)})"


def as_name_list(names: Union[str, Iterable[str]], what: str) -> List[str]:
    """Normalise a layer spec (one name or a list of names) to a list, with a clear error."""
    if isinstance(names, str):
        return [names]
    try:
        out = list(names)
    except TypeError:
        raise TypeError(f"{what} must be a layer name or a list of layer names, got {names!r}") from None
    if not out or not all(isinstance(n, str) and n for n in out):
        raise TypeError(f"{what} must be a layer name or a non-empty list of layer names, got {names!r}")
    return out
