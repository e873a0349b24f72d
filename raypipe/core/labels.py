"""Which cell labels are missing: one rule for candidates, checks and evaluation."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["missing_labels"]


def missing_labels(values: Any) -> np.ndarray:
    """Return a bool mask: the label is missing (NA, or an empty or whitespace-only string).

    Parameters
    ----------
    values
        (n,) labels (a pandas Series, categorical or array).
    """
    import pandas as pd

    s = pd.Series(values, copy=False)
    na = s.isna().to_numpy()
    blank = s.astype(str).str.strip().eq("").to_numpy()
    return np.asarray(na | blank, dtype=bool)
