"""The HTML report: run summary, the metric table (baseline highlighted), UMAPs, confusions.

Writes ``<out_dir>/report/index.html`` plus PNGs beside it. The page opens with the run
summary read from ``manifest.json`` (cells, wall time, gene coverage, what fell back);
:func:`rerender_report` rebuilds the page from the run's files (``raypipe report``). UMAPs
(umap-learn, seeded, cosine) are computed on a seeded subsample of at most ``sample_size``
cells, the same cells for every method. matplotlib runs on the Agg backend (no display needed).
"""

from __future__ import annotations

import html
import json
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from raypipe.core.neighbors import Neighbors, cosine_neighbors
from raypipe.core.outputs import read_frame
from raypipe.core.storage import (
    AnyPath,
    as_path,
    sorted_paths,
    write_bytes_atomic,
    write_file_atomic,
)
from raypipe.errors import InputError
from raypipe.evaluate.baseline import BASELINE_METHOD
from raypipe.evaluate.metrics import subsample_indices

__all__ = ["FIGURES_FILE", "rerender_report", "summary_html", "umap_2d", "write_report"]

#: What the page shows besides the tables (title, notes, which figures were drawn), so
#: :func:`rerender_report` can rebuild the page without redrawing.
FIGURES_FILE = "figures.json"
MANIFEST_FILE = "manifest.json"  # the run's manifest (docs/outputs.md)


def _colours(values: np.ndarray) -> tuple[list[str], np.ndarray]:
    cats = sorted({str(v) for v in values})
    pos = {c: i for i, c in enumerate(cats)}
    return cats, np.array([pos[str(v)] for v in values])


def _scatter(ax: Any, xy: np.ndarray, values: np.ndarray, title: str) -> None:
    import matplotlib.pyplot as plt

    cats, codes = _colours(values)
    cmap = plt.get_cmap("tab20" if len(cats) > 10 else "tab10")
    for i, cat in enumerate(cats):
        m = codes == i
        ax.scatter(xy[m, 0], xy[m, 1], s=3, color=cmap(i % cmap.N), label=f"{cat} ({m.sum()})")
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(markerscale=4, fontsize=7, loc="best", frameon=False)


def umap_2d(
    x: np.ndarray, *, seed: int = 0, neighbors: Neighbors | None = None, n_epochs: int = 200
) -> np.ndarray:
    """Seeded 2-D UMAP (umap-learn, cosine, 15 neighbours) of an (n, d) embedding.

    The kNN graph is ``neighbors`` when it covers these rows (the evaluation's shared graph),
    else an exact one from :func:`cosine_neighbors`; it is handed to umap-learn as
    ``precomputed_knn``, which skips umap's own pynndescent search (about a minute of numba
    compilation per process on 2 cores). ``n_epochs`` 200 is umap's own choice above 10,000
    cells.
    """
    import umap

    from raypipe.evaluate.umap_kernels import cache_umap_kernels

    cache_umap_kernels()
    n = x.shape[0]
    n_neighbors = max(2, min(15, n - 1))
    graph = neighbors
    if graph is None or graph.indices.shape[0] != n or graph.k < n_neighbors - 1:
        graph = cosine_neighbors(x, n_neighbors - 1, seed=seed)
    knn_i = np.hstack([np.arange(n)[:, None], graph.indices[:, : n_neighbors - 1]])
    knn_d = np.hstack([np.zeros((n, 1), np.float32), graph.distances[:, : n_neighbors - 1]])
    # n_jobs=1 explicitly: a seed makes umap run single-threaded anyway, and with its default
    # (-1) it warns "n_jobs value 1 overridden to 1 by setting random_state" on every call.
    reducer = umap.UMAP(
        n_neighbors=n_neighbors,
        metric="cosine",
        random_state=seed,
        n_jobs=1,
        n_epochs=n_epochs,
        precomputed_knn=(knn_i, knn_d, None),
    )
    with warnings.catch_warnings():
        # umap warns that without its NNDescent index the model cannot .transform() new
        # data; the report only draws these cells, so that is expected and harmless
        warnings.filterwarnings("ignore", message=r"precomputed_knn\[2\]", category=UserWarning)
        return np.asarray(reducer.fit_transform(x))


