"""Distillation training: FeatureTap (layer outputs by name), Distiller (trainer), evaluate, configs.

See :class:`Distiller` for the loss-call protocol (``kdfast_inputs``) and the subclass hooks.
"""
from .checkpoint import atomic_save, capture_rng_state, load_checkpoint, restore_rng_state, seed_everything
from .tap import FeatureTap, resolve_module, unwrap_model
from .trainer import Distiller, IndexedDataset, evaluate, loss_kind, split_batch

__all__ = [
    "Distiller", "FeatureTap", "IndexedDataset", "evaluate", "loss_kind", "split_batch", "resolve_module",
    "unwrap_model", "atomic_save", "load_checkpoint", "capture_rng_state", "restore_rng_state", "seed_everything",
    "load_config", "build_from_config", "run_config",
]


def __getattr__(name):
    # The config module pulls in PyYAML, kdfast.models and kdfast.data; import it on first use.
    if name in ("load_config", "build_from_config", "run_config"):
        from . import config

        return getattr(config, name)
    raise AttributeError(f"module 'kdfast.distill' has no attribute {name!r}")
