"""The training engine: one trainer for every method (kdfast.distill imports no method).

* :class:`Distiller`: student + frozen teacher + named, weighted losses; AMP, torchrun DDP, exact resume,
  atomic checkpoints, logging, progress bars. Extension points for methods (``kdfast.methods``):
  auxiliary trainables (:class:`Auxiliary`: a generator, aggregators, dictionaries, each with its own
  optimizer, schedule, clipping, AMP scaling, DDP wrapper and checkpoint entry), ``training_step``
  overrides with several optimisation steps per batch (``backward_step(loss, name)``), the
  ``before_optimizer_step`` hook (between ``unscale_`` and ``step``), batch sources that are not datasets
  (:class:`NoiseSource`) and runs made of stages (:class:`Stage`, :class:`StagedRun`).
* :class:`FeatureTap`: layer outputs by name (forward hooks); :func:`evaluate`. (YAML configs: kdfast.cli.config.)
* For methods: :func:`autocast` (the engine's AMP context), :func:`to_float` (reduced precision to float32),
  :func:`mix_seed` (the engine's (seed, epoch, stream) seed mixing), ``Distiller.extra_losses`` with
  :class:`StepTensors` (loss terms computed from a step's tensors, e.g. BSS's adversarial term).
"""
from .checkpoint import atomic_save, capture_rng_state, load_checkpoint, restore_rng_state, seed_everything
from .optim import Auxiliary, OptimizerSpec
from .sources import NoiseSource, is_batch_source
from .stages import Stage, StagedRun
from .tap import FeatureTap, resolve_module, unwrap_model
from .trainer import (STUDENT, Distiller, IndexedDataset, StepTensors, autocast, evaluate, json_record, loss_kind,
                      mix_seed, split_batch, to_float)

__all__ = [
    "Distiller", "Auxiliary", "OptimizerSpec", "NoiseSource", "Stage", "StagedRun", "STUDENT", "FeatureTap",
    "IndexedDataset", "evaluate", "is_batch_source", "json_record", "loss_kind", "split_batch", "resolve_module",
    "unwrap_model", "StepTensors", "autocast", "to_float", "mix_seed", "atomic_save", "load_checkpoint",
    "capture_rng_state", "restore_rng_state", "seed_everything",
]

