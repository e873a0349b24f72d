"""A real multi-node Ray cluster on 127.0.0.1: `ray job submit`, a lost node, a killed job.

The cluster is started with the `ray` CLI of this venv under a private temp dir (see
tests/cluster_utils.py); only its own processes are ever killed. The output folder lives on
the local disk both "nodes" share, which models a cluster's shared storage.

Speed (2 cores): the default suite runs the README's `ray job submit`; the S3, killed-job,
lost-node and incremental scenarios are `slow` (CI runs them after the default suite). One
cluster serves every cluster scenario and is stopped before the
in-process scenario starts its own Ray; the fault-tolerance jobs find their gene embeddings
in the (text, model)-keyed cache, embedded once per module, so they spend their time on the
shards; the README job embeds its genes on the cluster for real.
"""

from __future__ import annotations

import collections
import gzip
import io
import json
import shutil
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from cluster_utils import ROOT, LocalCluster

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

GENEPT = "MapWorker(MapBatches(GenePTW))"


@pytest.fixture(scope="class")
def cluster():
    """A 1-CPU head node and a 1-CPU worker node, for every test of the class.

    Ray Data needs a CPU for its tasks beside the actors' CPUs, hence the second node. The
    node-loss test, the class's last, kills the worker; the class then stops the cluster.
    """
    c = LocalCluster(head_cpus=1)
    try:
        c.start()
        c.add_worker(num_cpus=1)
        yield c
    finally:
        c.stop()


def _write_table(shared: Path, path: Path, prefix: str = "") -> Path:
    """A small real gene→text table (orgdb full names) for 400 genes of both Kang files."""
    import anndata as ad

    cells = shared / "cells"
    var = set(ad.read_h5ad(cells / "kang2018_pbmc_8k_muscat_kang.h5ad", backed="r").var_names)
    var &= set(
        ad.read_h5ad(
            cells / "kang2018_pbmc_ctrl_stim_1.5k_muscat_example_sce.h5ad", backed="r"
        ).var_names
    )
    with gzip.open(shared / "genes" / "orgHs_gene_text_go.tsv.gz", "rt") as fh:
        org = pd.read_csv(fh, sep="\t", usecols=["symbol", "full_name"])
    org = org[org["symbol"].isin(var)].drop_duplicates("symbol").head(400)
    text = prefix + org["symbol"] + ": " + org["full_name"]
    pd.DataFrame({"symbol": org["symbol"], "text": text}).to_csv(path, sep="\t", index=False)
    return path


@pytest.fixture(scope="module")
def gene_table(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Quick to embed (400 short texts) yet real gene text."""
    return _write_table(shared_data, tmp_path_factory.mktemp("genes") / "gene_text.tsv")


@pytest.fixture(scope="module")
def other_table(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same 400 genes with different text."""
    path = tmp_path_factory.mktemp("genes") / "other_text.tsv"
    return _write_table(shared_data, path, prefix="human gene ")


@pytest.fixture(scope="module")
def gene_cache(gene_table: Path, other_table: Path, tmp_path_factory) -> Path:
    """A ``genes/gene_embeddings.parquet`` holding both tables' texts, embedded once here.

    Embedded by the backend the jobs build (``configs/cluster-demo.yaml``'s text_model), in
    the schema raypipe writes; copied into an output folder before a run, it makes that run's
    gene-space stage a pure cache hit (no MiniLM actor pool to start and load).
    """
    import numpy as np
    import pyarrow as pa

    from raypipe.config import load_config
    from raypipe.llm.backends import build_embedder

    job = load_config(ROOT / "configs" / "cluster-demo.yaml")
    frames = [pd.read_csv(t, sep="\t", dtype=str) for t in (gene_table, other_table)]
    texts = pd.concat(frames).assign(text=lambda d: d["text"].str.strip())
    texts = texts.drop_duplicates("text").reset_index(drop=True)
    emb = np.asarray(build_embedder(job).embed(list(texts["text"])), dtype=np.float32)
    table = pa.table(
        {
            "gene_id": pa.array(texts["symbol"]),
            "symbol": pa.array(texts["symbol"]),
            "text": pa.array(texts["text"]),
            "source": pa.array(["table"] * len(texts)),
            "model": pa.array([job.text_model.model] * len(texts)),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1]),
        }
    )
    path = tmp_path_factory.mktemp("gene-cache") / "gene_embeddings.parquet"
    pq.write_table(table, path)
    return path


