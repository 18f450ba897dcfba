"""Atomic checkpoints loadable with ``torch.load(weights_only=True)``, and RNG state capture/restore.

A checkpoint holds only tensors, numbers, strings, None and lists/tuples/dicts of those, so it loads
with the safe unpickler: model/optimizer/scheduler/scaler state dicts, counters, and the torch, CUDA,
numpy and Python RNG states converted to tensors.
"""
from __future__ import annotations

import contextlib
import os
import random
import tempfile
from typing import Any, Dict, List, Union

import numpy as np
import torch

PathLike = Union[str, "os.PathLike[str]"]


def atomic_save(obj: Any, path: PathLike) -> None:
    """``torch.save`` to ``path`` so that ``path`` is always either the old file or the complete new one.

    Writes a temporary file in the same directory (same filesystem, so ``os.replace`` is atomic),
    fsyncs it, renames it over ``path`` and fsyncs the directory. On any failure the temporary file is
    removed and the previous ``path`` is untouched.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):  # already renamed or never created
            os.unlink(tmp)
        raise
    # Persist the rename itself (directory entry); not supported on every platform/filesystem.
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):  # some filesystems refuse fsync on a directory
            os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path: PathLike, map_location="cpu") -> Dict[str, Any]:
    """Load a kdfast checkpoint with the safe unpickler (``weights_only=True``)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # EOFError (empty), zip errors (truncated), unpickling errors (another format)
        raise ValueError(
            f"cannot read the checkpoint {path}: the file is empty, truncated or not a kdfast checkpoint "
            f"({type(e).__name__}: {str(e)[:160]}). Checkpoints are written atomically, so this file was not written "
            "by kdfast: delete it to start afresh, or resume from another file (e.g. epoch_<n>.pt with "
            "keep_checkpoints)") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a kdfast.distill checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    return ckpt


CHECKPOINT_FORMAT = "kdfast.distill/1"


def capture_rng_state() -> Dict[str, Any]:
    """torch / CUDA / numpy / Python RNG states as tensors and primitives (weights_only-safe)."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": str(np_name),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "python": {
            "version": int(py_version),
            "internal": torch.tensor(py_internal, dtype=torch.int64),
            "gauss_next": py_gauss,
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"].cpu())
    npst = state["numpy"]
    np.random.set_state(
        (npst["name"], npst["keys"].cpu().numpy().astype(np.uint32), npst["pos"], npst["has_gauss"], npst["cached_gaussian"])
    )
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["internal"].tolist()), py["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])


# ---------------------------------------------------------------------- the run's configuration
def describe(value: Any) -> Any:
    """``value`` as weights_only-safe primitives for a checkpoint's record of the run's configuration.

    Numbers, strings, None and bools stay; lists/tuples/dicts are described item by item; a tensor is its
    shape and dtype, a module its class name, a function its qualified name, anything else its type name:
    enough to notice that a resumed run was configured differently, never the object itself.
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        return [describe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): describe(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        return f"tensor{tuple(value.shape)} {str(value.dtype).replace('torch.', '')}"
    if isinstance(value, torch.nn.Module):
        return f"<{type(value).__name__}>"
    if callable(value):
        return f"<function {getattr(value, '__qualname__', type(value).__name__)}>"
    return f"<{type(value).__name__}>"


def config_differences(saved: Dict[str, Any], current: Dict[str, Any], prefix: str = "") -> List[str]:
    """``["optimizer.lr 0.05 -> 0.01", ...]``: the dotted keys whose values differ between two described
    configurations (keys present in only one side count as differences)."""
    out: List[str] = []
    for key in list(saved) + [k for k in current if k not in saved]:
        name = f"{prefix}{key}"
        old, new = saved.get(key, "<unset>"), current.get(key, "<unset>")
        if isinstance(old, dict) and isinstance(new, dict):
            out += config_differences(old, new, name + ".")
        elif old != new:
            out.append(f"{name} {old!r} -> {new!r}")
    return out


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and Python's ``random``."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
