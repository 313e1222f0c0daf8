"""The one min-max normalisation, for torch tensors and numpy arrays alike. It imports no torch, so
the pictures and the torch-free scorer of exported models (`aaclip_core.deploy`) use it too; the
score formula around it is in :mod:`aaclip_core.evaluation.calibration`."""

from __future__ import annotations

import numpy as np


def _like(x, value):
    """``value`` as a scalar of x's dtype (and device), so the arithmetic happens in x's precision."""
    return x.new_tensor(value) if hasattr(x, "new_tensor") else x.dtype.type(value)


def minmax(x, lo=None, hi=None):
    """``(x - lo) / (hi - lo)``, lo/hi defaulting to x's own min and max; all zeros when hi <= lo (a
    constant map carries no ranking). Not clipped: a new image can fall outside a test set's range."""
    lo = x.min() if lo is None else _like(x, lo)
    hi = x.max() if hi is None else _like(x, hi)
    if not hi > lo:
        return x.new_zeros(x.shape) if hasattr(x, "new_zeros") else np.zeros_like(x)
    return (x - lo) / (hi - lo)
