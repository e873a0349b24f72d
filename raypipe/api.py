"""raypipe from Python: run a job, open a finished run, embed an AnnData in one call.

``raypipe.run`` is the engine of ``raypipe run`` (:func:`raypipe.orchestrate.runner.run_job`);
``raypipe.open_run`` reads a finished run folder; ``raypipe.embed`` takes an in-memory
AnnData, runs the same engine on it and returns the AnnData with the results attached
(conventions in :mod:`raypipe.orchestrate.export`). Nothing heavy is imported until called.
"""

from __future__ import annotations

import copy as _copy
import json
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raypipe.core.outputs import read_frame
from raypipe.core.storage import AnyPath, as_path
from raypipe.errors import InputError

if TYPE_CHECKING:
    import anndata as ad
    import pandas as pd

    from raypipe.config import JobConfig
    from raypipe.orchestrate.runner import RunSummary
    from raypipe.orchestrate.soma_export import SomaExport

__all__ = ["Run", "embed", "open_run", "run"]

MANIFEST = "manifest.json"


class Run:
    """A finished raypipe run folder (``output_dir``): read its results.

    Use :func:`open_run` (or the value :func:`run` returns). Results are read from the
    run's parquet files on each call; nothing is cached but the obs names.

    Attributes
    ----------
    output_dir
        The run folder.
    manifest
        ``manifest.json`` as a dict (status, config, versions, gene coverage, timings ...).
    summary
        The run summary when this object came from :func:`run` (``None`` from
        :func:`open_run`); ``print(run.summary.render())`` shows what the CLI prints.
    """

    def __init__(
        self, output_dir: AnyPath, manifest: dict[str, Any], summary: RunSummary | None = None
    ) -> None:
        self.output_dir = output_dir
        self.manifest = manifest
        self.summary = summary

    def __repr__(self) -> str:
        return (
            f"Run({str(self.output_dir)!r}: {self.n_obs:,} cells, "
            f"embeddings {self.methods}, annotations {self.annotation_methods})"
        )

    @property
    def config(self) -> dict[str, Any]:
        """The run's config (as stored in the manifest)."""
        return dict(self.manifest.get("config") or {})

    @property
    def n_obs(self) -> int:
        """Number of cells."""
        return int((self.manifest.get("atlas") or {}).get("n_obs", 0))

    @property
    def methods(self) -> list[str]:
        """Embedding methods the run computed."""
        return [
            m
            for m in self.manifest.get("methods") or {}
            if (self.output_dir / "embeddings" / m).is_dir()
        ]

    @property
    def annotation_methods(self) -> list[str]:
        """Embedding methods whose cells the run annotated."""
        done = (self.manifest.get("annotate") or {}).get("methods") or {}
        return [m for m in done if (self.output_dir / "annotations" / m).is_dir()]

    @property
    def atlas_path(self) -> str:
        """The atlas the run read (a ``.zarr``, or the atlas view of an input read in place).

        ``<output_dir>/atlas.zarr`` when the run ingested on the fly, its
        ``state/atlas_view.json`` when it read its input in place, else the manifest's path.
        """
        path = (self.manifest.get("atlas") or {}).get("path")
        local = self.output_dir / ("state/atlas_view.json" if _is_view(path) else "atlas.zarr")
        if local.exists():
            return str(local)
        if path and as_path(path).exists():
            return str(path)
        raise InputError(
            f"the atlas of run {self.output_dir} is gone ({path or 'no path in the manifest'})",
            fix="re-run the job (its input is re-ingested) or restore the atlas folder",
        )

    @cached_property
    def obs_names(self) -> pd.Index:
        """The cells, in the atlas's order (the row order of every result)."""
        import pandas as pd

        from raypipe.atlas.store import read_obs_names

        return pd.Index(read_obs_names(self.atlas_path), name="obs_name")

    def _check(self, method: str, kind: str) -> None:
        have = self.methods if kind == "embeddings" else self.annotation_methods
        if method not in have:
            raise InputError(
                f"run {self.output_dir} has no {kind} of method {method!r}; it has: "
                f"{', '.join(have) or '(none)'}",
                fix="use one of those, or add the method to embed.methods"
                + (" and set annotate.enabled: true" if kind == "annotations" else "")
                + " and re-run (finished shards are reused)",
            )

    def embeddings(self, method: str) -> pd.DataFrame:
        """Return one method's embeddings: a DataFrame, obs names × dimensions, float32.

        Rows follow the atlas's obs order; empty cells (zero counts / no gene with text /
        failed sentence) are all-zero rows, flagged by :meth:`empty`. ``.to_numpy()`` gives
        the (n, d) float32 matrix bit for bit as stored in the parquet parts.
        """
        import pandas as pd

        from raypipe.orchestrate.export import read_embedding_matrix

        self._check(method, "embeddings")
        x, _ = read_embedding_matrix(self.output_dir, method, self.obs_names.to_numpy())
        return pd.DataFrame(x, index=self.obs_names, copy=False)

    def empty(self, method: str) -> pd.Series:
        """Return which cells got an all-zero (empty) embedding from ``method`` (bool, by obs name)."""
        import pandas as pd

        from raypipe.core.outputs import read_parts

        self._check(method, "embeddings")
        df = read_parts(self.output_dir, "embeddings", method, columns=["obs_name", "row", "empty"])
        return pd.Series(df["empty"].to_numpy(), index=pd.Index(df["obs_name"], name="obs_name"))

    def annotations(self, method: str) -> pd.DataFrame:
        """Return the zero-shot calls for ``method``'s cells, indexed by obs name (atlas order).

        Columns as in ``annotations/<method>/part-*.parquet`` (docs/outputs.md): ``label``,
        ``best_label``, ``score``, ``margin``, ``top_labels``, ``top_scores``, ``unassigned``,
        ``label_uncentred``.
        """
        from raypipe.core.outputs import read_parts

        self._check(method, "annotations")
        df = read_parts(self.output_dir, "annotations", method)
        return df.drop(columns=["shard", "row"]).set_index("obs_name")

    def metrics(self) -> pd.DataFrame:
        """Return ``metrics.parquet``: ``dataset, method, metric, value, n_cells, sample_size``.

        The PCA baseline is method ``pca``. ``.pivot_table(index="metric", columns="method",
        values="value")`` gives the table the summary prints.
        """
        path = self.output_dir / "metrics.parquet"
        if not path.is_file():
            raise InputError(
                f"run {self.output_dir} has no metrics.parquet (evaluate.enabled was false, "
                "or input.label_key was not set)",
                fix="re-run with --set evaluate.enabled=true --set input.label_key=COLUMN "
                "(embeddings are reused)",
            )
        return read_frame(path)

    def _select(self, methods: Sequence[str] | None) -> tuple[list[str], list[str]]:
        if methods is None:
            return self.methods, self.annotation_methods
        for m in methods:
            self._check(m, "embeddings")
        return list(methods), [m for m in methods if m in self.annotation_methods]

    def to_anndata(
        self, *, adata: ad.AnnData | None = None, methods: Sequence[str] | None = None
    ) -> ad.AnnData:
        """Return the results as AnnData (conventions: docs/python.md, "Results as AnnData").

        Parameters
        ----------
        adata
            ``None``: a new AnnData with the atlas's X (read into memory), obs and var plus
            the results. Given: the results are attached to this AnnData **in place**
            (matched by obs name, in its own order) and it is returned; its X and var are
            not touched.
        methods
            Embedding methods to include (default: every one the run computed); their
            annotations come along when the run made them.
        """
        import anndata as ad

        from raypipe.orchestrate.export import attach_results, collect_results

        emb, ann = self._select(methods)
        names = self.obs_names.to_numpy()
        res = collect_results(self.output_dir, self.manifest, names, emb, ann)
        if adata is not None:
            return attach_results(adata, res)
        from raypipe.atlas.store import read_obs, read_shard, read_var

        obs = read_obs(self.atlas_path)
        obs.index = obs.index.astype(str)
        x = read_shard(self.atlas_path, 0, self.n_obs)
        out = ad.AnnData(X=x, obs=obs, var=read_var(self.atlas_path))
        return attach_results(out, res)

    def export(
        self, path: str | AnyPath, *, methods: Sequence[str] | None = None, overwrite: bool = False
    ) -> AnyPath:
        """Write the atlas plus results as ``.h5ad`` or AnnData ``.zarr`` (streamed, atomic).

        ``path`` may be a bucket URL: the file is written locally, then uploaded.
        """
        from raypipe.atlas.store import open_atlas
        from raypipe.orchestrate.export import collect_results, export_anndata

        emb, ann = self._select(methods)
        res = collect_results(self.output_dir, self.manifest, self.obs_names.to_numpy(), emb, ann)
        atlas = open_atlas(self.atlas_path)
        return export_anndata(
            path,
            atlas_path=atlas.path,
            n_obs=atlas.n_obs,
            rows_per_chunk=atlas.rows_per_chunk,
            results=res,
            overwrite=overwrite,
        )

    def export_soma(
        self,
        uri: str,
        *,
        methods: Sequence[str] | None = None,
        measurement: str | None = None,
        overwrite: bool = False,
    ) -> SomaExport:
        """Write the results into a TileDB-SOMA experiment (``obsm`` and new ``obs`` columns).

        Cells are matched by name (``soma_joinid`` keys the rows); see
        :mod:`raypipe.orchestrate.soma_export`. ``measurement`` defaults to the one the run
        read (a SOMA input), else ``RNA``.
        """
        from raypipe.orchestrate.soma_export import export_soma

        emb, ann = self._select(methods)
        soma = ((self.manifest.get("config") or {}).get("input") or {}).get("soma") or {}
        return export_soma(
            uri,
            out_dir=self.output_dir,
            obs_names=self.obs_names.to_numpy(),
            embeddings=emb,
            annotations=ann,
            measurement=measurement or soma.get("measurement") or "RNA",
            overwrite=overwrite,
        )


