from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

from raypipe.config import EvaluateConfig
from raypipe.evaluate.reduce import evaluate_embeddings
from raypipe.evaluate.report import write_report


def _pca2(x, *, seed):
    from sklearn.decomposition import PCA

    return PCA(2, random_state=seed).fit_transform(x)


@pytest.mark.parametrize(
    "projector",
    [pytest.param(_pca2, id="pca"), pytest.param(None, id="umap", marks=pytest.mark.slow)],
)
def test_report_writes_html_and_pngs(tmp_path, projector):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 6)) * 4
    labels = np.repeat(["B cell", "T cell", "monocyte"], 30).astype(object)
    x = np.vstack([c + rng.normal(size=(30, 6)) for c in centres])
    pca = x[:, :3] + rng.normal(size=(90, 3))
    batches = np.tile(["d1", "d2"], 45)
    pred = np.where(rng.random(90) < 0.8, labels, "T cell")
    cfg = EvaluateConfig(enabled=True, knn_k=5)
    ev = evaluate_embeddings(
        "toy", {"genept_w": x, "pca": pca}, labels, batches, cfg=cfg, annotations={"genept_w": pred}
    )
    index = write_report(
        tmp_path,
        ev.metrics,
        {"genept_w": x, "pca": pca},
        labels,
        {"genept_w": pred},
        ev.confusion,
        skipped=ev.skipped,
        notes=["toy data"],
        sample_size=60,
        projector=projector,
    )
    assert index == tmp_path / "report" / "index.html"
    page = index.read_text()
    assert '<tr class="baseline"><td>pca</td>' in page
    assert "asw_label" in page
    assert "toy data" in page
    for name in ("umap_genept_w.png", "umap_pca.png", "confusion_genept_w.png"):
        path = tmp_path / "report" / name
        assert f'src="{name}"' in page
        img = imread(path)
        assert img.shape[0] > 200
        assert img.shape[1] > 200
        assert img[..., :3].std() > 0.05  # something was drawn
    assert not list((tmp_path / "report").glob("*.tmp"))


def test_report_without_predictions_or_metrics(tmp_path):
    x = np.random.default_rng(1).normal(size=(20, 4))
    labels = pd.Series(["a"] * 10 + [None] * 10)
    index = write_report(
        tmp_path, pd.DataFrame(), {"m": x}, labels, sample_size=20, projector=_pca2
    )
    page = index.read_text()
    assert "No metrics were computed" in page
    assert (tmp_path / "report" / "umap_m.png").is_file()


def test_umap_kernels_use_numbas_disk_cache():
    import umap.layouts
    from numba.core.caching import FunctionCache

    from raypipe.evaluate import umap_kernels

    umap_kernels._DONE = False
    assert umap_kernels.cache_umap_kernels() > 10
    assert isinstance(umap.layouts._nb_optimize_layout_euclidean_single_epoch._cache, FunctionCache)
    assert umap_kernels.cache_umap_kernels() == 0  # once per process
