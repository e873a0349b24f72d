"""Atlases, outputs and caches on object storage, against a real S3 server (moto, loopback).

One moto server (a subprocess on 127.0.0.1) serves the module; raypipe finds it the standard
way, through ``AWS_ENDPOINT_URL`` and the AWS credential env vars. The Kang 1.5k ``.h5ad`` is
uploaded once. The end-to-end case is a real ``raypipe run`` subprocess, killed by PID
mid-way and run again: every cell exactly once, only missing shards recomputed, annotate +
evaluate + report + ``raypipe export`` from the bucket. A second atlas sharing genes then
embeds none of them (the shared gene-embedding cache in the bucket). Bad URLs, missing
credentials and a server that goes away fail with errors naming the URL, never the secret.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from cluster_utils import kill_pids, tree
from servers.s3 import MOTO, MotoServer, s3_env

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[1]
SECRET = "sEcReT-raypipe-test-0123456789"  # must never appear in logs, manifests or outputs
KEY_ID = "AKIARAYPIPETEST"
INPUT = "s3://atlases/kang1k5.h5ad"
N_SHARDS = 13  # 1,556 cells in shards of 128 rows


def _env(endpoint: str) -> dict[str, str]:
    return s3_env(endpoint, secret=SECRET, key_id=KEY_ID)


@pytest.fixture(scope="module")
def s3(kang1k5: Path, tmp_path_factory):
    """A moto S3 server with buckets ``atlases`` (the Kang 1.5k file), ``runs``, ``shared``."""
    if not MOTO.exists():
        pytest.skip("moto[server] is not installed (pip install -e '.[dev]')")
    import ray

    from raypipe.core import storage

    if ray.is_initialized():  # an embedded Ray's workers keep the environment it started with:
        ray.shutdown()  # the runs here start their own, which sees the S3 endpoint and keys
    server = MotoServer()
    try:
        with pytest.MonkeyPatch.context() as mp:
            for k, v in _env(server.endpoint).items():
                mp.setenv(k, v)
            mp.delenv(storage.OPTIONS_ENV, raising=False)
            storage.reset()
            fs = storage.open_fs("s3")
            for bucket in ("atlases", "runs", "shared"):
                fs.mkdir(bucket)
            fs.put_file(str(kang1k5), INPUT.removeprefix("s3://"))
            yield server
    finally:
        if ray.is_initialized():
            ray.shutdown()
        storage.reset()
        server.stop()


def _config(tmp_path: Path, **sets: object) -> Path:
    cfg: dict = {
        "input": {
            "path": INPUT,
            "label_key": "cluster_id",
            "batch_key": "sample_id",
            "rows_per_chunk": 128,
        },
        "output_dir": "s3://runs/kang1k5",
        "cache": {"path": "s3://shared/raypipe-cache"},
        "shards": {"rows": 128},
        "genes": {"text_source": "symbol"},
        # test only: no HVG pre-pass (one Ray Data stage less per run), for speed
        "embed": {"methods": ["genept_w"], "genept_w": {"hvg": None}},
        "annotate": {"enabled": True},
        "evaluate": {"enabled": True, "sample_size": 600},
        "ray": {"num_cpus": 2, "actors": 1, "actor_cpus": 0.5},
    }
    for key, value in sets.items():
        *head, last = key.split("__")
        d = cfg
        for h in head:
            d = d.setdefault(h, {})
        d[last] = value
    path = tmp_path / f"job-{len(list(tmp_path.glob('job-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _raypipe(*args: str, endpoint: str, **kw) -> subprocess.Popen:
    env = {**os.environ, **_env(endpoint), "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "raypipe", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its embedded Ray is in its session: cleaned up with it
        **kw,
    )


def _fs():
    from raypipe.core.storage import open_fs

    return open_fs("s3")


def _markers(prefix: str, stage: str = "genept_w") -> int:
    return len(_fs().glob(f"{prefix}/state/{stage}/shard-*.json"))


def _manifest(prefix: str) -> dict:
    return json.loads(_fs().cat_file(f"{prefix}/manifest.json"))


def _cells(prefix: str, kind: str = "embeddings") -> collections.Counter[str]:
    import pyarrow.parquet as pq

    got: collections.Counter[str] = collections.Counter()
    for f in _fs().glob(f"{prefix}/{kind}/genept_w/part-*.parquet"):
        t = pq.read_table(io.BytesIO(_fs().cat_file(f)), columns=["obs_name"])
        got.update(t.column("obs_name").to_pylist())
    return got


def _no_secret(prefix: str, texts: list[str]) -> None:
    for text in texts:
        assert SECRET not in text
    for f in _fs().find(prefix):
        assert SECRET.encode() not in _fs().cat_file(f), f


@pytest.mark.slow
def test_killed_run_resumes_and_every_stage_writes_to_the_bucket(s3, kang1k5, tmp_path):
    """input, output_dir and cache.path on S3; killed by PID mid-way; re-run; export."""
    import anndata as ad

    names = [str(n) for n in ad.read_h5ad(kang1k5, backed="r").obs_names]
    cfg = _config(tmp_path)
    prefix = "runs/kang1k5"
    first = _raypipe("run", str(cfg), endpoint=s3.endpoint)
    try:
        deadline = time.time() + 300
        while _markers(prefix) < 2:
            assert first.poll() is None, first.communicate()[1][-3000:]
            assert time.time() < deadline, "no finished shard within 300 s"
            time.sleep(0.1)
        # the driver by PID, with its embedded Ray's processes (its descendants) at once, so
        # no orphaned worker finishes a shard after the count below
        kill_pids(tree(first.pid))
        first.wait(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(first.pid, signal.SIGKILL)  # what is left of its embedded Ray
        first.communicate()
    done_before = _markers(prefix)
    assert 2 <= done_before < N_SHARDS, done_before
    assert _manifest(prefix)["status"] == "running"  # never `complete`
    # a killed run leaves only committed parts: each part it wrote has its marker or is redone
    assert len(_cells(prefix)) <= len(names)

    second = _raypipe("run", str(cfg), endpoint=s3.endpoint)
    out, err = second.communicate(timeout=500)
    assert second.returncode == 0, err[-4000:]
    manifest = _manifest(prefix)
    print("resumed run timings", manifest["timings"])
    assert manifest["status"] == "complete"
    computed = manifest["methods"]["genept_w"]["shards_computed"]
    assert computed == N_SHARDS - done_before, (computed, done_before)

    # one embedding per cell, read back from the bucket; annotations too
    emb = _cells(prefix)
    assert emb == collections.Counter(names), "cells missing or written twice"
    assert _cells(prefix, "annotations") == collections.Counter(names)
    fs = _fs()
    for key in (
        "metrics.parquet",
        "report/index.html",
        "report/umap_genept_w.png",
        "annotations/label_mapping.parquet",
        "genes/gene_embeddings.parquet",
        "atlas.zarr/zarr.json",
    ):
        assert fs.exists(f"{prefix}/{key}"), key
    assert fs.glob("shared/raypipe-cache/gene_embeddings/seg-*.parquet")
    # the genes were embedded by the killed run and kept in the shared cache
    assert manifest["genes"]["cache"]["embedded"] == 0
    assert manifest["genes"]["cache"]["hits"] == manifest["genes"]["cache"]["texts"] > 1000

    # raypipe export reads the run from the bucket
    h5ad = tmp_path / "kang.h5ad"
    exp = _raypipe("export", "s3://runs/kang1k5", "--out", str(h5ad), endpoint=s3.endpoint)
    eout, eerr = exp.communicate(timeout=300)
    assert exp.returncode == 0, eerr[-3000:]
    exported = ad.read_h5ad(h5ad)
    assert exported.n_obs == len(names)
    assert exported.obsm["X_genept_w"].shape[0] == len(names)
    # ... and writes it to the bucket too (.zarr: uploaded, root metadata last)
    exp2 = _raypipe(
        "export", "s3://runs/kang1k5", "--out", "s3://runs/exports/kang.zarr", endpoint=s3.endpoint
    )
    e2out, e2err = exp2.communicate(timeout=300)
    assert exp2.returncode == 0, e2err[-3000:]
    fs.invalidate_cache()
    fs.get("runs/exports/kang.zarr/", str(tmp_path / "kang.zarr") + "/", recursive=True)
    from_bucket = ad.read_zarr(tmp_path / "kang.zarr")
    assert list(from_bucket.obs_names) == list(exported.obs_names)
    np.testing.assert_array_equal(from_bucket.obsm["X_genept_w"], exported.obsm["X_genept_w"])
    _no_secret(prefix, [out, err, eout, eerr, e2out, e2err])


def _bucket_atlases(kang1k5, tmp_path):
    """Two atlases in the bucket: 300 Kang cells × 900 genes, and 300 others × 600 of them."""
    import anndata as ad

    adata = ad.read_h5ad(kang1k5)
    for name, part in (("first", adata[:300, :900]), ("second", adata[300:600, :600])):
        local = tmp_path / f"{name}.h5ad"
        part.copy().write_h5ad(local)
        _fs().put_file(str(local), f"atlases/{name}.h5ad")
    return adata


def _bucket_job(tmp_path, name: str, cache: str, out: str = "", **sets: object):
    from raypipe.config import load_config

    cfg = yaml.safe_load(_config(tmp_path, **sets).read_text())
    cfg["input"].update(path=f"s3://atlases/{name}.h5ad", rows_per_chunk=128)
    cfg.update(output_dir=f"s3://runs/{out or name}", cache={"path": cache})
    cfg["genes"]["min_coverage"] = 0.1
    return load_config(cfg)


def test_a_run_with_input_output_and_caches_in_the_bucket(s3, kang1k5, tmp_path):
    """In the default suite: input, output and caches on S3, embedded and annotated.

    The killed-and-resumed CLI run (``slow``) covers evaluation, the report and export too.
    """
    from raypipe.orchestrate.runner import run_job

    adata = _bucket_atlases(kang1k5, tmp_path)
    job = _bucket_job(tmp_path, "first", "s3://shared/run-cache", evaluate__enabled=False)
    first = run_job(job, progress=False)
    assert first.shards_done == {"genept_w": 3}
    manifest = _manifest("runs/first")
    assert manifest["status"] == "complete"
    assert manifest["genes"]["cache"]["embedded"] == manifest["genes"]["cache"]["texts"] > 0
    assert sum(_cells("runs/first").values()) == sum(_cells("runs/first", "annotations").values())
    assert set(_cells("runs/first")) == set(adata.obs_names[:300])
    assert _fs().exists("runs/first/annotations/label_mapping.parquet")


@pytest.mark.slow
def test_a_second_atlas_embeds_no_gene_the_bucket_cache_holds(s3, kang1k5, tmp_path):
    from raypipe.orchestrate.runner import run_job

    _bucket_atlases(kang1k5, tmp_path)
    cache = "s3://shared/second-atlas-cache"
    off = {"annotate__enabled": False, "evaluate__enabled": False}
    run_job(_bucket_job(tmp_path, "first", cache, "cache-first", **off), progress=False)
    summary = run_job(_bucket_job(tmp_path, "second", cache, "cache-second", **off), progress=False)
    assert summary.shards_done == {"genept_w": 3}
    stats = _manifest("runs/cache-second")["genes"]["cache"]
    assert stats["embedded"] == 0
    assert stats["hits"] == stats["texts"] > 0
    assert stats["path"] == f"{cache}/gene_embeddings"


@pytest.mark.parametrize(
    ("sets", "named"),
    [
        ({"input__path": "s3://no-such-bucket/a.h5ad"}, "s3://no-such-bucket/a.h5ad"),
        ({"input__path": "s3://atlases/missing.h5ad"}, "s3://atlases/missing.h5ad"),
        ({"output_dir": "s3://no-such-bucket/run"}, "s3://no-such-bucket/run"),
    ],
    ids=["missing-bucket", "missing-key", "missing-output-bucket"],
)
def test_bad_urls_fail_naming_the_url(s3, tmp_path, sets, named):
    from raypipe.config import load_config
    from raypipe.errors import InputError
    from raypipe.orchestrate.runner import run_job

    cfg = yaml.safe_load(_config(tmp_path, **sets).read_text())
    with pytest.raises(InputError) as info:
        run_job(load_config(cfg), progress=False)
    assert named in str(info.value)
    assert SECRET not in str(info.value)
    assert not _fs().exists("no-such-bucket")


def test_missing_credentials_fail_naming_the_url(s3, tmp_path, monkeypatch):
    from raypipe.config import load_config
    from raypipe.core import storage
    from raypipe.errors import InputError
    from raypipe.orchestrate.runner import run_job

    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    storage.reset()
    cfg = yaml.safe_load(_config(tmp_path, output_dir="s3://runs/nocreds").read_text())
    try:
        with pytest.raises(InputError) as info:
            run_job(load_config(cfg), progress=False)
    finally:
        monkeypatch.undo()
        storage.reset()
    assert "s3://runs/nocreds" in str(info.value) or INPUT in str(info.value)
    assert "credentials" in str(info.value)
    assert not _fs().exists("runs/nocreds/manifest.json")


@pytest.mark.slow
def test_server_gone_mid_run_fails_naming_the_url(s3, kang1k5, tmp_path):
    """A second S3 server dies while the run writes shards: a clear error, never `complete`."""
    other = MotoServer()
    try:
        from raypipe.core import storage

        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("AWS_ENDPOINT_URL", other.endpoint)
            storage.reset()
            fs = storage.open_fs("s3")
            for bucket in ("atlases", "runs"):
                fs.mkdir(bucket)
            fs.put_file(str(kang1k5), INPUT.removeprefix("s3://"))
            cfg = _config(
                tmp_path,
                output_dir="s3://runs/gone",
                cache__path=str(tmp_path / "cache"),
                annotate__enabled=False,
                evaluate__enabled=False,
            )
            run = _raypipe("run", str(cfg), endpoint=other.endpoint)
            try:
                deadline = time.time() + 300
                while not fs.exists("runs/gone/atlas.zarr/zarr.json"):
                    assert run.poll() is None, run.communicate()[1][-3000:]
                    assert time.time() < deadline
                    time.sleep(0.1)
                other.stop()  # the server goes away while the run works
                out, err = run.communicate(timeout=400)
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(run.pid, signal.SIGKILL)
            assert run.returncode != 0
            assert "s3://" in err
            assert SECRET not in out + err
            assert "status: complete" not in out
    finally:
        from raypipe.core import storage

        storage.reset()
        other.stop()


def test_llm_cache_and_gene_cache_live_in_a_bucket_and_accumulate(s3):
    """Concurrent writers of both caches only add write-once segments; text A → B → A is free."""
    import numpy as np

    from raypipe.genes.cache import GeneEmbeddingCache
    from raypipe.llm.cache import LLMCache, stats

    a, b = LLMCache("s3://shared/llm"), LLMCache("s3://shared/llm")
    a.put("k1", backend="openai", model="m", kind="embed", version="1", vec=np.ones(3))
    b.put("k2", backend="openai", model="m", kind="chat", version="1", text="hello")
    a.flush()
    b.flush()
    c = LLMCache("s3://shared/llm")
    got = c.get_many(["k1", "k2", "k3"])
    assert set(got) == {"k1", "k2"}
    assert got["k2"].text == "hello"
    assert stats("s3://shared/llm")["entries"] == 2

    texts_a, texts_b = ["gene A text", "gene B text"], ["other text"]
    w1 = GeneEmbeddingCache("s3://shared/genes-acc", "model-x")
    w2 = GeneEmbeddingCache("s3://shared/genes-acc", "model-x")
    w1.add(texts_a, np.eye(2, 4, dtype=np.float32))
    w2.add(texts_b, np.ones((1, 4), dtype=np.float32))
    w1.flush()
    w2.flush()
    loaded = GeneEmbeddingCache("s3://shared/genes-acc", "model-x").load()
    assert set(loaded) == {*texts_a, *texts_b}  # switching back to source A embeds nothing
    assert GeneEmbeddingCache("s3://shared/genes-acc", "model-y").load() == {}


def test_files_the_config_names_can_be_urls(s3, tmp_path, monkeypatch):
    """genes.table / orgdb / ontology / a CE checkpoint folder: downloaded once per machine."""
    from raypipe.core.storage import local_copy

    monkeypatch.setenv("RAYPIPE_CACHE_DIR", str(tmp_path / "user"))
    fs = _fs()
    fs.pipe_file("shared/tables/genes.tsv", b"symbol\ttext\nCD3E\tT cell receptor\n")
    fs.pipe_file("shared/ckpt/config.json", b"{}")
    fs.pipe_file("shared/ckpt/model.safetensors", b"weights")
    table = local_copy("s3://shared/tables/genes.tsv")
    assert table.read_text().startswith("symbol")
    ckpt = local_copy("s3://shared/ckpt")
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.json", "model.safetensors"]
    assert local_copy("s3://shared/ckpt") == ckpt  # cached: same version, no new download
    fs.pipe_file("shared/tables/genes.tsv", b"symbol\ttext\nCD3E\tchanged\n")
    assert "changed" in local_copy("s3://shared/tables/genes.tsv").read_text()
    assert local_copy(str(tmp_path)) == tmp_path  # local paths stay as they are


def test_a_missing_extra_names_the_extra(monkeypatch):
    import importlib

    from raypipe.core import storage
    from raypipe.errors import InputError

    loaded = importlib.import_module("fsspec.registry")._registry  # imported implementations
    monkeypatch.setitem(sys.modules, "gcsfs", None)  # as if raypipe[gcs] were not installed
    for name in ("gs", "gcs"):
        monkeypatch.delitem(loaded, name, raising=False)
    storage.reset()
    with pytest.raises(InputError, match=r"pip install 'raypipe\[gcs\]'"):
        storage.as_path("gs://some-bucket/atlas.zarr").exists()
    storage.reset()


def test_local_paths_and_file_urls_stay_pathlib(tmp_path):
    from raypipe.core.storage import ObjectPath, as_path, is_url

    assert as_path(str(tmp_path)) == tmp_path
    assert as_path(f"file://{tmp_path}") == tmp_path
    assert not is_url("builtin:pbmc68k_reduced")
    p = as_path("s3://bucket/runs/x/part-00001.parquet")
    assert isinstance(p, ObjectPath)
    assert (p.name, p.stem, p.suffix) == ("part-00001.parquet", "part-00001", ".parquet")
    assert str(p.parent / "y.json") == "s3://bucket/runs/x/y.json"


def test_ingest_from_bucket_to_bucket(s3, kang1k5):
    """``raypipe ingest s3://… --out s3://…``: chunk by chunk; the metadata written last commits."""
    import anndata as ad
    import numpy as np

    from raypipe.atlas.ingest import ingest
    from raypipe.atlas.store import open_atlas, read_obs_names, read_shard
    from raypipe.errors import InputError

    res = ingest(INPUT, "s3://runs/ingested.zarr", rows_per_chunk=512, progress=False)
    atlas = open_atlas("s3://runs/ingested.zarr")
    assert (atlas.n_obs, len(atlas.chunk_hashes)) == (res.atlas.n_obs, 4)
    ref = ad.read_h5ad(kang1k5)
    x = read_shard("s3://runs/ingested.zarr", 512, 1024)
    assert np.allclose(x.toarray(), ref.X[512:1024].toarray())
    assert list(read_obs_names("s3://runs/ingested.zarr", 0, 3)) == list(ref.obs_names[:3])
    with pytest.raises(InputError, match="already exists"):
        ingest(INPUT, "s3://runs/ingested.zarr", progress=False)


