"""TileDB-SOMA experiments (and the CELLxGENE Census) as atlases, read where they live.

The driver resolves the cells once (:func:`resolve_selection`: the ``soma_joinid`` of every
obs row the ``obs_value_filter`` selects, sorted) and the atlas view keeps them; each Ray
actor reads the rows of its own shard with ``tiledbsoma``'s ``ExperimentAxisQuery`` on those
joinids (:class:`SomaRows`), so the matrix never passes through the driver. Gene identity
comes from ``var`` (``var_id`` as tiledbsoma writes it, else the Census's ``feature_id``;
``feature_name`` symbols go to the gene-id harmonisation beside them).

``tiledbsoma`` (and ``cellxgene-census`` for the Census) come with ``pip install
'raypipe[soma]'``; they are imported only here, only when a SOMA input is used.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from raypipe.core.storage import OPTIONS_ENV, as_path, is_url
from raypipe.errors import InputError

if TYPE_CHECKING:
    import pandas as pd
    import scipy.sparse as sp

    from raypipe.config.soma import SomaConfig

__all__ = [
    "CENSUS_PREFIX",
    "OBS_ID_COLUMNS",
    "SOMA_PREFIX",
    "VAR_ID_COLUMNS",
    "SomaRows",
    "SomaSelection",
    "experiment",
    "id_column",
    "import_tiledbsoma",
    "is_soma_input",
    "resolve_selection",
    "soma_uri",
]

SOMA_PREFIX = "soma+"
CENSUS_PREFIX = "census:"
#: obs / var columns that name cells and genes, in the order they are looked for
OBS_ID_COLUMNS = ("obs_id",)
VAR_ID_COLUMNS = ("var_id", "feature_id")
_EXTRA = "pip install 'raypipe[soma]'"


def import_tiledbsoma() -> Any:
    """Import ``tiledbsoma``, or say which extra installs it."""
    try:
        import tiledbsoma
    except ImportError:
        raise InputError(
            "reading a TileDB-SOMA input needs the tiledbsoma package, which is not installed",
            fix=f"{_EXTRA} (tiledbsoma and cellxgene-census)",
        ) from None
    return tiledbsoma


def is_soma_input(path: str) -> bool:
    """Whether ``input.path`` names a SOMA experiment (by scheme, or a TileDB group there)."""
    if path.startswith((SOMA_PREFIX, CENSUS_PREFIX)):
        return True
    if is_url(path):
        try:  # one HEAD request; anything unreadable is left to the other readers to explain
            return bool((as_path(path) / "__tiledb_group.tdb").exists())
        except Exception:
            return False
    p = Path(path).expanduser()
    return p.is_dir() and ((p / "__tiledb_group.tdb").exists() or (p / "__group").is_dir())


def soma_uri(path: str) -> str:
    """Return the URI tiledbsoma opens (``soma+file:///x`` → ``/x``, ``soma+s3://b/k`` → ``s3://b/k``)."""
    uri = path.removeprefix(SOMA_PREFIX)
    if uri.startswith("file://"):
        uri = uri.removeprefix("file://")
    if not is_url(uri):
        uri = str(Path(uri).expanduser().resolve())
    return uri


def _context(soma: Any) -> Any:
    """Build the tiledbsoma context carrying the ``storage:`` section (endpoint, region, anonymous)."""
    try:
        opts = json.loads(os.environ.get(OPTIONS_ENV) or "{}")
    except ValueError:
        opts = {}
    cfg: dict[str, str] = {}
    endpoint = str(opts.get("endpoint") or os.environ.get("AWS_ENDPOINT_URL") or "")
    if endpoint:
        scheme, _, host = endpoint.rpartition("://")
        cfg["vfs.s3.endpoint_override"] = host.rstrip("/")  # TileDB takes host[:port]
        cfg["vfs.s3.scheme"] = scheme or "https"
        cfg["vfs.s3.use_virtual_addressing"] = "false"
    if opts.get("region"):
        cfg["vfs.s3.region"] = str(opts["region"])
    if opts.get("anonymous"):
        cfg["vfs.s3.no_sign_request"] = "true"
    return soma.SOMATileDBContext(tiledb_config=cfg) if cfg else None


@contextmanager
def experiment(
    source: dict[str, Any], *, mode: str = "r", named_by: str = "input.path"
) -> Iterator[Any]:
    """Open the experiment ``source`` names (``uri``, or ``organism`` + ``census_version``).

    ``mode`` is ``r`` or ``w`` (the Census is read only); ``named_by`` is the setting the
    error's fix points at (``input.path``, ``--soma``).

    Raises
    ------
    InputError
        When the URI is not a SOMA experiment (or the Census cannot be opened), naming it.
    """
    soma = import_tiledbsoma()
    if source.get("census_version"):
        try:
            import cellxgene_census
        except ImportError:
            raise InputError(
                "input.soma.census_version needs the cellxgene-census package",
                fix=f"{_EXTRA} (tiledbsoma and cellxgene-census)",
            ) from None
        organism = source["organism"]
        try:
            census = cellxgene_census.open_soma(census_version=source["census_version"])
        except Exception as exc:
            raise InputError(
                f"the CELLxGENE Census {source['census_version']!r} cannot be opened "
                f"({_short(exc)})",
                fix="check input.soma.census_version (e.g. `stable`, `2025-01-30`) and network access",
            ) from None
        try:
            data = census["census_data"]
            if organism not in data:
                raise InputError(
                    f"the Census has no organism {organism!r}; it has {', '.join(data.keys())}",
                    fix="set input.path to census:<one of them>, e.g. census:homo_sapiens",
                )
            yield data[organism]
        finally:
            census.close()
        return
    uri = source["uri"]
    try:
        exp = soma.Experiment.open(uri, mode=mode, context=_context(soma))
    except Exception as exc:
        raise InputError(
            f"{uri} is not a TileDB-SOMA experiment ({_short(exc)})",
            fix=f"set {named_by} to a SOMA experiment (soma+file:///path, soma+s3://bucket/key), "
            "e.g. one written by tiledbsoma.io.from_h5ad",
        ) from None
    try:
        yield exp
    finally:
        exp.close()


def _short(exc: BaseException) -> str:
    """Write an exception on one line (tiledbsoma appends its C++ stack after a blank line)."""
    lines = str(exc).strip().split("\n\n")[0].splitlines()
    text, name = (lines[0] if lines else ""), type(exc).__name__
    return text if text.startswith(name) else f"{name}: {text}".rstrip(": ")


def _where(source: dict[str, Any]) -> str:
    if source.get("census_version"):
        return f"the Census {source['census_version']} ({source['organism']})"
    return str(source["uri"])


def _measurement(exp: Any, source: dict[str, Any]) -> Any:
    name, layer = source["measurement"], source["layer"]
    have = list(exp.ms.keys())
    if name not in have:
        raise InputError(
            f"SOMA experiment {_where(source)} has no measurement {name!r}; measurements: "
            f"{', '.join(have) or '(none)'}",
            fix="set input.soma.measurement to one of them",
        )
    ms = exp.ms[name]
    layers = list(ms.X.keys()) if "X" in ms else []
    if layer not in layers:
        raise InputError(
            f"measurement {name!r} of {_where(source)} has no X layer {layer!r}; layers: "
            f"{', '.join(layers) or '(none)'}",
            fix="set input.soma.layer to one of them (the raw counts, e.g. `raw` or `data`)",
        )
    return ms


def id_column(frame: Any, columns: list[str], defaults: tuple[str, ...]) -> str | None:
    """Return the column naming a SOMA DataFrame's rows (None: their ``soma_joinid`` does).

    The AnnData index it was written from (tiledbsoma's metadata), else the first of
    ``defaults`` present.
    """
    try:
        original = json.loads(frame.metadata.get("soma_dataframe_original_index_name") or "null")
    except (ValueError, TypeError):
        original = None
    return next((c for c in (original, *defaults) if c and c in columns), None)


@dataclass(frozen=True)
class SomaSelection:
    """What the driver resolved once: the cells, the genes and where they come from.

    Attributes
    ----------
    source
        What every reader needs (``uri`` or ``organism``/``census_version``, ``measurement``,
        ``layer``, ``obs_id``, ``var_id``, ``obs_columns``); the view adds ``joinids``.
    joinids
        (n,) int64 ``soma_joinid`` of the selected cells, ascending.
    var
        The var table (index: gene ids).
    """

    source: dict[str, Any]
    joinids: np.ndarray
    var: pd.DataFrame


def _source_of(path: str, cfg: SomaConfig, obs_columns: list[str]) -> dict[str, Any]:
    """Return the readers' description of ``input.path`` + ``input.soma`` (no I/O)."""
    base: dict[str, Any] = {
        "measurement": cfg.measurement,
        "layer": cfg.layer,
        "obs_value_filter": cfg.obs_value_filter,
        "obs_columns": list(dict.fromkeys(obs_columns)),
    }
    if path.startswith(CENSUS_PREFIX):
        if not cfg.census_version:
            raise InputError(
                f"input.path {path} opens the CELLxGENE Census, but input.soma.census_version "
                "is not set",
                fix="set input.soma.census_version (e.g. `2025-01-30`; `stable` is not "
                "reproducible)",
            )
        return base | {
            "organism": path.removeprefix(CENSUS_PREFIX),
            "census_version": cfg.census_version,
        }
    if cfg.census_version:
        raise InputError(
            f"input.soma.census_version is set but input.path {path} is not census:<organism>",
            fix="set input.path: census:homo_sapiens (or drop census_version)",
        )
    return base | {"uri": soma_uri(path)}


def resolve_selection(path: str, cfg: SomaConfig, obs_columns: list[str]) -> SomaSelection:
    """Open the experiment, check measurement, layer and columns, resolve the filter's cells.

    Parameters
    ----------
    path
        ``input.path``.
    cfg
        ``input.soma``.
    obs_columns
        obs columns the run reads besides the cell names (labels, batches, ``obs_columns``).

    Raises
    ------
    InputError
        Naming the URI, measurement, layer, filter or column that is wrong, with the fix.
    """
    source = _source_of(path, cfg, obs_columns)
    with experiment(source) as exp:
        ms = _measurement(exp, source)
        present = [str(c) for c in exp.obs.keys()]  # noqa: SIM118 (a SOMA DataFrame)
        missing = [c for c in source["obs_columns"] if c not in present]
        if missing:
            raise InputError(
                f"obs of {_where(source)} has no column {missing[0]!r}; columns present: "
                f"{', '.join(c for c in present if c != 'soma_joinid')}",
                fix="set input.label_key / input.batch_key / input.soma.obs_columns to columns "
                "present",
            )
        try:
            ids = (
                exp.obs.read(value_filter=cfg.obs_value_filter, column_names=["soma_joinid"])
                .concat()
                .column("soma_joinid")
                .to_numpy()
            )
        except Exception as exc:
            raise InputError(
                f"input.soma.obs_value_filter {cfg.obs_value_filter!r} cannot select cells of "
                f"{_where(source)} ({_short(exc)})",
                fix="write it over obs columns present, e.g. cell_type == 'B cell' and "
                f"is_primary_data == True; columns: {', '.join(present)}",
            ) from None
        if ids.size == 0:
            raise InputError(
                f"input.soma.obs_value_filter {cfg.obs_value_filter!r} selects no cell of "
                f"{_where(source)}",
                fix="check the values it compares against (e.g. obs column categories)",
            )
        var = ms.var.read().concat().to_pandas()
        var_id = id_column(ms.var, [str(c) for c in var.columns], VAR_ID_COLUMNS)
        obs_id = id_column(exp.obs, present, OBS_ID_COLUMNS)
    source |= {"obs_id": obs_id, "var_id": var_id}
    return SomaSelection(source, np.sort(ids.astype(np.int64)), _var_frame(var, var_id))


def _var_frame(var: pd.DataFrame, var_id: str | None) -> pd.DataFrame:
    """Return var in ``soma_joinid`` order, indexed by ``var_id`` (else the joinid), other columns kept."""
    import pandas as pd

    var = var.sort_values("soma_joinid")
    index = (var[var_id] if var_id else var["soma_joinid"]).astype(str).to_numpy()
    out = var.drop(columns=[c for c in ("soma_joinid", var_id) if c]).reset_index(drop=True)
    out.index = pd.Index(index, dtype=object)
    return out


class SomaRows:
    """Rows, obs and var of the cells an atlas view selected from a SOMA experiment.

    Parameters
    ----------
    source
        The view's source: :class:`SomaSelection.source` plus ``joinids`` (a Zarr array of
        the selected ``soma_joinid`` in row order, chunked like the atlas rows).
    joinids
        The selected ``soma_joinid`` in memory instead (the driver, before a view exists).
    """

    def __init__(self, source: dict[str, Any], joinids: np.ndarray | None = None) -> None:
        self.source = source
        self._ids = joinids

    def joinids(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """``soma_joinid`` of rows ``[start, stop)`` (reads only the chunks it needs)."""
        if self._ids is not None:
            return self._ids[start:stop]
        import zarr

        from raypipe.core.storage import zarr_store

        arr = zarr.open_array(zarr_store(as_path(self.source["joinids"])), mode="r")
        stop = arr.shape[0] if stop is None else stop
        return np.asarray(arr[start:stop], dtype=np.int64)

    def rows(self, start: int, stop: int) -> sp.csr_matrix:
        """Rows ``[start, stop)`` as float32 CSR, read with one ``ExperimentAxisQuery``."""
        import pyarrow as pa
        import scipy.sparse as sp

        soma = import_tiledbsoma()
        ids = self.joinids(start, stop)
        src = self.source
        with (
            experiment(src) as exp,
            exp.axis_query(
                src["measurement"], obs_query=soma.AxisQuery(coords=(pa.array(ids),))
            ) as query,
        ):
            n_vars = query.n_vars
            tables = list(query.X(src["layer"]).tables())
            if not tables:  # no stored value in these cells
                return sp.csr_matrix((ids.size, n_vars), dtype=np.float32)
            table = pa.concat_tables(tables)
            rows = query.indexer.by_obs(table.column("soma_dim_0"))
            cols = query.indexer.by_var(table.column("soma_dim_1"))
        values = table.column("soma_data").to_numpy().astype(np.float32, copy=False)
        x = sp.coo_matrix((values, (rows, cols)), shape=(ids.size, n_vars)).tocsr()
        x.sum_duplicates()  # canonical (sorted, summed), as ingest writes it
        return x

    def read_obs(self, columns: list[str], ids: np.ndarray) -> pd.DataFrame:
        """Read obs ``columns`` of the cells ``ids`` (ascending joinids), indexed by cell name."""
        import pyarrow as pa

        src = self.source
        names = [c for c in dict.fromkeys(["soma_joinid", src.get("obs_id"), *columns]) if c]
        with experiment(src) as exp:
            df = (
                exp.obs.read(coords=(pa.array(ids),), column_names=names)
                .concat()
                .to_pandas()
                .sort_values("soma_joinid")
            )
        if len(df) != ids.size:
            raise InputError(
                f"{_where(src)} lost cells since the run resolved them ({len(df)} of {ids.size} "
                "soma_joinids found)",
                fix="run the job again: it resolves the cells anew",
            )
        key = src.get("obs_id")
        df.index = (df[key] if key else df["soma_joinid"]).astype(str).to_numpy()
        return df[columns]

    def obs_names(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Cell names (``obs_id``, else the ``soma_joinid``) of rows ``[start, stop)``."""
        return self.read_obs([], self.joinids(start, stop)).index.to_numpy(dtype=object)

    def obs_columns(self, columns: list[str]) -> pd.DataFrame:
        """Whole obs columns of the selected cells; a missing column names the ones read."""
        have = list(self.source["obs_columns"])
        missing = [c for c in columns if c not in have]
        if missing:
            raise InputError(
                f"the SOMA cells of {_where(self.source)} were read without obs column "
                f"{missing[0]!r} (read: {', '.join(have) or '(none)'})",
                fix="add it to input.soma.obs_columns (or input.label_key / batch_key)",
            )
        return self.read_obs(list(columns), self.joinids())

    def obs(self) -> pd.DataFrame:
        """Read the obs columns the run reads (labels, batches, ``input.soma.obs_columns``)."""
        return self.read_obs(list(self.source["obs_columns"]), self.joinids())

    def var(self) -> pd.DataFrame:
        """Read the measurement's var (index: ``var_id`` / ``feature_id``; other columns kept)."""
        src = self.source
        with experiment(src) as exp:
            var = _measurement(exp, src).var.read().concat().to_pandas()
        return _var_frame(var, src.get("var_id"))
