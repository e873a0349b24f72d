"""A real S3 server for tests: ``moto_server`` (moto[server]) as a loopback subprocess."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

MOTO = Path(sys.executable).with_name("moto_server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MotoServer:
    """``moto_server`` on a free 127.0.0.1 port, owned (and killed) by the test that made it."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [str(MOTO), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(self.endpoint, timeout=1)
                return
            except OSError:
                if time.time() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


def s3_env(endpoint: str, secret: str = "test-secret", key_id: str = "AKIATEST") -> dict[str, str]:
    """The standard AWS variables pointing at ``endpoint``."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": key_id,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_DEFAULT_REGION": "us-east-1",
    }


@contextlib.contextmanager
def moto_env(*buckets: str) -> Iterator[MotoServer]:
    """A moto server with this process's AWS variables and raypipe's filesystems pointed at it.

    Skips the test when moto[server] is not installed; makes ``buckets``; on exit restores
    the environment, forgets the cached filesystems and stops the server.
    """
    import pytest

    from raypipe.core import storage

    if not MOTO.exists():
        pytest.skip("moto[server] is not installed (pip install -e '.[dev]')")
    server = MotoServer()
    try:
        with pytest.MonkeyPatch.context() as mp:
            for k, v in s3_env(server.endpoint).items():
                mp.setenv(k, v)
            mp.delenv(storage.OPTIONS_ENV, raising=False)
            storage.reset()
            fs = storage.open_fs("s3")
            for bucket in buckets:
                fs.mkdir(bucket)
            yield server
    finally:
        storage.reset()
        server.stop()