def _umap_png(
    path: AnyPath,
    method: str,
    xy: np.ndarray,
    truth: np.ndarray,
    pred: np.ndarray | None,
    pred_name: str,
) -> None:
    import matplotlib.pyplot as plt

    panels = 2 if pred is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 5.5), squeeze=False)
    _scatter(axes[0, 0], xy, truth, f"{method}: truth")
    if pred is not None:
        _scatter(axes[0, 1], xy, pred, f"{method} map: prediction of {pred_name}")
    fig.tight_layout()
    write_file_atomic(path, lambda target: fig.savefig(target, dpi=110, format="png"))
    plt.close(fig)


def _confusion_png(path: AnyPath, method: str, table: pd.DataFrame) -> None:
    import matplotlib.pyplot as plt

    counts = table.to_numpy(dtype=float)
    frac = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(
        figsize=(max(5.5, 2.5 + 0.9 * table.shape[1]), 2.5 + 0.7 * table.shape[0])
    )
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(table.shape[1]), [str(c) for c in table.columns], rotation=45, ha="right")
    ax.set_yticks(range(table.shape[0]), [str(r) for r in table.index])
    for i in range(table.shape[0]):
        for j in range(table.shape[1]):
            ax.text(
                j,
                i,
                f"{int(counts[i, j])}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if frac[i, j] > 0.5 else "black",
            )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(
        f"{method}: confusion\n(colour = share of the true row; numbers = cells)", fontsize=10
    )
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    write_file_atomic(path, lambda target: fig.savefig(target, dpi=110, format="png"))
    plt.close(fig)