def _warm(out: Path, cache: Path) -> None:
    """Put the gene-embedding cache where a run in ``out`` looks for it."""
    (out / "genes").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(cache, out / "genes" / "gene_embeddings.parquet")


def _overrides(
    kang: Path, out: Path, table: Path, rows: int = 128, actor_cpus: float = 0.5
) -> list[str]:
    sets = {
        "input.path": kang,
        "input.rows_per_chunk": rows,
        "output_dir": out,
        "shards.rows": rows,
        "genes.text_source": "table",
        "genes.table": table,
        "genes.min_coverage": 0.1,
        "embed.genept_w.hvg": "null",
        "ray.actor_cpus": actor_cpus,
    }
    args: list[str] = []
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    return args


def _submit(
    cluster: LocalCluster, job_id: str, sets: list[str], env_vars: dict[str, str] | None = None
) -> None:
    """``ray job submit --no-wait --working-dir . -- python jobs/run.py ...``, through the SDK."""
    entry = ["python", "jobs/run.py", "--config", "configs/cluster-demo.yaml", *sets]
    cluster.submit_job(job_id, entry, env_vars=env_vars)


def _markers(out: Path) -> int:
    folder = out / "state" / "genept_w"
    return len(list(folder.glob("shard-*.json"))) if folder.is_dir() else 0


def _wait_for(cond, what: str, cluster: LocalCluster, job_id: str, timeout: float = 240) -> None:
    """Poll ``cond`` often (cheap file checks), the job's status once a second."""
    checked = time.time()
    deadline = checked + timeout
    while not cond():
        if time.time() - checked > 1:
            checked = time.time()
            status = cluster.job_status(job_id)
            if status in {"SUCCEEDED", "FAILED", "STOPPED"}:
                logs = cluster.job_logs(job_id)[-3000:]
                pytest.fail(f"job ended ({status}) before {what}:\n{logs}")
        if time.time() > deadline:
            pytest.fail(f"timed out waiting for {what}:\n{cluster.job_logs(job_id)[-3000:]}")
        time.sleep(0.05)


def _check_exact(out: Path, kang: Path) -> None:
    """Every input cell exactly once across all parts: no loss, no duplicates."""
    import anndata as ad

    _check_parts(out, [str(n) for n in ad.read_h5ad(kang, backed="r").obs_names])


def _check_parts(out: Path, names: list[str]) -> None:
    expected = collections.Counter(names)
    parts = sorted((out / "embeddings" / "genept_w").glob("part-*.parquet"))
    got: collections.Counter[str] = collections.Counter()
    for p in parts:
        got.update(pq.read_table(p, columns=["obs_name"]).column("obs_name").to_pylist())
    dupes = [n for n, c in got.items() if c > 1]
    assert not dupes, f"{len(dupes)} cells written twice, e.g. {dupes[:3]}"
    assert got == expected, f"missing {len(expected - got)}, unexpected {len(got - expected)}"


