"""Batch sources that are not datasets (e.g. the noise a data-free generator turns into images).

:meth:`Distiller.fit <kdfast.distill.Distiller.fit>` accepts, besides a DataLoader or a Dataset, any
object with an int attribute ``steps_per_epoch`` and a method ``batches(epoch, generator)`` that yields
that many batches. The engine passes a ``torch.Generator`` seeded from (seed, epoch, rank), so a source
that draws only from it replays an epoch exactly after a resume and gives each DDP rank its own stream.
"""
from __future__ import annotations

from typing import Iterator, Sequence, Union

import torch


def is_batch_source(obj) -> bool:
    return hasattr(obj, "steps_per_epoch") and callable(getattr(obj, "batches", None))


class NoiseSource:
    """``steps_per_epoch`` batches of standard normal noise, each of shape ``(batch_size, *shape)``.

    The batch size is per process (as a DataLoader's under DDP).
    """

    def __init__(self, batch_size: int, shape: Union[int, Sequence[int]], steps_per_epoch: int,
                 dtype: torch.dtype = torch.float32):
        for name, value in (("batch_size", batch_size), ("steps_per_epoch", steps_per_epoch)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"NoiseSource: {name} must be a positive int, got {value!r}")
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        if not shape or not all(isinstance(s, int) and s > 0 for s in shape):
            raise ValueError(f"NoiseSource: shape must be a positive int or a tuple of them, got {shape!r}")
        self.batch_size, self.shape, self.steps_per_epoch, self.dtype = batch_size, shape, steps_per_epoch, dtype

    def batches(self, epoch: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
        for _ in range(self.steps_per_epoch):
            yield torch.randn((self.batch_size, *self.shape), generator=generator, dtype=self.dtype)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __repr__(self) -> str:
        return f"NoiseSource(batch_size={self.batch_size}, shape={self.shape}, steps_per_epoch={self.steps_per_epoch})"