def _is_view(path: str | None) -> bool:
    from raypipe.atlas.store import is_view

    return bool(path) and is_view(str(path))


def open_run(output_dir: str | AnyPath) -> Run:
    """Open a finished run folder.

    Raises
    ------
    InputError
        When the folder does not exist, is not a raypipe run (no ``manifest.json``), or its
        run has not finished (status ``running``) or failed.
    """
    out = as_path(output_dir)
    manifest_path = out / MANIFEST
    if not out.is_dir():
        raise InputError(
            f"run folder {out} does not exist", fix="pass the output_dir of a `raypipe run`"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise InputError(
            f"{out} is not a raypipe run (no {MANIFEST})",
            fix="pass the output_dir of a `raypipe run` (the folder holding manifest.json)",
        ) from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{manifest_path} cannot be read: {exc}") from None
    status = manifest.get("status") if isinstance(manifest, dict) else None
    if status == "running":
        raise InputError(
            f"run {out} has not finished ({MANIFEST} says status 'running'): it is still "
            "going, or it stopped before the end",
            fix="wait for it, or run its config again (`raypipe run CONFIG`; finished shards "
            "are reused)",
        )
    if status != "complete":
        raise InputError(
            f"run {out} did not complete ({MANIFEST} says status {status!r})",
            fix="see its failures.parquet / the run's output, fix the cause and run the config "
            "again (finished shards are reused)",
        )
    return Run(out, manifest)


def _load(
    config: str | Path | Mapping[str, Any] | JobConfig, overrides: Sequence[str] | None
) -> JobConfig:
    from raypipe.config import JobConfig, load_config

    if isinstance(config, JobConfig):
        if not overrides:
            return config
        return load_config(config.model_dump(mode="json"), list(overrides))
    if isinstance(config, Mapping):
        return load_config(_copy.deepcopy(dict(config)), list(overrides or []))
    return load_config(config, list(overrides or []))


def run(
    config: str | Path | Mapping[str, Any] | JobConfig,
    *,
    overrides: Sequence[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    force: bool = False,
    refit: bool = False,
) -> Run:
    """Run a job (what ``raypipe run`` does) and return the finished :class:`Run`.

    Parameters
    ----------
    config
        A YAML path, a dict with the same keys, or a :class:`raypipe.config.JobConfig`.
    overrides
        ``"key.sub=value"`` strings, as ``--set`` (e.g. ``["shards.rows=1024"]``).
    overwrite
        Start fresh: delete the previous run in ``output_dir``.
    progress
        Show one progress bar per stage.
    force
        Use a suspicious label column (numeric, one class per few cells) with a warning
        instead of refusing it (``raypipe run --force``).
    refit
        Fit the statistics recorded from the atlas (HVG genes, centring means) again, as a
        new embedding-space version (``raypipe run --refit``).
    """
    from raypipe.orchestrate.runner import run_job

    job = _load(config, overrides)
    summary = run_job(job, overwrite=overwrite, progress=progress, force=force, refit=refit)
    done = open_run(job.output_dir)
    done.summary = summary
    return done


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def embed(
    adata: ad.AnnData,
    *,
    methods: Sequence[str] = ("genept_w",),
    annotate: bool = False,
    copy: bool = True,
    progress: bool = True,
    **config: Any,
) -> ad.AnnData:
    """Embed (and optionally annotate) the cells of an in-memory AnnData; return it with results.

    Writes the chosen matrix (with the label/batch columns and the var names) into the run
    folder, where the run ingests it as its atlas; runs the same engine as ``raypipe run`` on
    the embedded Ray (or the cluster ``ray={"address": ...}`` names) and attaches
    ``obsm["X_<method>"]``, ``obs["<method>_empty"]``, ``obs["raypipe_<method>_label"|
    "_score"|"_margin"]`` (with ``annotate=True``) and ``uns["raypipe"]``.

    Parameters
    ----------
    adata
        Cells × genes. Its var names must be gene symbols or Ensembl ids; the matrix used
        (X, or ``input={"layer": ...}``: a layer name or ``"raw"``) must hold raw counts or
        log-normalised values, not scaled data.
    methods
        Embedding methods (``genept_w``, ``genept_s``, ``ce``).
    annotate
        Add zero-shot cell-type calls (candidates from ``annotate={"candidates": [...]}``
        or the labels in ``input={"label_key": ...}``).
    copy
        Return a copy with the results (default). ``False`` attaches them to ``adata`` itself.
    progress
        Show one progress bar per stage.
    **config
        Any other job-config section, as in a YAML job (``genes={...}``, ``text_model={...}``,
        ``shards={...}``, ``ray={...}``, ``input={...}``, ``output_dir=...``). Without
        ``output_dir`` the run happens in a temporary folder, removed afterwards; give one
        (on storage every node sees, for a cluster) to keep the run, its gene-embedding
        cache and parquet outputs.

    Raises
    ------
    InputError
        Duplicate obs names, a matrix that is not counts/log-normalised (e.g. scaled X),
        var names that are neither gene symbols nor Ensembl ids, an unknown layer.
    """
    from raypipe.orchestrate.adata_input import (
        check_gene_names,
        check_obs_names,
        check_output_dir,
        matrix_to_embed,
        write_input,
    )
    from raypipe.orchestrate.runner import run_job

    check_obs_names(adata)
    keep = config.pop("output_dir", None)
    tmp_root = Path(tempfile.mkdtemp(prefix="raypipe-embed-"))
    out_dir = Path(keep) if keep else tmp_root / "run"
    user_input = dict(config.pop("input", None) or {})
    layer = user_input.pop("layer", None)
    data: dict[str, Any] = {
        "input": {**user_input, "path": str(out_dir / "state" / "embed_input.h5ad")},
        "output_dir": str(out_dir),
        "embed": {"methods": list(methods)},
        "annotate": {"enabled": bool(annotate)},
    }
    try:
        job = _load(_merge(data, config), None)
        matrix, var = matrix_to_embed(adata, layer)
        check_gene_names(var, job)
        check_output_dir(out_dir, job)
        write_input(Path(job.input.path), adata, matrix, var, job)
        run_job(job, overwrite=False, progress=progress)
        target = adata.copy() if copy else adata
        return open_run(out_dir).to_anndata(adata=target, methods=list(methods))
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
