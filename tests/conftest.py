"""Shared fixtures: the ../shared/data folder (skip when absent) and one local Ray per session."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from cli_utils import BackgroundCli, CliRun

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RAYPIPE_SHARED_DATA", ROOT.parent / "shared" / "data"))

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "shared_gene_cache: the test's runs share one per-user gene-text embedding cache with "
        "the session's other such tests (for tests whose subject is not the cache)",
    )


@pytest.fixture(scope="session")
def session_user_cache(tmp_path_factory) -> Path:
    """One per-user cache (gene-text embeddings) shared by the session's runs that opt in."""
    return tmp_path_factory.mktemp("session-user-cache")


@pytest.fixture(autouse=True, scope="module")
def _module_user_cache(tmp_path_factory, request, session_user_cache):
    """Each test module gets its own per-user cache (gene-text embeddings), never ~/.cache."""
    shared = request.node.get_closest_marker("shared_gene_cache") is not None
    path = session_user_cache if shared else tmp_path_factory.mktemp("user-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAYPIPE_CACHE_DIR", str(path))
        yield


@pytest.fixture(autouse=True)
def _user_cache(tmp_path_factory, monkeypatch, request, session_user_cache):
    """... and each test its own, so embedding-call counts never see another test's cache.

    Tests marked ``shared_gene_cache`` (whole runs whose subject is not the cache) share the
    session's instead: a gene text embedded once is not embedded again by the next run.
    """
    shared = request.node.get_closest_marker("shared_gene_cache") is not None
    path = session_user_cache if shared else tmp_path_factory.mktemp("user-cache")
    monkeypatch.setenv("RAYPIPE_CACHE_DIR", str(path))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared real-data folder; tests that need it skip with a reason when it is absent."""
    if not SHARED.is_dir():
        pytest.skip(f"real data folder {SHARED} is absent (set RAYPIPE_SHARED_DATA)")
    return SHARED


@pytest.fixture(scope="session")
def kang8k(shared_data: Path) -> Path:
    return shared_data / "cells" / "kang2018_pbmc_8k_muscat_kang.h5ad"


@pytest.fixture(scope="session")
def kang1k5(shared_data: Path) -> Path:
    return shared_data / "cells" / "kang2018_pbmc_ctrl_stim_1.5k_muscat_example_sce.h5ad"


_RAY_INIT = {
    "address": "local",
    "num_cpus": 2,
    "object_store_memory": 1 << 30,
    "include_dashboard": False,
    "log_to_driver": False,
    "configure_logging": False,
}


@pytest.fixture(scope="session")
def _ray_session():
    """One local Ray for the whole session (shut down at its end), started on first use."""
    import ray

    yield ray
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_local(_ray_session):
    """The session's local Ray (2 CPUs, 1 GiB object store) on 127.0.0.1.

    Started once and shared: a Ray start costs seconds, and in-process runs (``run_job``,
    ``raypipe.run``) use an existing session as it is. A module that needs a Ray of its own
    (other environment variables for the workers) may shut it down; the next test that asks
    for ``ray_local`` starts a fresh one.
    """
    ray = _ray_session
    if not ray.is_initialized():
        ray.init(**_RAY_INIT)
    return ray


_DEMO: dict[str, BackgroundCli] = {}


def _start_demo() -> BackgroundCli:
    """The demo job (``configs/demo.yaml``) through the real CLI, started in the background.

    Gene text = symbols (the same code path the demo falls back to, without embedding 750
    long GO descriptions); everything else is the demo as shipped: GenePT-w, annotation,
    evaluation and the report. It has its own per-user cache (no other test sees it).
    """
    cwd = Path(tempfile.mkdtemp(prefix="raypipe-demo-"))
    (cwd / "cache").mkdir()
    return BackgroundCli(
        "run",
        str(ROOT / "configs" / "demo.yaml"),
        "--set",
        f"output_dir={cwd / 'demo'}",
        "--set",
        "genes.text_source=symbol",
        cwd=cwd,
        env={"RAYPIPE_CACHE_DIR": str(cwd / "cache")},
    )


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the demo run as soon as the session knows a test needs it (it takes the longest
    of the default suite's runs; beside the quick tests it costs less wall time)."""
    if any("demo_cli_run" in getattr(i, "fixturenames", ()) for i in session.items):
        _DEMO["run"] = _start_demo()


def pytest_sessionfinish(session: pytest.Session) -> None:
    demo = _DEMO.pop("run", None)
    if demo is not None:
        demo.stop()
        shutil.rmtree(demo.cwd, ignore_errors=True)


@pytest.fixture(scope="session")
def demo_cli_run() -> CliRun:
    """The demo run through the real CLI, once per session (:func:`_start_demo`).

    Tests read it (export, report, the quiet terminal); a test that changes a run copies it.
    """
    demo = _DEMO.get("run") or _DEMO.setdefault("run", _start_demo())
    res = demo.result()
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return CliRun(demo.cwd / "demo", res.stdout, res.stderr)


@pytest.fixture(scope="module")
def ray_fresh(_ray_session):
    """A local Ray started now, for a module whose workers need the environment it set.

    Ray workers inherit the environment Ray started with (an API key variable set by a
    module's fixture after the session's Ray started would be missing in them). Shut down
    after the module: the next test asking for ``ray_local`` starts the shared one again.
    """
    ray = _ray_session
    if ray.is_initialized():
        ray.shutdown()
    ray.init(**_RAY_INIT)
    yield ray
    ray.shutdown()
