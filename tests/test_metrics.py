from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from sklearn import metrics as skm
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA

from raypipe.config import EvaluateConfig
from raypipe.core.expression import log_normalize
from raypipe.evaluate import metrics as M
from raypipe.evaluate.baseline import fit_pca_baseline
from raypipe.evaluate.reduce import METRIC_COLUMNS, METRIC_NAMES, evaluate_embeddings


def _blobs(n_per=40, k=3, d=8, seed=0, spread=0.6):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d)) * 3
    x = np.vstack([c + spread * rng.normal(size=(n_per, d)) for c in centres])
    labels = np.repeat([f"t{i}" for i in range(k)], n_per).astype(object)
    batches = np.tile(["b0", "b1"], n_per * k // 2 + 1)[: n_per * k].astype(object)
    return x, labels, batches


def test_accuracy_f1_per_class_match_sklearn():
    rng = np.random.default_rng(1)
    yt = rng.choice(["a", "b", "c"], size=200)
    yp = np.where(rng.random(200) < 0.7, yt, rng.choice(["a", "b", "c", "unassigned"], size=200))
    assert M.accuracy(yt, yp) == pytest.approx(skm.accuracy_score(yt, yp))
    labs = sorted(set(yt))
    assert M.macro_f1(yt, yp) == pytest.approx(
        skm.f1_score(yt, yp, average="macro", labels=labs, zero_division=0)
    )
    table = M.per_class_precision_recall(yt, yp)
    p, r, f, s = skm.precision_recall_fscore_support(yt, yp, labels=labs, zero_division=0)
    np.testing.assert_allclose(table["precision"], p)
    np.testing.assert_allclose(table["recall"], r)
    np.testing.assert_allclose(table["f1"], f)
    np.testing.assert_array_equal(table["support"], s)


def test_confusion_matches_sklearn_and_merges_across_shards():
    rng = np.random.default_rng(2)
    yt = rng.choice(["a", "b", "c"], size=300)
    yp = rng.choice(["a", "b", "c", "d"], size=300)
    full = M.confusion_matrix(yt, yp)
    cols = sorted(set(yt) | set(yp))
    ref = skm.confusion_matrix(yt, yp, labels=cols)
    np.testing.assert_array_equal(full.reindex(index=cols, columns=cols, fill_value=0), ref)
    parts = [M.confusion_matrix(yt[i : i + 70], yp[i : i + 70]) for i in range(0, 300, 70)]
    merged = M.merge_confusion(parts)
    pd.testing.assert_frame_equal(merged, full, check_names=False)
    assert int(merged.to_numpy().sum()) == 300


def test_nan_labels_are_dropped():
    yt = np.array(["a", None, "b", np.nan, "a"], dtype=object)
    yp = np.array(["a", "b", "b", "a", "b"], dtype=object)
    assert M.accuracy(yt, yp) == pytest.approx(2 / 3)
    assert int(M.confusion_matrix(yt, yp).to_numpy().sum()) == 3


def test_kmeans_agreement_matches_sklearn():
    x, labels, _ = _blobs()
    got = M.kmeans_agreement(x, labels, seed=3)
    clusters = KMeans(n_clusters=3, n_init=10, random_state=3).fit_predict(x)
    assert got["ari"] == pytest.approx(skm.adjusted_rand_score(labels, clusters))
    assert got["ami"] == pytest.approx(skm.adjusted_mutual_info_score(labels, clusters))
    assert got["nmi"] == pytest.approx(skm.normalized_mutual_info_score(labels, clusters))
    assert got["ari"] > 0.95  # well separated blobs


def test_leiden_finds_label_count_on_blobs():
    x, labels, _ = _blobs(n_per=50, k=4, spread=0.3)
    got = M.leiden_agreement(x, labels, k_neighbors=10, seed=0)
    assert got["n_clusters"] == 4
    assert got["ari"] > 0.9
    assert got["resolution"] > 0


def test_asw_label_matches_sklearn_cosine_and_euclidean():
    x, labels, _ = _blobs()
    ref = (skm.silhouette_score(x, labels, metric="cosine") + 1) / 2
    assert M.asw_label(x, labels) == pytest.approx(ref)
    ref_e = (skm.silhouette_score(x, labels, metric="euclidean") + 1) / 2
    assert M.asw_label(x, labels, metric="euclidean") == pytest.approx(ref_e)


def _asw_batch_by_hand(x, labels, batches):
    per_label = []
    for lab in np.unique(labels):
        m = labels == lab
        b = batches[m]
        if len(np.unique(b)) in (1, m.sum()):
            continue
        xs = x[m]
        d = np.sqrt(((xs[:, None, :] - xs[None, :, :]) ** 2).sum(-1))
        s = []
        for i in range(xs.shape[0]):
            same = (b == b[i]) & (np.arange(xs.shape[0]) != i)
            a = d[i, same].mean() if same.any() else 0.0
            other = min(d[i, b == ob].mean() for ob in np.unique(b) if ob != b[i])
            s.append(0.0 if not same.any() else (other - a) / max(a, other))
        per_label.append(np.mean(1 - np.abs(s)))
    return float(np.mean(per_label))


def _scib(fn: str, *arrays: np.ndarray) -> float:
    """Call ``scib_metrics.<fn>(*arrays)`` in a fresh interpreter.

    scib-metrics (a dev dependency; the cross-check runs in the slow suite) imports JAX, whose threads
    make every later ``fork`` of the test process unsafe; a subprocess keeps JAX out of it.
    """
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/in.npz"
        np.savez(path, *arrays)
        code = (
            "import sys, numpy as np, scib_metrics\n"
            f"a = np.load({path!r}, allow_pickle=False)\n"
            f"print(float(scib_metrics.{fn}(*[a[k] for k in sorted(a.files, key=lambda k: int(k.split('_')[1]))])))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
    return float(out.stdout.strip().splitlines()[-1])


def test_asw_batch_matches_hand_computation():
    x, labels, batches = _blobs(n_per=30)
    batches[:5] = "b2"  # uneven batches
    labels = labels.copy()
    labels[-3:] = "lonely"  # three cells, check both skip rules separately below
    batches[-3:] = "b0"  # single batch → label skipped
    got = M.asw_batch(x, labels, batches)
    assert got == pytest.approx(_asw_batch_by_hand(x, labels.astype(str), batches.astype(str)))


@pytest.mark.slow
def test_asw_batch_matches_scib():
    """scib-metrics' own ``silhouette_batch`` (JAX: a fresh interpreter, tens of seconds)."""
    x, labels, batches = _blobs(n_per=30)
    batches[:5] = "b2"
    labels = labels.copy()
    labels[-3:] = "lonely"
    batches[-3:] = "b0"
    ref = _scib("silhouette_batch", x, labels.astype(str), batches.astype(str))
    assert M.asw_batch(x, labels, batches) == pytest.approx(ref, abs=1e-5)


def test_avg_bio_and_s_final():
    assert M.avg_bio(0.3, 0.6, 0.9) == pytest.approx(0.6)
    assert M.s_final(0.5, 1.0) == pytest.approx(0.7)


def test_knn_accuracy_matches_manual_folds():
    from sklearn.model_selection import StratifiedKFold
    from sklearn.neighbors import KNeighborsClassifier

    x, labels, _ = _blobs(spread=2.5, seed=4)
    got = M.knn_accuracy(x, labels, k=5, seed=7)
    correct = 0
    for tr, te in StratifiedKFold(5, shuffle=True, random_state=7).split(x, labels):
        clf = KNeighborsClassifier(5, metric="cosine").fit(x[tr], labels[tr])
        correct += (clf.predict(x[te]) == labels[te]).sum()
    assert got == pytest.approx(correct / len(labels))
    assert 0.34 < got <= 1.0


def test_retrieval_recall_constructed():
    texts = np.eye(12)
    idx = np.array([0, 1, 2, 3])
    cells = np.zeros((4, 12))
    cells[0, 0] = 1.0  # own text first → rank 0
    cells[1, :] = np.linspace(1, 0.1, 12)  # own text (1) second → rank 1
    cells[2, 2] = 0.1
    cells[2, 3:10] = 1.0  # seven texts ahead → rank 7
    cells[3, 11] = 1.0  # own text ties the other 10 zero texts → rank 10
    got = M.retrieval_recall(cells, texts, idx, ks=(1, 5, 10))
    assert got == {1: 0.25, 5: 0.5, 10: 0.75}
    few = M.retrieval_recall(cells[:, :3], np.eye(3), [0, 1, 2, -1], ks=(1, 5))
    assert set(few) == {1}


def test_guards_skip_with_reason():
    x, labels, _batches = _blobs()
    one = np.array(["a"] * len(labels), dtype=object)
    for fn in (M.kmeans_agreement, M.asw_label, M.knn_accuracy):
        value, why = M.safe(fn, x, one)
        assert value is None
        assert "at least 2 classes" in why
    value, why = M.safe(M.asw_batch, x, labels, np.array(["b"] * len(labels)))
    assert value is None
    assert "2 batches" in why
    dup = np.zeros((4, 3))
    value, why = M.safe(M.kmeans_agreement, dup, ["a", "b", "c", "d"])
    assert value is None
    assert "distinct cells" in why
    few = [0, 40, 80, 1, 41]
    value, why = M.safe(M.leiden_agreement, x[few], labels[few])
    assert value is None
    assert "k_neighbors" in why


def test_subsample_is_seeded_and_capped():
    a = M.subsample_indices(1000, 100, seed=1)
    assert a.size == 100
    assert np.all(np.diff(a) > 0)
    np.testing.assert_array_equal(a, M.subsample_indices(1000, 100, seed=1))
    np.testing.assert_array_equal(M.subsample_indices(50, 100), np.arange(50))


def test_pca_baseline_streamed_equals_sklearn_pca():
    counts = sp.random(300, 120, density=0.2, random_state=1, format="csr") * 20
    counts.data = np.ceil(counts.data)
    blocks = lambda: (counts[i : i + 64] for i in range(0, 300, 64))  # noqa: E731
    emb = fit_pca_baseline(blocks, 10, n_top_genes=60)
    assert emb.shape == (300, 10)
    assert emb.dtype == np.float32
    dense = log_normalize(counts, dtype=np.float64).toarray()
    keep = np.sort(np.argsort(-dense.var(axis=0), kind="stable")[:60])
    ref = PCA(10, svd_solver="full").fit_transform(dense[:, keep])
    for j in range(10):  # equal up to the sign of each axis
        c = np.corrcoef(emb[:, j], ref[:, j])[0, 1]
        assert abs(c) == pytest.approx(1.0, abs=1e-4)


def test_evaluate_embeddings_long_format():
    x, labels, batches = _blobs(n_per=40, k=3)
    labels = labels.copy()
    labels[0] = None
    rng = np.random.default_rng(0)
    emb = {"good": x, "noise": rng.normal(size=x.shape)}
    pred = np.where(rng.random(len(labels)) < 0.8, labels, "t0")
    texts = np.vstack([x[labels == f"t{i}"].mean(0) for i in range(3)])
    cfg = EvaluateConfig(enabled=True, sample_size=90, knn_k=10)
    ev = evaluate_embeddings(
        "toy",
        emb,
        labels,
        batches,
        cfg=cfg,
        annotations={"good": pred},
        text_emb={"good": texts},
        text_labels=["t0", "t1", "t2"],
    )
    df = ev.metrics
    assert list(df.columns) == METRIC_COLUMNS
    assert set(df["metric"]) <= set(METRIC_NAMES)
    good = df[df.method == "good"].set_index("metric")["value"]
    noise = df[df.method == "noise"].set_index("metric")["value"]
    for m in ("ari_kmeans", "asw_label", "knn_accuracy", "avg_bio", "s_final", "ari_leiden"):
        assert good[m] > noise[m]
    assert good["recall_at_1"] == pytest.approx(1.0)
    assert set(ev.skipped.loc[ev.skipped.method == "good", "metric"]) == {
        "recall_at_5",
        "recall_at_10",
    }
    assert (df.loc[df.metric == "asw_label", "sample_size"] == 90).all()
    assert (df["n_cells"] == 119).all()  # the unlabelled cell is left out everywhere
    assert ev.notes
    assert "1 of 120" in ev.notes[0]
    assert int(ev.confusion["good"].to_numpy().sum()) == 119


def test_evaluate_single_class_and_same_batch_skip_not_crash():
    x, _, _batches = _blobs()
    one = np.array(["a"] * x.shape[0], dtype=object)
    cfg = EvaluateConfig(enabled=True)
    ev = evaluate_embeddings("toy", {"m": x}, one, one, cfg=cfg, annotations={"m": one})
    reasons = dict(zip(ev.skipped.metric, ev.skipped.reason, strict=False))
    assert "at least 2 classes" in reasons["ari_kmeans"]
    assert "equals the label column" in reasons["asw_batch"]
    assert set(ev.metrics.metric) == {"accuracy", "macro_f1"}


def test_label_metrics_on_mixed_missing_and_unassigned_labels_match_sklearn_and_pandas():
    from sklearn.metrics import accuracy_score, f1_score

    from raypipe.evaluate.metrics import accuracy, confusion_matrix, macro_f1

    rng = np.random.default_rng(5)
    pool_t = np.array(["B", "T", "NK", 3, None, np.nan, "Mono"], dtype=object)
    pool_p = np.array(["B", "T", "NK", "3", "unassigned", np.nan, "DC"], dtype=object)
    y = pool_t[rng.integers(0, pool_t.size, 5000)]
    pred = pool_p[rng.integers(0, pool_p.size, 5000)]
    keep = ~pd.isna(pd.Series(y)).to_numpy()
    yt, yp = y[keep].astype(str), pred[keep].astype(str)  # 3 and "3" are the same label
    assert accuracy(y, pred) == pytest.approx(accuracy_score(yt, yp))
    assert macro_f1(y, pred) == pytest.approx(
        f1_score(yt, yp, average="macro", labels=np.unique(yt), zero_division=0)
    )
    expected = pd.crosstab(pd.Series(yt, name="true"), pd.Series(yp, name="predicted"))
    pd.testing.assert_frame_equal(confusion_matrix(y, pred), expected.astype(np.int64))
