"""Local paths vs object storage: the same run, side by side, on this machine.

Starts a moto S3 server on loopback (``moto[server]``, the test extra), uploads the input,
then runs one config twice as ``raypipe run`` subprocesses, each cold (its own gene cache):

* **local**: ``input.path``, ``output_dir``, ``cache.path`` local paths;
* **s3**: all three ``s3://`` URLs on the moto server (``AWS_ENDPOINT_URL``),

and prints both wall times and each run's per-stage timings (from its manifest)::

    python -m raypipe.bench.storage --input ../shared/data/cells/kang2018_pbmc_8k_muscat_kang.h5ad

The moto server keeps objects in memory and runs on the same CPUs, so the figure bounds the
cost of raypipe's object-store I/O path (requests, one PUT per part, no rename); a real
bucket adds network latency and bandwidth.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

__all__ = ["main"]

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(config: str, sets: dict[str, str], env: dict[str, str]) -> float:
    args = [sys.executable, "-m", "raypipe", "run", config]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    t0 = time.perf_counter()
    subprocess.run(args, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    """Run the comparison; print a table and write ``storage_bench.json`` in ``--workdir``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", required=True, help="a local .h5ad (uploaded for the s3 run)")
    p.add_argument("--config", default="configs/kang8k.yaml")
    p.add_argument("--workdir", default=None, help="local outputs (default: a temp folder)")
    args = p.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="raypipe-storage-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    moto = Path(sys.executable).with_name("moto_server")
    server = subprocess.Popen(
        [str(moto), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(endpoint, timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        env = {
            **os.environ,
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_DEFAULT_REGION": "us-east-1",
            "PYTHONPATH": str(ROOT),
        }
        os.environ.update({k: env[k] for k in env if k.startswith("AWS_")})
        from raypipe.core.storage import open_fs

        fs = open_fs("s3")
        fs.mkdir("bench")
        t0 = time.perf_counter()
        fs.put_file(args.input, "bench/input.h5ad")
        upload_s = time.perf_counter() - t0
        results: dict[str, Any] = {"upload_s": upload_s}
        for name, sets in {
            "local": {
                "input.path": str(Path(args.input).resolve()),
                "output_dir": str(work / "local"),
                "cache.path": str(work / "local-cache"),
            },
            "s3": {
                "input.path": "s3://bench/input.h5ad",
                "output_dir": "s3://bench/run",
                "cache.path": "s3://bench/cache",
            },
        }.items():
            wall = _run(args.config, sets, {**env, "RAYPIPE_CACHE_DIR": str(work / f"{name}-user")})
            out = sets["output_dir"]
            text = (
                fs.cat_file("bench/run/manifest.json")
                if out.startswith("s3://")
                else (Path(out) / "manifest.json").read_bytes()
            )
            manifest = json.loads(text)
            results[name] = {
                "wall_s": wall,
                "status": manifest["status"],
                "timings": manifest["timings"],
                "gene_cache": manifest["genes"].get("cache"),
            }
            print(f"{name:6s} {wall:7.1f} s  {manifest['status']}  stages {manifest['timings']}")
        (work / "storage_bench.json").write_text(json.dumps(results, indent=2))
        print(f"upload {upload_s:.1f} s; results in {work / 'storage_bench.json'}")
    finally:
        server.kill()
        server.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
