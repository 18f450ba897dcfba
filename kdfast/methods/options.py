"""Typed method options: what each option of a method (and each engine keyword) accepts.

Every method module declares ``OPTION_TYPES = {option name: spec}`` next to ``OPTIONS`` (the defaults);
:func:`kdfast.methods.check_options` checks every given option against its spec (the method's own, else
the engine's, :data:`ENGINE_TYPES`) before the engine is built, so a bad value is one error naming the
option and what it expects, not a crash somewhere inside the method:

    kdfast.methods.build("bss", t, s, clamp=2.5)
    OptionError: method 'bss': option clamp must be a pair of numbers (lo, hi) or None, got 2.5

A spec is a :class:`Spec`: ``what`` (the expectation, in words) and ``accepts(value)``. The helpers below
build the usual ones; :class:`OptionError` is both a TypeError and a ValueError (a YAML config and Python
callers catch either).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence

import torch


class OptionError(TypeError, ValueError):
    """A method option of the wrong type or out of range."""


@dataclass(frozen=True)
class Spec:
    """What an option accepts: ``what`` says it in words, ``accepts(value)`` decides."""

    what: str
    accepts: Callable[[Any], bool]

    def check(self, where: str, value: Any) -> None:
        if not self.accepts(value):
            raise OptionError(f"{where} must be {self.what}, got {value!r}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def integer(minimum: Optional[int] = None) -> Spec:
    """An int (not a bool), at least ``minimum``."""
    what = "an int" + (f" >= {minimum}" if minimum is not None else "")
    return Spec(what, lambda v: _is_int(v) and (minimum is None or v >= minimum))


def number(minimum: Optional[float] = None, maximum: Optional[float] = None, *, positive: bool = False) -> Spec:
    """A finite int or float; ``positive``: > 0; ``minimum``/``maximum``: inclusive bounds."""
    if positive:
        what = "a number > 0"
    elif minimum is not None and maximum is not None:
        what = f"a number in [{minimum:g}, {maximum:g}]"
    elif minimum is not None:
        what = f"a number >= {minimum:g}"
    else:
        what = "a number"
    return Spec(what, lambda v: _is_number(v) and (not positive or v > 0)
                and (minimum is None or v >= minimum) and (maximum is None or v <= maximum))


BOOL = Spec("a bool (true / false)", lambda v: isinstance(v, bool))
PATH = Spec("a path", lambda v: isinstance(v, (str, os.PathLike)))
DEVICE = Spec("a device ('cpu', 'cuda', 'cuda:N' or a torch.device)",
              lambda v: isinstance(v, (str, torch.device)))
STRING = Spec("a string", lambda v: isinstance(v, str))
ANY = Spec("anything", lambda v: True)


def choice(*values: str) -> Spec:
    """One of the given strings."""
    return Spec("one of " + ", ".join(repr(v) for v in values), lambda v: isinstance(v, str) and v in values)


def optional(spec: Spec) -> Spec:
    """``spec`` or None."""
    return Spec(f"{spec.what} or None", lambda v: v is None or spec.accepts(v))


def pair_of_numbers(what: str = "(lo, hi)", ordered: bool = True) -> Spec:
    """A list/tuple of two numbers; ``ordered``: the first <= the second."""
    def accepts(v):
        return (isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_number(x) for x in v)
                and (not ordered or v[0] <= v[1]))

    return Spec(f"a pair of numbers {what}", accepts)


def list_of(spec: Spec, what: str, nonempty: bool = True) -> Spec:
    """A list/tuple whose items all satisfy ``spec``."""
    return Spec(what, lambda v: isinstance(v, (list, tuple)) and (len(v) > 0 or not nonempty)
                and all(spec.accepts(x) for x in v))


def instance_of(*types: type, what: str) -> Spec:
    return Spec(what, lambda v: isinstance(v, types))


def names() -> Spec:
    """A layer name or a list of layer names."""
    return Spec("a layer name or a list of layer names",
                lambda v: isinstance(v, str) or (isinstance(v, (list, tuple)) and len(v) > 0
                                                 and all(isinstance(x, str) for x in v)))


POSITIVE_INT = integer(1)
NON_NEGATIVE_INT = integer(0)
POSITIVE = number(positive=True)
NON_NEGATIVE = number(0)
FRACTION = number(0, 1)
MILESTONES = optional(list_of(integer(1), "a list of positive ints (epochs)"))

#: The engine keywords (kdfast.distill.Distiller) every method accepts, typed where a wrong value would
#: otherwise surface late; the engine checks the others (optimizer, schedule, device, ...) itself.
ENGINE_TYPES: Dict[str, Spec] = {
    "epochs": POSITIVE_INT, "lr": POSITIVE, "momentum": NON_NEGATIVE, "weight_decay": NON_NEGATIVE,
    "nesterov": BOOL, "betas": pair_of_numbers("(beta1, beta2)", ordered=False), "milestones": MILESTONES,
    "gamma": POSITIVE, "seed": NON_NEGATIVE_INT, "amp": optional(choice("bf16", "fp16")),
    "grad_clip": optional(POSITIVE), "checkpoint_every": POSITIVE_INT, "keep_checkpoints": BOOL,
    "log_every": NON_NEGATIVE_INT, "progress": BOOL, "cache_teacher_logits": BOOL,
    "batch_size": optional(POSITIVE_INT), "num_workers": NON_NEGATIVE_INT, "sync_bn": BOOL,
    "resume": Spec("False, True, 'force' or a checkpoint path", lambda v: isinstance(v, (bool, str, os.PathLike))),
}


def check(method: str, options: Dict[str, Any], types: Dict[str, Spec]) -> None:
    """Check each of ``options`` against ``types`` (the method's), else :data:`ENGINE_TYPES`."""
    for name, value in options.items():
        spec = types.get(name) or ENGINE_TYPES.get(name)
        if spec is not None:
            spec.check(f"method {method!r}: option {name}", value)


def describe(types: Dict[str, Spec], keys: Sequence[str]) -> str:
    """``"name (what)"`` for the given keys, for error messages and docs."""
    return ", ".join(f"{k} ({types[k].what})" for k in keys if k in types)