def _metric_table(metrics: pd.DataFrame) -> str:
    if metrics.empty:
        return "<p>No metrics were computed.</p>"
    wide = metrics.pivot_table(index="method", columns="metric", values="value", aggfunc="first")
    order = [c for c in _ORDER if c in wide.columns] + [c for c in wide.columns if c not in _ORDER]
    wide = wide[order]
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in ["method", *order])
    body = []
    for method, row in wide.iterrows():
        cls = ' class="baseline"' if method == BASELINE_METHOD else ""
        cells = "".join("<td>–</td>" if pd.isna(v) else f"<td>{v:.3f}</td>" for v in row)
        body.append(f"<tr{cls}><td>{html.escape(str(method))}</td>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _candidate_section(out_dir: AnyPath) -> list[str]:
    """Per candidate: CL term, how it was found, markers and their source, per-class F1."""
    from raypipe.annotate.summary import candidate_rows, read_candidate_table

    table = read_candidate_table(out_dir)
    if table is None or table.empty:
        return []
    per_class = {
        f.stem.removeprefix("per_class_"): read_frame(f)
        for f in sorted_paths((out_dir / "evaluation").glob("per_class_*.parquet"))
    }
    rows = candidate_rows(table, per_class)
    body = rows.to_html(index=False, escape=True, float_format=lambda v: f"{v:.3f}", na_rep="–")
    return [
        "<h2>Candidates</h2>",
        "<p>Each candidate's Cell Ontology term and how it was found, its marker genes "
        "(highest weight first, [source]) and per-class F1 "
        "(<code>annotations/label_mapping.parquet</code>).</p>",
        body,
    ]


_ORDER = [
    "accuracy", "macro_f1", "ari_kmeans", "ami_kmeans", "nmi_kmeans", "ari_leiden",
    "ami_leiden", "asw_label", "asw_batch", "avg_bio", "s_final", "knn_accuracy",
    "recall_at_1", "recall_at_5", "recall_at_10", "cl_exact", "cl_lineage",
]  # fmt: skip

_CSS = """body{font-family:sans-serif;margin:2em;max-width:1400px}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px}
tr.baseline{background:#fff3c4;font-weight:bold}img{max-width:100%;margin:6px 0}
table.summary th{text-align:left;background:#f4f4f4;vertical-align:top}"""


def write_report(
    out_dir: str | AnyPath,
    metrics_df: pd.DataFrame,
    embeddings: Mapping[str, np.ndarray],
    labels: Sequence[Any],
    predictions: Mapping[str, Sequence[Any]] | None = None,
    confusion: Mapping[str, pd.DataFrame] | None = None,
    *,
    skipped: pd.DataFrame | None = None,
    notes: Sequence[str] = (),
    sample_size: int = 5000,
    seed: int = 0,
    title: str = "raypipe report",
    projector: Callable[..., np.ndarray] | None = None,
    neighbors: Mapping[str, Neighbors] | None = None,
) -> AnyPath:
    """Write ``<out_dir>/report/index.html`` and its PNGs.

    Parameters
    ----------
    out_dir
        The job's output folder.
    metrics_df
        The long metric table (``metrics.parquet``).
    embeddings
        Method → (n, d) embedding in obs order.
    labels
        (n,) true labels (missing values shown as ``NA``).
    predictions
        Method → (n,) predicted labels; a method's UMAP gets a prediction panel when its
        name is here (falls back to the first annotation when only one exists).
    confusion
        Annotation method → confusion counts (rows true, columns predicted).
    skipped
        Skipped metrics with reasons (listed in the report).
    notes
        Extra remarks shown at the top.
    sample_size
        Cap on the cells drawn in each UMAP (seeded subsample).
    seed
        Seed of the subsample and of UMAP.
    projector
        ``projector(x, seed=seed) -> (n, 2)``; default :func:`umap_2d`. (The first UMAP in a
        process compiles numba code, ~10 s on 2 cores; tests pass a PCA projector.)
    neighbors
        Method → the evaluation's kNN graph of these rows; the UMAP reuses it when every cell
        is drawn (otherwise the drawn subsample gets its own exact graph).

    Returns
    -------
    pathlib.Path
        The path of ``index.html``.
    """
    import matplotlib

    from raypipe.core.outputs import atomic_write_json

    matplotlib.use("Agg")
    report = as_path(out_dir) / "report"
    report.mkdir(parents=True, exist_ok=True)
    truth = np.array(["NA" if pd.isna(v) else str(v) for v in np.asarray(labels, dtype=object)])
    predictions = dict(predictions or {})
    sub = subsample_indices(truth.size, sample_size, seed=seed)
    kind = "UMAP" if projector is None else "2-D projection"
    figures: dict[str, Any] = {
        "title": title,
        "notes": [str(n) for n in notes],
        "projection": kind,
        "n_drawn": int(sub.size),
        "n_cells": int(truth.size),
        "umap": [],
        "confusion": [],
    }
    only = next(iter(predictions)) if len(predictions) == 1 else None
    for method, emb in embeddings.items():
        pred_name = method if method in predictions else only
        pred = predictions[pred_name] if pred_name is not None else None
        pred_sub = None if pred is None else np.asarray(pred, dtype=object)[sub].astype(str)
        name = f"umap_{method}.png"
        if projector is not None:
            xy = projector(np.asarray(emb)[sub], seed=seed)
        else:
            graph = (neighbors or {}).get(method) if sub.size == truth.size else None
            xy = umap_2d(np.asarray(emb)[sub], seed=seed, neighbors=graph)
        _umap_png(report / name, method, xy, truth[sub], pred_sub, str(pred_name))
        figures["umap"].append(method)
    for method, table in (confusion or {}).items():
        _confusion_png(report / f"confusion_{method}.png", method, table)
        figures["confusion"].append(method)
    from raypipe.evaluate.discovery_report import draw_discovery

    figures["discovered"] = draw_discovery(as_path(out_dir), _read_manifest(as_path(out_dir)))
    atomic_write_json(report / FIGURES_FILE, figures)
    return _write_page(as_path(out_dir), figures, metrics_df, skipped)


def rerender_report(out_dir: str | AnyPath) -> AnyPath:
    """Re-render ``<out_dir>/report/index.html`` from the run's files; return its path.

    Reads ``manifest.json`` (the summary at the top), ``metrics.parquet``,
    ``evaluation/skipped.parquet`` and the figures the run drew (``report/figures.json`` and
    the PNGs beside it; figures are not redrawn — they change only when a run recomputes
    them). Cheap: no embedding is read.

    Raises
    ------
    InputError
        When ``out_dir`` holds no ``manifest.json`` (not a raypipe run).
    """
    out = as_path(out_dir)
    manifest = _read_manifest(out)
    if manifest is None:
        raise InputError(
            f"{out} is not a raypipe run (no {MANIFEST_FILE})",
            fix="pass the output_dir of a `raypipe run`",
        )
    metrics = out / "metrics.parquet"
    skipped = out / "evaluation" / "skipped.parquet"
    report = out / "report"
    try:
        figures = json.loads((report / FIGURES_FILE).read_text())
    except (OSError, ValueError):
        cfg = manifest.get("config", {}).get("input", {})
        name = cfg.get("name") or Path(str(cfg.get("path", out.name))).stem
        figures = {  # a report drawn before figures.json existed: list the PNGs present
            "title": f"raypipe report: {name}",
            "notes": list((manifest.get("evaluation") or {}).get("notes", [])),
            "umap": sorted(p.stem.removeprefix("umap_") for p in report.glob("umap_*.png")),
            "confusion": sorted(
                p.stem.removeprefix("confusion_") for p in report.glob("confusion_*.png")
            ),
        }
    for key, prefix in (("umap", "umap"), ("confusion", "confusion")):
        figures[key] = [m for m in figures.get(key, []) if (report / f"{prefix}_{m}.png").is_file()]
    report.mkdir(parents=True, exist_ok=True)
    return _write_page(
        out,
        figures,
        read_frame(metrics) if metrics.is_file() else pd.DataFrame(),
        read_frame(skipped) if skipped.is_file() else None,
    )


def _read_manifest(out: AnyPath) -> dict[str, Any] | None:
    try:
        data = json.loads((out / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_page(
    out: AnyPath, figures: Mapping[str, Any], metrics_df: pd.DataFrame, skipped: pd.DataFrame | None
) -> AnyPath:
    """Assemble ``index.html``: run summary, notes, metrics beside the baseline, figures."""
    title = str(figures.get("title", "raypipe report"))
    parts = [f"<h1>{html.escape(title)}</h1>"]
    manifest = _read_manifest(out)
    if manifest is not None:
        parts.append(summary_html(manifest))
    parts += [f"<p>{html.escape(str(n))}</p>" for n in figures.get("notes", [])]
    parts += ["<h2>Metrics</h2>", _metric_table(metrics_df)]
    parts.append(
        f"<p>Highlighted row: the <b>{BASELINE_METHOD}</b> baseline (PCA of the "
        "log-normalised matrix).</p>"
    )
    if skipped is not None and not skipped.empty:
        items = "".join(
            f"<li>{html.escape(str(r.method))} / {html.escape(str(r.metric))}: "
            f"{html.escape(str(r.reason))}</li>"
            for r in skipped.itertuples()
        )
        parts += ["<h3>Skipped metrics</h3>", f"<ul>{items}</ul>"]
    from raypipe.evaluate.discovery_report import discovery_section

    parts += discovery_section(out, manifest, figures)
    parts += _candidate_section(out)
    if figures.get("umap"):
        head = html.escape(str(figures.get("projection", "UMAP")))
        if "n_drawn" in figures:
            head += f" ({figures['n_drawn']} of {figures['n_cells']} cells, seeded subsample)"
        parts.append(f"<h2>{head}</h2>")
        for method in figures["umap"]:
            name = html.escape(f"umap_{method}.png")
            parts.append(f'<h3>{html.escape(method)}</h3><img src="{name}" alt="UMAP {name}">')
    if figures.get("confusion"):
        parts.append("<h2>Confusion matrices</h2>")
        for method in figures["confusion"]:
            name = html.escape(f"confusion_{method}.png")
            parts.append(f'<h3>{html.escape(method)}</h3><img src="{name}" alt="confusion {name}">')
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body>{''.join(parts)}</body></html>"
    )
    index = out / "report" / "index.html"
    write_bytes_atomic(index, page.encode("utf-8"))
    return index


def summary_html(manifest: Mapping[str, Any]) -> str:
    """Return the run summary at the top of the report: cells, wall time, coverage, fallbacks.

    Parameters
    ----------
    manifest
        The run's ``manifest.json``. While the run is still going (the evaluation draws the
        report before the run ends) it says so; ``raypipe report`` re-renders it afterwards.
    """
    esc = html.escape
    status = str(manifest.get("status", "unknown"))
    atlas = manifest.get("atlas") or {}
    genes = manifest.get("genes") or {}
    shards = manifest.get("shards") or {}
    warnings = [str(w) for w in manifest.get("warnings") or []]
    rows: list[tuple[str, str]] = [("status", esc(status))]
    if status != "complete":
        rows[0] = (
            "status",
            f"{esc(status)} — this summary is completed when the run ends "
            "(<code>raypipe report OUTPUT_DIR</code> re-renders it)",
        )
    if atlas:
        n = int(atlas.get("n_obs", 0))
        cells = f"{n:,} cells × {int(atlas.get('n_vars', 0)):,} genes (X: {esc(str(atlas.get('x_kind', '?')))})"
        if shards:
            cells += f", {int(shards.get('n', 0))} shards of ≤ {int(shards.get('rows', 0)):,} rows"
        rows.append(("cells", cells))
    if "wall_s" in manifest:
        wall = float(manifest["wall_s"])
        n = int(atlas.get("n_obs", 0))
        line = f"{wall:,.1f} s ({n / wall if wall else 0:,.0f} cells/s end to end)"
        timings = manifest.get("timings") or {}
        if timings:
            line += "; " + ", ".join(f"{esc(k)} {float(v):.1f} s" for k, v in timings.items())
        rows.append(("wall time", line))
    cov = genes.get("coverage") or {}
    if cov:
        rows.append(
            (
                "gene coverage",
                f"{int(cov.get('n_covered', 0)):,} / {int(cov.get('n_genes', 0)):,} atlas genes "
                f"have text ({float(cov.get('share', 0.0)):.1%}; source "
                f"{esc(str(genes.get('text_source')))}, text model {esc(str(genes.get('model')))})",
            )
        )
    fell_back = [w for w in warnings if "FALLBACK" in w]
    rows.append(("fell back", "<br>".join(esc(w) for w in fell_back) if fell_back else "nothing"))
    methods = manifest.get("methods") or {}
    if methods:
        n_shards = int(shards.get("n", 0))
        rows.append(
            (
                "methods",
                "<br>".join(
                    f"{esc(m)}: {int(v.get('shards_computed', 0))} shards computed, "
                    f"{max(n_shards - int(v.get('shards_computed', 0)), 0)} reused"
                    for m, v in methods.items()
                ),
            )
        )
    usage = manifest.get("llm_usage")
    if usage:
        rows.append(("LLM usage", f"<code>{esc(json.dumps(usage, sort_keys=True))}</code>"))
    other = [w for w in warnings if "FALLBACK" not in w]
    if other:
        rows.append(("warnings", "<br>".join(esc(w) for w in other)))
    rows.append(
        (
            "config",
            f"hash {esc(str(manifest.get('config_hash', '?')))}; started "
            f"{esc(str(manifest.get('started', '?')))}"
            + (f", finished {esc(str(manifest['finished']))}" if "finished" in manifest else ""),
        )
    )
    body = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<h2>Run summary</h2><table class="summary">{body}</table>'
