"""Sanity checks of an input's cells before a run: their names and their label column.

A label column that is numeric (``0, 1, 2, 3, 4`` as zero-shot candidates) or has more
classes than a label column sensibly has (a float column: one class per cell) is refused
unless the user forces it; cells without a label are reported in the printed summary.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd

from raypipe.core.labels import missing_labels
from raypipe.errors import InputError

if TYPE_CHECKING:
    from raypipe.config import JobConfig

__all__ = ["MAX_CLASS_SHARE", "MIN_CLASSES_CHECKED", "check_labels"]

#: A label column with more classes than this share of its labelled cells is suspicious ...
MAX_CLASS_SHARE = 0.05
#: ... once it has more than this many classes (small data sets keep their real labels).
MIN_CLASSES_CHECKED = 50


def check_labels(job: JobConfig, obs: pd.DataFrame, where: str, *, force: bool) -> list[str]:
    """Check ``input.label_key``'s column; return warnings for the printed summary.

    Parameters
    ----------
    job
        The job (``input.label_key``; ``annotate`` decides whether labels become candidates).
    obs
        The obs table (at least the label column).
    where
        The input, named in messages.
    force
        Warn instead of refusing a numeric or many-class label column (``--force``).

    Raises
    ------
    InputError
        When the column is numeric or has too many classes and ``force`` is off.
    """
    key = job.input.label_key
    if not key or key not in obs.columns:
        return []
    col = obs[key]
    n = len(col)
    missing = int(missing_labels(col).sum())
    n_classes = int(col.dropna().nunique())
    warnings = []
    if missing:
        warnings.append(
            f"{missing:,} of {n:,} cells have no label in obs[{key!r}]: they are left out of "
            "every label metric"
        )
    problems = []
    kind = col.dtype
    if pd.api.types.is_bool_dtype(kind) or pd.api.types.is_numeric_dtype(kind):
        problems.append(
            f"obs[{key!r}] is numeric ({kind}): its values ({', '.join(map(str, sorted(col.dropna().unique())[:5]))}, …) "
            "would be evaluated as cell-type names"
            + (" and offered as zero-shot candidates" if job.annotate.enabled else "")
        )
    if n_classes > max(MIN_CLASSES_CHECKED, MAX_CLASS_SHARE * (n - missing)):
        problems.append(
            f"obs[{key!r}] has {n_classes:,} distinct values for {n - missing:,} labelled cells "
            f"(more than {MAX_CLASS_SHARE:.0%} of them): it does not look like a cell-type column"
        )
    if not problems:
        return warnings
    message = f"{where}: " + "; ".join(problems)
    if not force:
        raise InputError(
            message,
            fix="set input.label_key to the cell-type column (categorical names), or pass "
            "--force (run_job(..., force=True)) to use this column anyway",
        )
    return [f"{message} (--force: used anyway)", *warnings]
