"""Runs made of stages (SRM: dictionaries, then representation matching, then KD; RDSKD: generator, then
student; FSP: the FSP stage, then CE), each with its own engine, trainables, losses and epochs.

Each stage's engine is built only when the stage starts (so it sees the modules the previous stage
trained: share them by closure) and checkpoints into ``<checkpoint_dir>/<stage name>/``. On resume,
completed stages are not retrained: their engine loads its final checkpoint (restoring the modules it
trained and the RNG state at its end) and the run continues in the stage and epoch where it stopped.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Union


@dataclass
class Stage:
    """One stage: ``build()`` returns a :class:`~kdfast.distill.Distiller` trained for ``epochs`` epochs on
    ``train`` (None: the source given to :meth:`StagedRun.fit`); ``eval`` overrides fit's eval loader
    (``False``: no evaluation in this stage, e.g. a stage that trains only a generator)."""

    name: str
    epochs: int
    build: Callable[[], Any]
    train: Any = None
    eval: Any = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(f"a stage name must be an identifier (it names a checkpoint folder), got {self.name!r}")
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"stage {self.name!r}: epochs must be a positive int, got {self.epochs!r}")
        if not callable(self.build):
            raise TypeError(f"stage {self.name!r}: build must be a callable returning a Distiller")


class StagedRun:
    """Stages run in order with one checkpoint folder and exact resume.

    ``fit(train, eval_loader)`` returns ``{stage name: epoch records}``; ``engines`` holds each stage's
    engine after it ran (closed). ``checkpoint_dir=None`` writes no checkpoints; ``resume=True`` continues
    from ``<checkpoint_dir>/<stage>/last.pt`` files (a fresh run when there are none).
    """

    def __init__(self, stages: Sequence[Stage], *, checkpoint_dir: Optional[Union[str, os.PathLike]] = None,
                 resume: bool = False, log_path: Optional[str] = None):
        stages = list(stages)
        if not stages or not all(isinstance(s, Stage) for s in stages):
            raise ValueError("StagedRun needs a non-empty list of Stage objects")
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        if resume and checkpoint_dir is None:
            raise ValueError("StagedRun(resume=True) needs checkpoint_dir")
        self.stages = stages
        self.checkpoint_dir = os.fspath(checkpoint_dir) if checkpoint_dir is not None else None
        self.resume = "force" if resume == "force" else bool(resume)  # "force": resume despite a changed configuration
        self.run_config: Dict[str, Any] = {}  # sections recorded in every stage's checkpoints (record_config)
        self.log_path = log_path
        self.engines: Dict[str, Any] = {}
        self.history: Dict[str, List[Dict[str, Any]]] = {}
        self.current: Optional[str] = None

    def record_config(self, section: str, values) -> None:
        """Record ``values`` as part of the run's configuration in every stage's checkpoints (see
        :meth:`kdfast.distill.Distiller.record_config`)."""
        self.run_config[section] = dict(values)

    def fit(self, train=None, eval_loader=None) -> Dict[str, List[Dict[str, Any]]]:
        for stage in self.stages:
            self.current = stage.name
            engine = stage.build()
            if not hasattr(engine, "fit"):
                raise TypeError(f"stage {stage.name!r}: build() must return a Distiller, got {type(engine).__name__}")
            engine.stage = stage.name
            for section, values in self.run_config.items():
                engine.record_config(section, values)
            if self.checkpoint_dir is not None:
                engine.checkpoint_dir = os.path.join(self.checkpoint_dir, stage.name)
                engine.resume = self.resume
            if self.log_path is not None and getattr(engine, "log_path", None) is None:
                engine.log_path = self.log_path
            source = stage.train if stage.train is not None else train
            if source is None:
                raise ValueError(f"stage {stage.name!r} has no training source: pass one to fit() or to the Stage")
            evaluation = None if stage.eval is False else (stage.eval if stage.eval is not None else eval_loader)
            try:
                self.history[stage.name] = engine.fit(source, epochs=stage.epochs, eval_loader=evaluation)
            finally:
                engine.close()
            self.engines[stage.name] = engine
        self.current = None
        return self.history

    def close(self) -> None:
        for engine in self.engines.values():
            engine.close()