class TestOnACluster:
    """Jobs submitted to one head node plus worker nodes (this class's cluster)."""

    def test_ray_job_submit_as_in_readme(self, cluster, shared_data, gene_table, tmp_path):
        """The README's sequence: submit with the working dir, read the logs, list the job.

        No warm cache here: this job embeds its gene texts on the cluster's actor pool.
        """
        kang = shared_data / "cells" / "kang2018_pbmc_ctrl_stim_1.5k_muscat_example_sce.h5ad"
        out = tmp_path / "cluster-demo"
        res = cluster.submit(
            "--address",
            cluster.dashboard,
            "--submission-id",
            "demo",
            "--working-dir",
            ".",
            "--",
            "python",
            "jobs/run.py",
            "--config",
            "configs/cluster-demo.yaml",
            "--set",
            f"input.path={kang}",
            "--set",
            f"output_dir={out}",
            "--set",
            "genes.text_source=table",  # test only: a small gene table instead of orgdb, for speed
            "--set",
            f"genes.table={gene_table}",
            "--set",
            "genes.min_coverage=0.1",
            "--set",
            "embed.genept_w.hvg=null",  # test only: no extra gene-moments pass, for speed
        )
        assert res.returncode == 0, res.stdout + res.stderr
        assert "succeeded" in (res.stdout + res.stderr).lower()
        logs = cluster.job("logs", "--address", cluster.dashboard, "demo")
        assert "raypipe run summary" in logs.stdout
        assert "Ray cluster" in logs.stdout  # the driver joined the cluster, not an embedded Ray
        listing = cluster.job("list", "--address", cluster.dashboard)
        assert "demo" in listing.stdout
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["status"] == "complete"
        assert (ROOT / "configs" / "cluster-demo.yaml").is_file()
        _check_exact(out, kang)

    @pytest.mark.slow
    def test_job_reads_and_writes_an_s3_bucket(
        self, cluster, kang1k5, gene_table, gene_cache, tmp_path
    ):
        """Input, gene table and output on a real S3 server (moto); workers write the bucket.

        The endpoint and (test) credentials reach the job the standard way: AWS_* variables in
        its runtime env, as a platform would provide them (IRSA, instance profile).
        """
        from servers.s3 import MotoServer, s3_env

        from raypipe.core import storage

        server = MotoServer()
        env = s3_env(server.endpoint)
        try:
            with pytest.MonkeyPatch.context() as mp:
                for k, v in env.items():
                    mp.setenv(k, v)
                storage.reset()
                fs = storage.open_fs("s3")
                for bucket in ("atlases", "runs"):
                    fs.mkdir(bucket)
                fs.put_file(str(kang1k5), "atlases/kang1k5.h5ad")
                fs.put_file(str(gene_table), "atlases/gene_text.tsv")
                # the warm gene-embedding cache, where a run in that output_dir looks for it
                fs.put_file(str(gene_cache), "runs/cluster/genes/gene_embeddings.parquet")
                sets = _overrides(
                    "s3://atlases/kang1k5.h5ad", "s3://runs/cluster", "s3://atlases/gene_text.tsv"
                )
                _submit(cluster, "s3job", sets, env_vars=env)
                status = cluster.wait_job("s3job", timeout=300)
                assert status == "SUCCEEDED", cluster.job_logs("s3job")[-4000:]
                manifest = json.loads(fs.cat_file("runs/cluster/manifest.json"))
                assert manifest["status"] == "complete"
                import anndata as ad

                got: collections.Counter[str] = collections.Counter()
                for f in fs.glob("runs/cluster/embeddings/genept_w/part-*.parquet"):
                    t = pq.read_table(io.BytesIO(fs.cat_file(f)), columns=["obs_name"])
                    got.update(t.column("obs_name").to_pylist())
                names = [str(n) for n in ad.read_h5ad(kang1k5, backed="r").obs_names]
                assert got == collections.Counter(names)
        finally:
            storage.reset()
            server.stop()

    @pytest.mark.slow
    def test_killed_job_resumes_from_finished_shards(
        self, cluster, kang8k, gene_table, gene_cache, tmp_path
    ):
        out = tmp_path / "run"
        _warm(out, gene_cache)
        sets = _overrides(kang8k, out, gene_table)
        _submit(cluster, "killed", sets)
        _wait_for(lambda: _markers(out) >= 3, "3 finished shards", cluster, "killed")
        cluster.client().stop_job("killed")  # what `ray job stop killed` sends
        assert cluster.wait_job("killed", timeout=120) == "STOPPED"
        finished = _markers(out)
        manifest = json.loads((out / "manifest.json").read_text())
        # the stopped run never completed: `failed` ("interrupted") when it saw the signal
        assert manifest["status"] in {"running", "failed"}

        _submit(cluster, "resumed", sets)
        status = cluster.wait_job("resumed", timeout=300)
        logs = cluster.job_logs("resumed")
        assert status == "SUCCEEDED", logs[-4000:]
        manifest = json.loads((out / "manifest.json").read_text())
        n = manifest["shards"]["n"]
        computed = manifest["methods"]["genept_w"]["shards_computed"]
        assert computed <= n - finished, (computed, n, finished)
        assert f"{computed} shards computed, {n - computed} reused" in logs
        _check_exact(out, kang8k)

    @pytest.mark.slow
    def test_job_survives_losing_a_worker_node(
        self, cluster, kang8k, gene_table, gene_cache, tmp_path
    ):
        out = tmp_path / "run"
        _warm(out, gene_cache)
        (node,) = cluster.workers
        # 0.75 CPU per actor: at most one fits per 1-CPU node, so one actor runs on the worker
        _submit(cluster, "fault", _overrides(kang8k, out, gene_table, actor_cpus=0.75))

        def worker_busy() -> bool:
            from cluster_utils import cmdline

            if _markers(out) < 2:
                return False
            return any(GENEPT in " ".join(cmdline(p)) for p in node.processes())

        _wait_for(
            worker_busy,
            "a GenePT-w actor on the worker node and 2 finished shards",
            cluster,
            "fault",
        )
        done_before = _markers(out)
        killed = node.kill()
        assert killed
        assert node.raylet() is None
        status = cluster.wait_job("fault", timeout=300)
        logs = cluster.job_logs("fault")
        assert status == "SUCCEEDED", logs[-4000:]
        manifest = json.loads((out / "manifest.json").read_text())
        n_shards = manifest["shards"]["n"]
        assert n_shards >= 8
        assert done_before < n_shards, (done_before, n_shards)
        assert manifest["status"] == "complete"
        _check_exact(out, kang8k)


