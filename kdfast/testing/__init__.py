"""Test-time code, never imported by kdfast at run time.

* :mod:`kdfast.testing.reference`: the float64 oracles (pure PyTorch, straight from the formulas).
* :mod:`kdfast.testing.baselines`: the peers' formulations (RepDistiller, torchdistill, plain PyTorch)
  that the benchmarks time kdfast against.
"""
