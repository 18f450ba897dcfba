"""The experiments wing: one source paper's experiment per module, and the registry that names them.

Every registered module (``kdfast.experiments.<module>``) defines:

* ``NAME`` (str), ``TITLE`` (one line), ``PAPER`` (authors, title, venue; the public code it follows):
  the tour's section heading and citation;
* ``run(out_dir, *, dataset="digits", data_root=None, budget="quick", seeds=None, device="cpu") -> dict``:
  the paper's experiment (teacher, students, seeds, plots) on one of
  :data:`kdfast.experiments.common.DATASETS`; writes ``report.md``, ``results.json`` (with the command
  that produced it) and PNG plots into ``out_dir`` (``kdfast experiment <name>``);
* ``demo_section(ctx: common.DemoContext) -> common.DemoSection``: the paper's compact section of
  ``kdfast demo`` (within ``ctx.budget_s`` seconds on 2 CPU cores).

The methods themselves (losses, attacks, generators, engines) live in :mod:`kdfast.methods`; experiments
import them, never the other way round. Modules are imported on first use, so
``kdfast.experiments.available()`` imports none of them.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Dict, List

# name -> module; the order is the demo tour's order (source papers first to last).
_REGISTRY: Dict[str, str] = {
    "kd": "kdfast.experiments.kd",              # Sadhukhan, Saha, Mukhopadhyay, Patra, ICIP 2020
    "bss": "kdfast.experiments.bss",            # Heo et al., AAAI 2019
    "datafree": "kdfast.experiments.datafree",  # DAFL, DFAD, RDSKD (Han et al., ICASSP 2021)
    "kr": "kdfast.experiments.kr",              # Liu et al., CVPR-W 2019
    "srm": "kdfast.experiments.srm",            # Tran et al., 2021
}
#: Other names ``kdfast experiment`` accepts: the three data-free methods share one experiment.
ALIASES: Dict[str, str] = {"dafl": "datafree", "dfad": "datafree", "rdskd": "datafree"}


def available() -> List[str]:
    """Names of the registered experiments, in the demo tour's order."""
    return list(_REGISTRY)


def resolve(name: str) -> str:
    """The registered name of experiment ``name`` (an alias resolved); ValueError naming the valid ones."""
    if isinstance(name, str) and name in ALIASES:
        return ALIASES[name]
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown experiment {name!r}; experiments: {', '.join(available())} "
                         f"(or {', '.join(ALIASES)}, the data-free methods' shared experiment)")
    return name


def get(name: str) -> ModuleType:
    """The module of experiment ``name`` or of an alias (see this package's docstring for what it defines)."""
    return importlib.import_module(_REGISTRY[resolve(name)])


__all__ = ["ALIASES", "available", "get", "resolve"]
