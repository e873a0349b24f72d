"""The report's "Discovered cell types" section (``annotate.candidates: auto``).

Reads ``annotations/clusters.parquet`` (one row per cluster: size, name, Cell Ontology term,
how it was found, top markers) and ``annotations/cluster_dotplot.parquet`` (mean expression
and share expressing of each cluster's top markers) and draws the dot plot
``report/discovered_dotplot.png``. Shown only when the run's manifest says discovery ran.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from raypipe.core.outputs import read_frame
from raypipe.core.storage import AnyPath, write_file_atomic

__all__ = ["DOTPLOT_PNG", "discovery_section", "draw_discovery"]

DOTPLOT_PNG = "discovered_dotplot.png"


def _ran(manifest: Mapping[str, Any] | None) -> bool:
    return bool(((manifest or {}).get("annotate") or {}).get("discover"))


def draw_discovery(out_dir: AnyPath, manifest: Mapping[str, Any] | None) -> bool:
    """Draw the marker dot plot; return whether it was drawn.

    Clusters × their top markers; dot size = share of cells expressing, colour = mean
    log-normalised expression scaled per gene.
    """
    import matplotlib.pyplot as plt

    path = out_dir / "annotations" / "cluster_dotplot.parquet"
    clusters = out_dir / "annotations" / "clusters.parquet"
    if not _ran(manifest) or not path.is_file() or not clusters.is_file():
        return False
    dots = read_frame(path)
    names = read_frame(clusters).set_index("cluster")["candidate"]
    genes = list(dict.fromkeys(dots["gene"]))
    ks = sorted(dots["cluster"].unique())
    mean = dots.pivot_table(index="cluster", columns="gene", values="mean").loc[ks, genes]
    pct = dots.pivot_table(index="cluster", columns="gene", values="pct").loc[ks, genes]
    scaled = mean / np.maximum(mean.max(axis=0), 1e-9)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.5 + 0.32 * len(genes)), 1.5 + 0.42 * len(ks)))
    yy, xx = np.meshgrid(np.arange(len(ks)), np.arange(len(genes)), indexing="ij")
    sc = ax.scatter(
        xx.ravel(),
        yy.ravel(),
        s=(pct.to_numpy().ravel() * 120) + 1,
        c=scaled.to_numpy().ravel(),
        cmap="Reds",
        vmin=0,
        vmax=1,
        edgecolors="grey",
        linewidths=0.3,
    )
    ax.set_xticks(range(len(genes)), genes, rotation=90, fontsize=7)
    ax.set_yticks(range(len(ks)), [f"{k}: {names.get(k, '?')}" for k in ks], fontsize=7)
    ax.invert_yaxis()
    ax.set_title("top markers per cluster (size: share expressing; colour: mean, per gene)")
    fig.colorbar(sc, ax=ax, fraction=0.03)
    fig.tight_layout()
    write_file_atomic(
        out_dir / "report" / DOTPLOT_PNG,
        lambda target: fig.savefig(target, dpi=110, format="png"),
    )
    plt.close(fig)
    return True


def discovery_section(
    out_dir: AnyPath, manifest: Mapping[str, Any] | None, figures: Mapping[str, Any]
) -> list[str]:
    """HTML of the section: one row per cluster, then the dot plot (when drawn)."""
    path = out_dir / "annotations" / "clusters.parquet"
    if not _ran(manifest) or not path.is_file():
        return []
    t = read_frame(path)
    rows = pd.DataFrame(
        {
            "cluster": t["cluster"],
            "cells": t["n_cells"],
            "name": t["candidate"],
            "CL term": [
                f"{i} {lab}" if isinstance(i, str) and i else "—"
                for i, lab in zip(t["cl_id"], t["cl_label"], strict=True)
            ],
            "found by": [
                f"{how}" + (f" ({s:.2f})" if pd.notna(s) else "")
                for how, s in zip(t["found_by"], t["support"], strict=True)
            ],
            "top markers (logFC, % in / out)": [
                ", ".join(
                    f"{g} ({lf:.1f}, {pi:.0%}/{po:.0%})"
                    for g, lf, pi, po in list(zip(m, lfc, pin, pout, strict=True))[:6]
                )
                for m, lfc, pin, pout in zip(
                    t["markers"], t["logfc"], t["pct_in"], t["pct_out"], strict=True
                )
            ],
            "why unassigned": t["why_unassigned"],
        }
    )
    parts = [
        "<h2>Discovered cell types</h2>",
        "<p>Leiden clusters of expression PCs, their marker genes (Welch t-test, one cluster "
        "vs the rest), the name and Cell Ontology term each got and how "
        "(<code>annotations/clusters.parquet</code>); cells are then called per cell among "
        "the named types.</p>",
        rows.to_html(index=False, escape=True, na_rep="–"),
    ]
    if figures.get("discovered"):
        parts.append(f'<img src="{html.escape(DOTPLOT_PNG)}" alt="marker dot plot">')
    return parts