def test_storage_section_sets_the_endpoint_when_the_environment_cannot(s3, monkeypatch):
    from raypipe.core import storage

    monkeypatch.delenv("AWS_ENDPOINT_URL")
    storage.configure(endpoint=s3.endpoint, region="us-east-1", anonymous=False)
    try:
        assert storage.as_path(INPUT).is_file()
        assert SECRET not in os.environ[storage.OPTIONS_ENV]  # what reaches the Ray workers
    finally:
        storage.configure(endpoint=None, region=None, anonymous=False)
    assert storage.OPTIONS_ENV not in os.environ


def test_an_interrupted_gene_embedding_keeps_finished_batches(kang1k5, tmp_path, monkeypatch):
    """Issue #10 item 8: batches finished before an interruption are kept; the re-run embeds the rest."""
    import anndata as ad
    import numpy as np
    import pandas as pd

    from raypipe.atlas.ingest import ingest
    from raypipe.config import load_config
    from raypipe.genes.space import prepare_gene_space
    from raypipe.llm import text_stage

    small = tmp_path / "small.h5ad"
    ad.read_h5ad(kang1k5)[:64, :300].copy().write_h5ad(small)
    atlas = ingest(small, tmp_path / "atlas.zarr", progress=False).atlas
    job = load_config(
        {
            "input": {"path": str(small)},
            "output_dir": str(tmp_path / "run"),
            "cache": {"path": str(tmp_path / "cache")},
            "genes": {"text_source": "symbol", "min_coverage": 0.1},
        }
    )
    asked: list[list[str]] = []

    def interrupted(texts, job, *, on_batch=None, **kw):
        asked.append(list(texts))
        half = texts[: len(texts) // 2]
        emb = [np.full(4, i, dtype=np.float32) for i in range(len(half))]
        on_batch(pd.DataFrame({"i": range(len(half)), "text": half, "embedding": emb, "error": ""}))
        raise KeyboardInterrupt  # the run stops here

    monkeypatch.setattr(text_stage, "embed_texts", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_gene_space(job, atlas, tmp_path / "run")

    def rest(texts, job, *, on_batch=None, **kw):
        asked.append(list(texts))
        return np.ones((len(texts), 4), np.float32), [""] * len(texts), {}

    monkeypatch.setattr(text_stage, "embed_texts", rest)
    genes = prepare_gene_space(job, atlas, tmp_path / "run")
    first, second = asked
    assert second == first[len(first) // 2 :]  # only what the interrupted run had not finished
    assert genes.cache["hits"] == len(first) // 2
    assert genes.cache["embedded"] == len(second)
