"""Several processes writing one cache folder at once lose nothing (and compaction races)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from raypipe.llm.cache import LLMCache, cache_key, compact, stats

pytestmark = pytest.mark.integration

WRITER = r"""
import sys, numpy as np
from raypipe.llm.cache import LLMCache, cache_key, compact
path, wid, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
c = LLMCache(path, flush_rows=50, flush_every_s=1e9)
for i in range(n):
    shared = i % 4 == 0  # every writer also writes some identical keys
    text = f"shared {i}" if shared else f"w{wid} item {i}"
    c.put(cache_key("openai", "m", "embed", "v1", text), backend="openai", model="m",
          kind="embed", version="v1", vec=np.full(3, i, np.float32), tokens_in=1)
    if wid == 0 and i % 150 == 0:
        compact(path)  # a compaction racing the other writers
c.close()
"""


def test_concurrent_writers_lose_nothing(tmp_path):
    n, writers = 400, 4
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(w), str(n)])
        for w in range(writers)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0] * writers
    expected = {f"shared {i}" for i in range(0, n, 4)}
    expected |= {f"w{w} item {i}" for w in range(writers) for i in range(n) if i % 4}
    keys = {cache_key("openai", "m", "embed", "v1", t): t for t in expected}
    got = LLMCache(tmp_path).get_many(list(keys))
    assert len(got) == len(expected)
    for k, t in keys.items():
        i = int(t.split()[-1])
        assert np.array_equal(got[k].vec, np.full(3, i, np.float32))
    assert stats(tmp_path)["entries"] == len(expected)
    out = compact(tmp_path)
    assert out["rows_out"] == len(expected)
    assert len(LLMCache(tmp_path).get_many(list(keys))) == len(expected)
