"""The methods wing: one paper's method per module, and the registry that names them.

Every registered module (``kdfast.methods.<module>``) defines:

* ``NAME`` (str), ``TITLE`` (one line), ``PAPER`` (authors, title, venue; the public code it follows);
* ``OPTIONS``: ``{option name: default}``, the keyword options :func:`build` accepts (YAML ``method_options``),
  besides the engine's keywords (lr, epochs, amp, checkpoint_dir, ...; :func:`engine_options`);
* ``build(teacher, student, **options)``: a ready engine (a :class:`kdfast.distill.Distiller`, or a
  :class:`kdfast.distill.StagedRun` for methods made of stages): call ``fit(train, eval_loader=...)``;
* the method's own public functions (losses, attacks, generators, ...).

A paper's experiment and its section of ``kdfast demo`` are in :mod:`kdfast.experiments`, one floor up:
a method module imports the engine (:mod:`kdfast.distill`) and the ground floor (ops, nn, losses, models,
data), never ``kdfast.experiments``, ``kdfast.cli`` nor ``kdfast.model_file``. ``datafree_base`` is not a
method: it holds what DAFL, DFAD and RDSKD share (generator, collapse detection, the generator engine).

Modules are imported on first use, so ``kdfast.methods.available()`` imports none of them.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, Dict, List

# name -> module; the order is the demo tour's order (source papers first to last).
_REGISTRY: Dict[str, str] = {
    "kd": "kdfast.methods.kd",          # Sadhukhan, Saha, Mukhopadhyay, Patra, ICIP 2020 (+ Hinton KD recipes)
    "bss": "kdfast.methods.bss",        # Heo et al., AAAI 2019
    "dafl": "kdfast.methods.dafl",      # data-free KD (Han et al., ICASSP 2021 and the methods it compares)
    "dfad": "kdfast.methods.dfad",
    "rdskd": "kdfast.methods.rdskd",
    "kr": "kdfast.methods.kr",          # Liu et al., CVPR-W 2019
    "srm": "kdfast.methods.srm",        # Tran et al., 2021
}


def available() -> List[str]:
    """Names of the registered methods, in the demo tour's order."""
    return list(_REGISTRY)


def get(name: str) -> ModuleType:
    """The module of method ``name`` (see this package's docstring for what it defines)."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; registered methods: {', '.join(available())}")
    return importlib.import_module(_REGISTRY[name])


def engine_options() -> List[str]:
    """The engine's keyword arguments (kdfast.distill.Distiller), accepted by every method's build()."""
    import inspect

    from ..distill import Distiller

    params = inspect.signature(Distiller.__init__).parameters.values()
    return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]


def check_options(name: str, options: Dict[str, Any]) -> None:
    """Raise ValueError naming the bad options of method ``name`` and listing the valid ones (the
    method's own ``OPTIONS``; the engine's keywords, :func:`engine_options`, are accepted too)."""
    valid = get(name).OPTIONS
    unknown = sorted(set(options) - set(valid) - set(engine_options()))
    if unknown:
        raise ValueError(f"method {name!r} has no option(s) {', '.join(unknown)}; valid options: "
                         + ", ".join(f"{k} (default {v!r})" for k, v in valid.items())
                         + "; and the engine's: " + ", ".join(engine_options()))


def build(name: str, teacher, student, **options):
    """A ready engine (:class:`kdfast.distill.Distiller` or subclass) for method ``name``."""
    check_options(name, options)
    return get(name).build(teacher, student, **options)


__all__ = ["available", "build", "check_options", "engine_options", "get"]
