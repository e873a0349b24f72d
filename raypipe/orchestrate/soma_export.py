"""``raypipe export RUN --soma URI``: a run's results written back into a TileDB-SOMA experiment.

Cells are matched by name to the experiment's obs (its id column: the AnnData index it was
written from, ``obs_id``, else the ``soma_joinid`` itself), so results land on the
``soma_joinid`` of the cells the run read. Each embedding method becomes a sparse
``ms[<measurement>].obsm["X_<method>"]`` (rows of the run's cells only; a cell the run did not
read has none — ``tiledbsoma.io.to_anndata`` gives it zeros); each annotated method three
new obs columns, ``raypipe_<method>_label``, ``..._cl_id`` (its Cell Ontology term, from
``annotations/label_mapping.parquet``) and ``..._score`` (empty / NaN for other cells).

Nothing existing is rewritten: X, var and other arrays stay as they are; obs gets its new
columns through ``tiledbsoma.io.update_obs`` (a schema change plus one new fragment, in which
the existing values are written again unchanged). An existing ``X_<method>`` array or obs
column is refused, before anything is written, unless ``overwrite`` (then the old array is
unlinked from ``obsm`` and a new one written; old obs columns get the new values).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from raypipe.errors import InputError

if TYPE_CHECKING:
    import pandas as pd

    from raypipe.core.storage import AnyPath

__all__ = ["SomaExport", "export_soma", "joinids_of", "obs_id_column"]

#: Obs columns written per annotated method (``raypipe_<method>_<suffix>``).
OBS_SUFFIXES = ("label", "cl_id", "score")
_BLOCK = 65_536  # cells per obsm write


@dataclass
class SomaExport:
    """What :func:`export_soma` wrote."""

    uri: str
    measurement: str
    n_cells: int
    obsm: list[str] = field(default_factory=list)
    obs_columns: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)


def joinids_of(exp: Any, obs_names: np.ndarray, where: str) -> np.ndarray:
    """Return the ``soma_joinid`` of each run cell, matched by name to the obs id column.

    Raises
    ------
    InputError
        When some of the run's cells are not in the experiment (naming a few).
    """
    import pandas as pd

    key = obs_id_column(exp)
    table = exp.obs.read(column_names=["soma_joinid", *([key] if key else [])]).concat()
    ids = table.column("soma_joinid").to_numpy()
    names = table.column(key).to_numpy(zero_copy_only=False).astype(str) if key else ids.astype(str)
    pos = pd.Index(names).get_indexer(pd.Index(obs_names.astype(str)))
    if (pos < 0).any():
        lost = obs_names[pos < 0]
        raise InputError(
            f"{int((pos < 0).sum()):,} of the run's {len(obs_names):,} cells are not in {where} "
            f"(matched by obs {key or 'soma_joinid'}; e.g. {', '.join(map(str, lost[:3]))})",
            fix="export into the experiment the run read (or one holding its cells by name)",
        )
    return np.asarray(ids[pos], dtype=np.int64)


def obs_id_column(exp: Any) -> str | None:
    """Return the obs column naming the experiment's cells (None: their ``soma_joinid``)."""
    from raypipe.atlas.soma import OBS_ID_COLUMNS, id_column

    present = [str(c) for c in exp.obs.keys()]  # noqa: SIM118 (a SOMA DataFrame)
    return id_column(exp.obs, present, OBS_ID_COLUMNS)


def _obs_columns(
    out_dir: AnyPath, annotations: list[str], obs_names: np.ndarray
) -> dict[str, np.ndarray]:
    """Return, per annotated method, the label, CL id and score of each run cell (run order)."""
    from raypipe.annotate.summary import read_candidate_table
    from raypipe.orchestrate.export import read_annotation_columns

    table = read_candidate_table(out_dir)
    to_cl: dict[str, str] = {}
    if table is not None and "cl_id" in table.columns:
        to_cl = {str(k): str(v) for k, v in zip(table["label"], table["cl_id"], strict=True) if v}
    cols: dict[str, np.ndarray] = {}
    for m in annotations:
        ann = read_annotation_columns(out_dir, m, obs_names)
        labels = ann["label"].astype(str)
        cols[f"raypipe_{m}_label"] = labels
        cols[f"raypipe_{m}_cl_id"] = np.array([to_cl.get(v, "") for v in labels], dtype=object)
        cols[f"raypipe_{m}_score"] = ann["score"].astype(np.float32)
    return cols


def _refuse_existing(names: list[str], what: str, where: str, overwrite: bool) -> list[str]:
    if names and not overwrite:
        raise InputError(
            f"{where} already has {what} {', '.join(names)}",
            fix="pass --overwrite to replace them (raypipe export RUN --soma URI --overwrite)",
        )
    return names


