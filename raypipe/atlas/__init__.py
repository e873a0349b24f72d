"""The atlas stage: ingest inputs into a row-chunked Zarr atlas (or read them in place), plan and read shards."""

from __future__ import annotations

from raypipe.atlas.ingest import IngestResult, ingest
from raypipe.atlas.reader import AtlasSource, open_source, resolve_input_path
from raypipe.atlas.store import (
    AtlasInfo,
    Shard,
    open_atlas,
    plan_shards,
    read_obs_columns,
    read_obs_names,
    read_shard,
    read_var,
)

__all__ = [
    "AtlasInfo",
    "AtlasSource",
    "IngestResult",
    "Shard",
    "ingest",
    "open_atlas",
    "open_source",
    "plan_shards",
    "read_obs_columns",
    "read_obs_names",
    "read_shard",
    "read_var",
    "resolve_input_path",
]
