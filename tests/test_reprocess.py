"""Scheduled reprocessing: a grown or changed atlas reuses the work done (issue 20, item 1).

Under the default config (GenePT-w on the 500 most variable genes, centred), the first run
records what it fitted on the atlas (HVG genes, centring means) in ``state/space``; a later
run on the Kang 1.5k atlas grown by 200 cells, or with 50 cells changed, computes only the
new or changed shards, and every other cell's vector stays bit-identical. ``--refit`` fits
again: a new space version, everything recomputed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from data_factory import read_embeddings

from raypipe.config import load_config
from raypipe.orchestrate.runner import run_job

pytestmark = pytest.mark.integration

ROWS = 128  # 1,556 cells: 13 shards (the last one 20 rows); 1,756 cells: 14 shards


def _thinned(x, rng: np.random.Generator):
    """New counts for the same cells: each count binomially thinned to ~70% (real-looking)."""
    import scipy.sparse as sp

    x = sp.csr_matrix(x, dtype=np.float32, copy=True)
    x.data = rng.binomial(x.data.astype(np.int64), 0.7).astype(np.float32)
    x.eliminate_zeros()
    return x


@pytest.fixture(scope="module")
def atlases(kang1k5: Path, tmp_path_factory: pytest.TempPathFactory):
    """The Kang 1.5k file, the same + 200 new cells, and the same with 50 cells changed."""
    import anndata as ad

    root = tmp_path_factory.mktemp("reprocess")
    base = ad.read_h5ad(kang1k5)
    rng = np.random.default_rng(20)
    pick = np.sort(rng.choice(base.n_obs, 200, replace=False))
    new = ad.AnnData(
        X=_thinned(base.X[pick], rng),
        obs=base.obs.iloc[pick].copy(),
        var=base.var.copy(),
    )
    new.obs_names = [f"new-{i:03d}" for i in range(200)]
    grown = ad.concat([base, new], merge="same")
    changed = base.copy()
    rows = np.arange(300, 350)  # inside shard 2 (rows 256..383)
    x = changed.X.tocsr().copy()
    x[rows] = _thinned(x[rows], rng)
    changed.X = x
    paths = {"base": root / "kang.h5ad", "grown": root / "kang_grown.h5ad"}
    shutil.copy(kang1k5, paths["base"])
    grown.write_h5ad(paths["grown"])
    paths["changed"] = root / "kang_changed.h5ad"
    changed.write_h5ad(paths["changed"])
    return root, paths, rows


def _job(out: Path, path: Path, cache: Path, shared: Path, full: bool):
    """The default config (GenePT-w: HVG 500, centred); ``full`` adds annotation + evaluation.

    Not ``full`` (the default suite): gene texts are the symbols (test only, for speed).
    """
    cfg = {
        "input": {
            "path": str(path),
            "label_key": "cluster_id",
            "batch_key": "sample_id",
            "rows_per_chunk": ROWS,
        },
        "output_dir": str(out),
        "shards": {"rows": ROWS},
        "cache": {"path": str(cache)},
        "genes": {"orgdb": str(shared / "genes" / "orgHs_gene_text_go.tsv.gz")},
        "annotate": {"enabled": True, "smoothing": 0},
        "evaluate": {"enabled": True, "sample_size": 500, "report": False},
        "ray": {"num_cpus": 2, "actors": 2, "actor_cpus": 0.5},
    }  # everything else (embed.genept_w: hvg 500, center) is the default
    if not full:
        cfg["genes"] = {"text_source": "symbol"}
        del cfg["annotate"], cfg["evaluate"]
    return load_config(cfg)


def _first(atlases, shared_data, full: bool):
    root, paths, _ = atlases
    out = root / ("first-full" if full else "first")
    job = _job(out, paths["base"], root / "cache", shared_data, full)
    summary = run_job(job, progress=False)
    assert summary.shards_done == {"genept_w": 13}
    return out, read_embeddings(out).set_index("obs_name"), full


@pytest.fixture(scope="module")
def first(atlases, shared_data, ray_local):
    """The first complete run on the 1.5k atlas (copied by each test before it re-runs)."""
    return _first(atlases, shared_data, full=False)


@pytest.fixture(scope="module")
def first_full(atlases, shared_data, ray_local):
    """The same with annotation and evaluation (and orgdb gene texts)."""
    return _first(atlases, shared_data, full=True)


def _rerun(first, atlases, shared_data, tmp_path: Path, which: str, **kw):
    root, paths, _ = atlases
    out = tmp_path / which
    shutil.copytree(first[0], out)
    job = _job(out, paths[which], root / "cache", shared_data, first[2])
    summary = run_job(job, progress=False, **kw)
    manifest = json.loads((out / "manifest.json").read_text())
    return out, summary, manifest


def _annotations(out: Path) -> pd.DataFrame:
    parts = sorted((out / "annotations" / "genept_w").glob("part-*.parquet"))
    return pd.concat([pd.read_parquet(p) for p in parts]).set_index("obs_name")


def _same_vectors(a, b, names) -> None:
    x = np.stack(a.loc[names, "embedding"].to_numpy())
    y = np.stack(b.loc[names, "embedding"].to_numpy())
    assert x.dtype == y.dtype == np.float32
    assert np.array_equal(x, y), "old cells' vectors moved"


@pytest.mark.slow
def test_grown_atlas_computes_only_the_new_shards(first, atlases, shared_data, tmp_path):
    out, summary, manifest = _rerun(first, atlases, shared_data, tmp_path, "grown")
    assert manifest["status"] == "complete"
    # shard 12 held the last 20 old rows and now 128: its range moved; 13 is new
    assert summary.shards_done == {"genept_w": 2}
    assert manifest["methods"]["genept_w"]["recomputed"] == {
        "rows added or removed (its row range moved)": [12],
        "new rows (no result yet)": [13],
    }
    assert manifest["embedding_space"]["version"] == 1
    assert manifest["embedding_space"]["reused"] == ["genept_w"]
    assert manifest["embedding_space"]["fitted"] == []
    assert "hvg" not in summary.timings  # no moments pre-pass: the HVG set is reused
    assert any(
        "holds all 1,556 cells of the previous run (+200 new)" in w for w in summary.warnings
    )
    text = summary.render()
    assert "genept_w computed: 1 because rows added or removed" in text
    assert "1 because new rows (no result yet)" in text
    assert "fitted space: v1 (reused genept_w)" in text
    after = read_embeddings(out).set_index("obs_name")
    assert len(after) == 1756
    _same_vectors(first[1], after, first[1].index)


@pytest.mark.slow
def test_grown_atlas_recomputes_annotation_and_evaluation_as_needed(
    first_full, atlases, shared_data, tmp_path
):
    """With annotation + evaluation: new shards annotated, old ones kept; evaluation redone."""
    out, summary, manifest = _rerun(first_full, atlases, shared_data, tmp_path, "grown")
    assert manifest["status"] == "complete"
    assert summary.shards_done == {"genept_w": 2}
    ann = manifest["annotate"]["methods"]["genept_w"]
    assert ann["recomputed"] == {
        "rows added or removed (its row range moved)": [12],
        "new rows (no result yet)": [13],
    }
    assert manifest["embedding_space"]["reused"] == ["genept_w", "annotate_genept_w"]
    assert summary.evaluation.startswith("recomputed")  # the atlas changed
    assert "fitted space: v1 (reused genept_w, annotate_genept_w)" in summary.render()
    after = read_embeddings(out).set_index("obs_name")
    _same_vectors(first_full[1], after, first_full[1].index)
    old_ann, new_ann = _annotations(first_full[0]), _annotations(out)
    assert len(new_ann) == 1756
    kept = old_ann.index[old_ann["shard"] < 12]  # shards not recomputed: the same calls
    pd.testing.assert_frame_equal(old_ann.loc[kept], new_ann.loc[kept])


@pytest.mark.slow
def test_changed_cells_recompute_only_their_shard(first, atlases, shared_data, tmp_path):
    _, _, rows = atlases
    out, _summary, manifest = _rerun(first, atlases, shared_data, tmp_path, "changed")
    assert manifest["methods"]["genept_w"]["recomputed"] == {"its rows changed": [2]}
    after = read_embeddings(out).set_index("obs_name")
    old = first[1]
    changed = old.index[rows]
    _same_vectors(old, after, old.index.difference(changed))
    moved = np.stack(after.loc[changed, "embedding"].to_numpy())
    assert not np.array_equal(np.stack(old.loc[changed, "embedding"].to_numpy()), moved)


@pytest.mark.slow
def test_refit_is_a_new_version_and_recomputes_everything(
    first_full, atlases, shared_data, tmp_path
):
    out, summary, manifest = _rerun(first_full, atlases, shared_data, tmp_path, "grown", refit=True)
    assert summary.shards_done == {"genept_w": 14}
    assert manifest["embedding_space"] == {
        "version": 2,
        "path": str(out / "state" / "space" / "space-v0002.json"),
        "refit": True,
        "fitted": ["genept_w", "annotate_genept_w"],
        "reused": [],
    }
    assert "settings or fitted space changed" in manifest["methods"]["genept_w"]["recomputed"]
    v1 = json.loads((out / "state" / "space" / "space-v0001.json").read_text())
    v2 = json.loads((out / "state" / "space" / "space-v0002.json").read_text())
    assert v1["committed"]
    assert v2["committed"]
    # refitted on 1,756 cells: the HVG set moved (why it must never happen silently)
    assert (
        v1["entries"]["genept_w"]["data"]["hvg_genes"]
        != (v2["entries"]["genept_w"]["data"]["hvg_genes"])
    )