def export_soma(
    uri: str,
    *,
    out_dir: AnyPath,
    obs_names: np.ndarray,
    embeddings: list[str],
    annotations: list[str],
    measurement: str = "RNA",
    overwrite: bool = False,
) -> SomaExport:
    """Write a run's embeddings into ``obsm`` and its calls into ``obs`` of a SOMA experiment.

    Parameters
    ----------
    uri
        The experiment (a path, ``soma+file:///…``, ``soma+s3://…``).
    out_dir
        The finished run's folder.
    obs_names
        (n,) the run's cells in atlas order.
    embeddings, annotations
        Methods whose embeddings (``obsm["X_<method>"]``) and calls (obs columns) to write.
    measurement
        The measurement whose ``obsm`` takes the embeddings.
    overwrite
        Replace existing ``X_<method>`` arrays and obs columns of the same names.

    Raises
    ------
    InputError
        A URI that is no SOMA experiment, a missing measurement, cells not in the experiment,
        existing arrays or columns without ``overwrite``, an unfinished run.
    """
    import pyarrow as pa

    from raypipe.atlas.soma import experiment, import_tiledbsoma, soma_uri
    from raypipe.orchestrate.export import read_embedding_matrix

    import_tiledbsoma()  # or say which extra installs it
    import tiledbsoma.io

    path = soma_uri(uri)
    source = {"uri": path, "measurement": measurement}
    with experiment(source, named_by="--soma") as exp:
        if measurement not in exp.ms:
            raise InputError(
                f"SOMA experiment {path} has no measurement {measurement!r}; measurements: "
                f"{', '.join(exp.ms.keys()) or '(none)'}",
                fix="pass --measurement with one of them",
            )
        ids = joinids_of(exp, obs_names, path)
        n_rows = int(exp.obs.domain[0][1]) + 1
        ms = exp.ms[measurement]
        have_obsm = list(ms["obsm"].keys()) if "obsm" in ms else []
        obs = exp.obs.read().concat().to_pandas() if annotations else None
        obs_key = obs_id_column(exp) or "obs_id"
    keys = [f"X_{m}" for m in embeddings]
    cols = _obs_columns(out_dir, annotations, obs_names) if annotations else {}
    report = SomaExport(path, measurement, int(ids.size), keys, list(cols))
    report.replaced += _refuse_existing(
        [k for k in keys if k in have_obsm], "obsm arrays", f"{path} ({measurement})", overwrite
    )
    if obs is not None:
        report.replaced += _refuse_existing(
            [c for c in cols if c in obs.columns], "obs columns", path, overwrite
        )
        joined = np.sort(obs["soma_joinid"].to_numpy())
        if not np.array_equal(joined, np.arange(joined.size)):
            raise InputError(
                f"obs of {path} cannot take new columns: its soma_joinids are not 0..n-1 "
                "(tiledbsoma.io.update_obs needs them so; cells were deleted?)",
                fix="export into an experiment whose obs joinids are 0..n-1, or read the calls "
                "from the run's annotations/<method>/part-*.parquet",
            )
    matrices = {m: read_embedding_matrix(out_dir, m, obs_names)[0] for m in embeddings}
    if any(k in have_obsm for k in keys):
        with experiment(source, mode="w") as exp:  # unlink the old arrays (a new session
            for k in keys:  # must add the new ones: tiledbsoma refuses a key re-added at once)
                if k in have_obsm:
                    del exp.ms[measurement]["obsm"][k]
    with experiment(source, mode="w") as exp:
        ms = exp.ms[measurement]
        obsm = ms["obsm"] if "obsm" in ms else ms.add_new_collection("obsm")
        for m, key in zip(embeddings, keys, strict=True):
            x = matrices[m]
            arr = obsm.add_new_sparse_ndarray(
                key,
                uri=f"{key}-{uuid.uuid4().hex[:8]}",
                type=pa.float32(),
                shape=(n_rows, x.shape[1]),
            )
            d = x.shape[1]
            for b0 in range(0, ids.size, _BLOCK):
                block = x[b0 : b0 + _BLOCK]
                arr.write(
                    pa.Table.from_pydict(
                        {
                            "soma_dim_0": np.repeat(ids[b0 : b0 + _BLOCK], d),
                            "soma_dim_1": np.tile(np.arange(d, dtype=np.int64), len(block)),
                            "soma_data": block.reshape(-1),
                        }
                    )
                )
        if obs is not None:
            new = _new_obs(obs, obs_key, ids, cols)
            tiledbsoma.io.update_obs(exp, new, default_index_name=obs_key)
    return report


def _new_obs(
    obs: pd.DataFrame, key: str, ids: np.ndarray, cols: dict[str, np.ndarray]
) -> pd.DataFrame:
    """Return the whole obs with the new columns (empty / NaN for cells the run did not read)."""
    obs = obs.sort_values("soma_joinid").reset_index(drop=True)
    at = obs["soma_joinid"].to_numpy()
    rows = np.searchsorted(at, ids)
    for name, values in cols.items():
        fill: Any = (
            np.full(len(obs), np.nan, dtype=np.float32) if values.dtype.kind == "f" else None
        )
        if fill is None:
            fill = np.full(len(obs), "", dtype=object)
        fill[rows] = values
        obs[name] = fill
    if key in obs.columns:
        obs = obs.set_index(key)
    return obs.drop(columns=["soma_joinid"])
