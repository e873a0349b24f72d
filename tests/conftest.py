"""Shared fixtures: the ../shared/data folder (skip when absent) and a local Ray."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RAYPIPE_SHARED_DATA", ROOT.parent / "shared" / "data"))

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True, scope="module")
def _module_user_cache(tmp_path_factory):
    """Each test module gets its own per-user cache (gene-text embeddings), never ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAYPIPE_CACHE_DIR", str(tmp_path_factory.mktemp("user-cache")))
        yield


@pytest.fixture(autouse=True)
def _user_cache(tmp_path_factory, monkeypatch):
    """... and each test its own, so embedding-call counts never see another test's cache."""
    monkeypatch.setenv("RAYPIPE_CACHE_DIR", str(tmp_path_factory.mktemp("user-cache")))


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


@pytest.fixture(scope="module")
def ray_local():
    """A module-scoped local Ray (2 CPUs, 1 GiB object store) on 127.0.0.1."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=2,
            object_store_memory=1 << 30,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    yield ray
    ray.shutdown()
