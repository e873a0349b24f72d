"""The HTML report: UMAPs, confusion heatmaps and the metric table (baseline highlighted).

Writes ``<out_dir>/report/index.html`` plus PNGs beside it. UMAPs (umap-learn, seeded,
cosine) are computed on a seeded subsample of at most ``sample_size`` cells, the same cells
for every method. matplotlib runs on the Agg backend (no display needed).
"""

from __future__ import annotations

import html
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from raypipe.evaluate.baseline import BASELINE_METHOD
from raypipe.evaluate.metrics import subsample_indices

__all__ = ["umap_2d", "write_report"]


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


def umap_2d(x: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """Seeded 2-D UMAP (umap-learn, cosine, 15 neighbours) of an (n, d) embedding."""
    import umap

    n_neighbors = max(2, min(15, x.shape[0] - 1))
    reducer = umap.UMAP(n_neighbors=n_neighbors, metric="cosine", random_state=seed)
    return np.asarray(reducer.fit_transform(x))


def _umap_png(
    path: Path,
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
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _confusion_png(path: Path, method: str, table: pd.DataFrame) -> None:
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
    fig.savefig(path, dpi=110)
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


def _candidate_section(out_dir: Path) -> list[str]:
    """Per candidate: CL term, how it was found, markers and their source, per-class F1."""
    from raypipe.annotate.summary import candidate_rows, read_candidate_table

    table = read_candidate_table(out_dir)
    if table is None or table.empty:
        return []
    per_class = {
        f.stem.removeprefix("per_class_"): pd.read_parquet(f)
        for f in sorted((out_dir / "evaluation").glob("per_class_*.parquet"))
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
    "recall_at_1", "recall_at_5", "recall_at_10",
]  # fmt: skip

_CSS = """body{font-family:sans-serif;margin:2em;max-width:1400px}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px}
tr.baseline{background:#fff3c4;font-weight:bold}img{max-width:100%;margin:6px 0}"""


def write_report(
    out_dir: str | Path,
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
) -> Path:
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
        process compiles numba code, ~30 s on 2 cores; tests pass a PCA projector.)

    Returns
    -------
    pathlib.Path
        The path of ``index.html``.
    """
    import matplotlib

    matplotlib.use("Agg")
    report = Path(out_dir) / "report"
    report.mkdir(parents=True, exist_ok=True)
    truth = np.array(["NA" if pd.isna(v) else str(v) for v in np.asarray(labels, dtype=object)])
    predictions = dict(predictions or {})
    sub = subsample_indices(truth.size, sample_size, seed=seed)
    parts = [f"<h1>{html.escape(title)}</h1>"]
    parts += [f"<p>{html.escape(n)}</p>" for n in notes]
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
    parts += _candidate_section(Path(out_dir))
    kind = "UMAP" if projector is None else "2-D projection"
    parts.append(f"<h2>{kind} ({sub.size} of {truth.size} cells, seeded subsample)</h2>")
    only = next(iter(predictions)) if len(predictions) == 1 else None
    for method, emb in embeddings.items():
        pred_name = method if method in predictions else only
        pred = predictions[pred_name] if pred_name is not None else None
        pred_sub = None if pred is None else np.asarray(pred, dtype=object)[sub].astype(str)
        name = f"umap_{method}.png"
        xy = (projector or umap_2d)(np.asarray(emb)[sub], seed=seed)
        _umap_png(report / name, method, xy, truth[sub], pred_sub, str(pred_name))
        parts.append(f'<h3>{html.escape(method)}</h3><img src="{name}" alt="UMAP {method}">')
    if confusion:
        parts.append("<h2>Confusion matrices</h2>")
        for method, table in confusion.items():
            name = f"confusion_{method}.png"
            _confusion_png(report / name, method, table)
            parts.append(
                f'<h3>{html.escape(method)}</h3><img src="{name}" alt="confusion {method}">'
            )
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body>{''.join(parts)}</body></html>"
    )
    index = report / "index.html"
    tmp = index.with_suffix(".html.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(index)
    return index
