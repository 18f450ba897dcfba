"""Gradient hooks: Knowledge Representing's sparse recoding (Liu et al., CVPR-W 2019, arXiv 1911.05329).

The paper's equations are not available; the rule is **kdfast's interpretation** of its text (see
:func:`kdfast.ops.sparse_recoding_`): per parameter tensor theta with gradient g and a threshold tau
that starts at mean |theta| and follows it (``tau <- tau + tau_rate * (mean |theta| - tau)``),

* dominant entries (``|theta| > tau``): ``g <- boost * g``,
* inactive entries (``|theta| <= tau``): ``g <- damp * g + shrink * sign(theta)``.

Where to call it in a training step::

    scaler.scale(loss).backward()        # DDP all-reduces the gradients during backward
    scaler.unscale_(optimizer)           # AMP: the rule must see true (unscaled) gradients
    recoding.step()                      # <- here
    scaler.step(optimizer); scaler.update()

``step()`` after ``unscale_`` and after backward (so after DDP's all-reduce) is always right.
``attach()`` instead applies the rule per tensor from ``Tensor.register_post_accumulate_grad_hook``,
i.e. during backward. That is the same computation only when

* there is one backward per optimizer step (with gradient accumulation the hook fires after each
  micro-batch's accumulation and the rule would compound), and
* no GradScaler is used, or ``shrink == 0`` (the gradients are still scaled inside backward: boost
  and damp commute with the scale, the additive ``shrink * sign(theta)`` term does not).

Under DDP the post-accumulate hook of a parameter runs on each rank's local gradient before DDP
copies it into its bucket and all-reduces it. That is still exact: the rule is affine in g with
coefficients that depend only on theta and tau, which are identical on every rank, so averaging
recoded local gradients equals recoding the averaged gradient (tests/test_sparse_recoding.py checks
both variants on 2 gloo ranks). ``step()`` remains the advice: it is right in every setting above.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from . import _checks, _ext

__all__ = ["SparseRecoding"]


class SparseRecoding:
    """Sparse recoding of the gradients of ``params`` (kdfast's interpretation of KR, see module doc).

    Args:
        params: iterable of tensors (e.g. ``model.parameters()``); those with ``requires_grad=False``
            are ignored, duplicates counted once.
        boost: factor on the gradients of dominant entries (>= 1).
        damp: factor on the gradients of inactive entries, in [0, 1).
        shrink: constant pull of inactive entries towards 0 (>= 0; in gradient units, so the
            step it causes is lr * shrink).
        tau_rate: how fast each threshold follows mean |theta| (0 keeps the initial one).

    Defaults (boost 2, damp 0.9, shrink 0, tau_rate 0.01) come from benchmarks/kr_experiment.py
    (digits, a 438-parameter student, 3 seeds; benchmarks/results/kr_experiment.md): the more the
    inactive entries are slowed, the more accuracy the weak student lost (damp 0: 0.32, damp 0.5:
    0.79-0.84, damp 0.9: 0.86, KR without recoding: 0.86), while the share of near-zero weights
    grew (0.065 without recoding, 0.097 at damp 0.9, 0.17 at damp 0). damp 0.9 was the only setting
    tried that kept KR-without-recoding's accuracy, so it is the default: a mild sparsifier. Lower
    damp / add shrink for sparser students when capacity allows. Thresholds start at mean |theta|
    of each tensor when the object is built (``reset_taus()`` re-reads them, e.g. after loading
    weights).
    """

    def __init__(self, params, boost: float = 2.0, damp: float = 0.9, shrink: float = 0.0, tau_rate: float = 0.01):
        _checks.sparse_recoding_hyperparameters(boost, damp, shrink, tau_rate)
        self.boost, self.damp, self.shrink, self.tau_rate = float(boost), float(damp), float(shrink), float(tau_rate)
        seen, self.params = set(), []
        for p in params:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"params must be tensors, got {type(p).__name__}")
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                self.params.append(p)
        if not self.params:
            raise ValueError("params contains no tensor that requires grad")
        for i, p in enumerate(self.params):
            if p.dtype not in _checks.FLOAT_DTYPES:
                raise TypeError(f"params[{i}] must be float32, float64, float16 or bfloat16, got {p.dtype}")
        # One float32 threshold tensor per (device, dtype) group, so step() calls the op once per group
        # with the group's thresholds updated in place. _where[i] = (group key, position in group).
        self._groups: "OrderedDict[tuple, list[int]]" = OrderedDict()
        for i, p in enumerate(self.params):
            self._groups.setdefault((p.device, p.dtype), []).append(i)
        self._where = {}
        for key, members in self._groups.items():
            for pos, i in enumerate(members):
                self._where[i] = (key, pos)
        self._taus = {}
        self._handles = []
        self.reset_taus()

    # ------------------------------------------------------------------ thresholds
    @torch.no_grad()
    def reset_taus(self) -> None:
        """Set every threshold to the current mean |theta| of its tensor (0 for an empty tensor)."""
        for key, members in self._groups.items():
            values = [self.params[i].detach().abs().float().mean() if self.params[i].numel() else
                      torch.zeros((), device=key[0]) for i in members]
            self._taus[key] = torch.stack(values).to(device=key[0], dtype=torch.float32).contiguous()

    @property
    def taus(self) -> list[torch.Tensor]:
        """Current thresholds, one 0-d float32 tensor per parameter (in ``params`` order; views)."""
        return [self._taus[key][pos] for key, pos in (self._where[i] for i in range(len(self.params)))]

    # ------------------------------------------------------------------ applying the rule
    @torch.no_grad()
    def step(self) -> None:
        """Recode every current gradient (params whose ``.grad`` is None are skipped and keep their
        thresholds). Call after backward, after ``GradScaler.unscale_``, before ``optimizer.step()``."""
        _ext.require_ops()
        for key, members in self._groups.items():
            present = [pos for pos, i in enumerate(members) if self.params[i].grad is not None]
            if not present:
                continue
            params = [self.params[members[pos]] for pos in present]
            grads = [p.grad for p in params]
            taus = self._taus[key]
            if len(present) == len(members):
                self._apply(grads, params, taus)
            else:
                index = torch.tensor(present, device=taus.device)
                subset = taus.index_select(0, index)
                self._apply(grads, params, subset)
                taus.index_copy_(0, index, subset)

    def _apply(self, grads, params, taus) -> None:
        # .grad tensors normally share the parameter's layout (torch's gradient layout contract); a
        # grad that does not (set by hand) is recoded through a copy in the parameter's layout. The
        # op checks shapes, dtypes and devices itself.
        fixed = [g if g.stride() == p.stride() or g.shape != p.shape else torch.empty_like(p).copy_(g)
                 for g, p in zip(grads, params)]
        torch.ops.kdfast.sparse_recoding_(fixed, [p.detach() for p in params], taus,
                                          self.boost, self.damp, self.shrink, self.tau_rate)
        for g, f in zip(grads, fixed):
            if f is not g:
                g.copy_(f)

    def attach(self) -> "SparseRecoding":
        """Apply the rule per tensor during backward (``register_post_accumulate_grad_hook``) instead
        of calling :meth:`step`. See the module docstring for when this is equivalent (one backward
        per optimizer step; no GradScaler unless shrink == 0). Returns self."""
        if self._handles:
            raise RuntimeError("SparseRecoding.attach(): hooks are already attached; call detach() first")
        _ext.require_ops()
        for i, p in enumerate(self.params):
            key, pos = self._where[i]
            tau_slot = self._taus[key][pos:pos + 1]  # a (1,) view: the op updates the group's threshold in place

            def hook(param, tau_slot=tau_slot):
                with torch.no_grad():
                    self._apply([param.grad], [param], tau_slot)

            self._handles.append(p.register_post_accumulate_grad_hook(hook))
        return self

    def detach(self) -> None:
        """Remove the hooks installed by :meth:`attach` (no-op when none are)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        return {
            "taus": [t.detach().cpu().clone() for t in self.taus],
            "boost": self.boost, "damp": self.damp, "shrink": self.shrink, "tau_rate": self.tau_rate,
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        taus = state["taus"]
        if len(taus) != len(self.params):
            raise ValueError(f"state_dict has {len(taus)} thresholds but this SparseRecoding has {len(self.params)} parameters")
        _checks.sparse_recoding_hyperparameters(state["boost"], state["damp"], state["shrink"], state["tau_rate"])
        self.boost, self.damp = float(state["boost"]), float(state["damp"])
        self.shrink, self.tau_rate = float(state["shrink"]), float(state["tau_rate"])
        for i, value in enumerate(taus):
            key, pos = self._where[i]
            self._taus[key][pos] = torch.as_tensor(value, dtype=torch.float32)