@pytest.mark.slow
def test_incremental_reprocessing(
    ray_local, kang1k5, gene_table, other_table, gene_cache, tmp_path
):
    """A grown atlas recomputes only new/changed shards; new gene text invalidates everything."""
    import anndata as ad

    from raypipe.atlas.store import open_atlas, plan_shards
    from raypipe.config import load_config
    from raypipe.orchestrate.runner import run_job

    full = ad.read_h5ad(kang1k5)
    src = tmp_path / "atlas.h5ad"
    full[:1000].copy().write_h5ad(src)
    out = tmp_path / "run"
    _warm(out, gene_cache)

    def job(table: Path = gene_table, **extra: object):
        cfg = {
            "input": {"path": str(src), "label_key": "cluster_id", "rows_per_chunk": 128},
            "output_dir": str(out),
            "shards": {"rows": 256},
            "genes": {"text_source": "table", "table": str(table), "min_coverage": 0.1},
            "embed": {"methods": ["genept_w"], "genept_w": {"hvg": None, **extra}},
            "ray": {"actors": 2, "actor_cpus": 0.5},
        }
        return load_config(cfg)

    first = run_job(job(), progress=False)
    old = {s.index: s.content_hash for s in plan_shards(open_atlas(out / "atlas.zarr"), 256)}
    assert first.shards_done["genept_w"] == len(old) == 4
    m1 = json.loads((out / "manifest.json").read_text())

    # the atlas grew: the same 1,000 cells, then 556 more (re-ingested on the fly)
    full.write_h5ad(src)
    second = run_job(job(), progress=False)
    new = plan_shards(open_atlas(out / "atlas.zarr"), 256)
    changed = [s.index for s in new if old.get(s.index) != s.content_hash]
    assert changed == [3, 4, 5, 6]  # the last partial shard of the old atlas, and 3 new ones
    assert second.shards_done["genept_w"] == len(changed)
    assert second.shards_skipped["genept_w"] == 3
    _check_parts(out, [str(n) for n in full.obs_names])
    m2 = json.loads((out / "manifest.json").read_text())
    assert m2["genes"]["fingerprint"] == m1["genes"]["fingerprint"]
    assert m2["methods"]["genept_w"]["fingerprint"] == m1["methods"]["genept_w"]["fingerprint"]

    # a GenePT-w setting changes: every genept_w shard, but the gene space stays
    third = run_job(job(center=False), progress=False)
    assert third.shards_done["genept_w"] == len(new)
    m3 = json.loads((out / "manifest.json").read_text())
    assert m3["genes"]["fingerprint"] == m2["genes"]["fingerprint"]
    assert m3["config_hash"] != m2["config_hash"]
    assert m3["methods"]["genept_w"]["fingerprint"] != m2["methods"]["genept_w"]["fingerprint"]

    # different gene text: the gene space and every shard are invalidated
    # (a run keeps only its own texts in the cache: re-warm it with the other table's texts)
    _warm(out, gene_cache)
    fourth = run_job(job(table=other_table, center=False), progress=False)
    assert fourth.shards_done["genept_w"] == len(new)
    assert fourth.shards_skipped["genept_w"] == 0
    m4 = json.loads((out / "manifest.json").read_text())
    assert m4["genes"]["fingerprint"] != m3["genes"]["fingerprint"]
    _check_parts(out, [str(n) for n in full.obs_names])

    # what the manifest records for reproducibility
    assert m4["status"] == "complete"
    assert m4["versions"]["raypipe"]
    assert m4["versions"]["ray"]
    assert m4["genes"]["model"] == "all-MiniLM-L6-v2"
    assert m4["genes"]["text_source"] == "table"
    assert len(m4["config_hash"]) == 16
    assert {"atlas", "genes", "genept_w"} <= set(m4["timings"])
    assert all(v >= 0 for v in m4["timings"].values())
