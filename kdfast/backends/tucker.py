"""The CPU path choice of :func:`kdfast.ops.tucker_conv2d`: autotuning and its cache (docs/tucker-path.md).

    import kdfast.backends.tucker as tucker
    tucker.autotune            # True by default (KDFAST_TUCKER_AUTOTUNE=0 turns it off)
    tucker.autotune = False    # the switch; None goes back to KDFAST_TUCKER_AUTOTUNE / the default
    tucker.save_cache("tucker-paths.json")   # after a warm-up forward; a deployment then
    tucker.load_cache("tucker-paths.json")   # (or KDFAST_TUCKER_CACHE=...) measures nothing

On the first inference call for a key (dtype, memory format, thread count, shapes, geometry,
epilogue) the op times both paths on that call's input and caches the faster; the cache and the
measurement live in the C++ op (csrc/ops/cpu/tucker_cpu_autotune.cpp), so torch.compile'd and
exported graphs use them too. This module is the Python face of that state.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import types
import warnings

import torch

from .. import _ext

__all__ = ["autotune", "state", "clear_cache", "save_cache", "load_cache", "load_cache_from_environment", "cpu_name",
           "FILE_FORMAT"]

#: The "format" field of a saved cache file.
FILE_FORMAT = "kdfast-tucker-autotune"
_FILE_VERSION = 1
_PATHS = ("fused", "composed")


def _control(command: str, argument: str = "") -> str:
    _ext.require_ops()
    return torch.ops.kdfast._tucker_autotune(command, argument)


def state() -> dict:
    """The switch and the cache: ``{"enabled", "set_by", "env", "min_flops", "max_entries",
    "tunings", "timed_runs", "hits", "entries": [{"key", "path", "fused_ms", "composed_ms", "rounds",
    "source"}]}``. ``tunings`` counts measurements (first calls of a key), ``timed_runs`` the timed
    executions they made and ``hits`` the calls answered from the cache (debug counters, never reset)."""
    return json.loads(_control("state"))


def clear_cache() -> None:
    """Forget every cached path (the next call of each key measures again)."""
    _control("clear")


def cpu_name() -> str:
    """The CPU model (Linux /proc/cpuinfo, else platform.processor()); saved with a cache file."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def save_cache(path) -> int:
    """Write the cache to ``path`` (JSON) and return the number of entries written."""
    entries = [{k: e[k] for k in ("key", "path", "fused_ms", "composed_ms", "rounds")} for e in state()["entries"]]
    from .. import __version__

    data = {"format": FILE_FORMAT, "version": _FILE_VERSION,
            "machine": {"cpu": cpu_name(), "torch": torch.__version__, "kdfast": __version__},
            "entries": entries}
    with open(os.fspath(path), "w") as fh:
        json.dump(data, fh, indent=1)
    return len(entries)


def load_cache(path) -> int:
    """Add the entries of a file written by :func:`save_cache` to the cache (an entry replaces a cached
    one with the same key) and return how many were loaded. Warns when the file was measured on another
    CPU model (its choices may not hold here); raises ValueError for a file that is not such a cache."""
    path = os.fspath(path)
    with open(path) as fh:
        try:
            data = json.load(fh)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not a kdfast Tucker path cache (not JSON: {exc})") from exc
    if not isinstance(data, dict) or data.get("format") != FILE_FORMAT:
        raise ValueError(f"{path} is not a kdfast Tucker path cache (expected \"format\": {FILE_FORMAT!r})")
    if data.get("version") != _FILE_VERSION:
        raise ValueError(f"{path}: cache file version {data.get('version')!r}, this kdfast reads {_FILE_VERSION}")
    entries = data.get("entries")
    if not isinstance(entries, list):
        raise ValueError(f"{path}: \"entries\" must be a list")
    lines = []
    for i, e in enumerate(entries):
        if not (isinstance(e, dict) and isinstance(e.get("key"), str) and e["key"] and e.get("path") in _PATHS
                and all(isinstance(e.get(k), (int, float)) for k in ("fused_ms", "composed_ms", "rounds"))):
            raise ValueError(f"{path}: entry {i} must have a non-empty string \"key\", \"path\" in {_PATHS} and "
                             f"numbers \"fused_ms\", \"composed_ms\", \"rounds\"; got {e!r}")
        if "\t" in e["key"]:
            raise ValueError(f"{path}: entry {i}: key contains a tab")
        lines.append(f"{e['key']}\t{e['path']}\t{float(e['fused_ms'])!r}\t{float(e['composed_ms'])!r}\t{int(e['rounds'])}")
    saved_cpu = (data.get("machine") or {}).get("cpu")
    if saved_cpu is not None and saved_cpu != cpu_name():
        warnings.warn(f"{path} was measured on {saved_cpu!r}, this CPU is {cpu_name()!r}: its path choices may "
                      "not be the fastest here", stacklevel=2)
    for line in lines:
        _control("insert", line)
    return len(lines)


def load_cache_from_environment() -> None:
    """KDFAST_TUCKER_CACHE=<file>: load it when kdfast is imported (a deployment measures nothing)."""
    path = os.environ.get("KDFAST_TUCKER_CACHE")
    if not path or not _ext.is_loaded():
        return
    try:
        load_cache(path)
    except (OSError, ValueError) as exc:
        warnings.warn(f"KDFAST_TUCKER_CACHE={path!r} not loaded: {exc}", stacklevel=2)


class _Module(types.ModuleType):
    """This module with a property ``autotune`` (the switch lives in the C++ op)."""

    @property
    def autotune(self) -> bool:
        """Whether tucker_conv2d measures its two CPU paths on a key's first call (default True)."""
        return bool(state()["enabled"])

    @autotune.setter
    def autotune(self, value) -> None:
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"kdfast.backends.tucker.autotune must be a bool or None, got {value!r}")
        _control("set", "" if value is None else ("1" if value else "0"))


sys.modules[__name__].__class__ = _Module
