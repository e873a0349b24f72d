"""Where files live: local paths, ``file://``, and object storage (``s3://``, ``gs://`` ...).

The one place raypipe turns a path or URL into something it can read and write. A local path
(or ``file://`` URL) stays a :class:`pathlib.Path` and behaves exactly as before. A URL with
any other scheme becomes an :class:`ObjectPath`: the subset of the ``pathlib`` API raypipe
uses, backed by the fsspec filesystem of that scheme (``s3fs``, ``gcsfs``, anything fsspec
knows).

Object stores have no atomic rename; they have write-once objects instead: one PUT is
visible whole or not at all. :func:`write_bytes_atomic` is a temporary file plus rename
locally and a single PUT on a bucket; the ledger writes a part, then its marker (the commit
point), so neither case ever shows a half-written part as complete.

Credentials come from the platform's default chains (AWS env/profile/instance profile/IRSA,
GCP application-default credentials/workload identity) and ``AWS_ENDPOINT_URL``; the
optional ``storage:`` config section adds endpoint, region and anonymous access, passed to
every process (Ray workers included) through ``RAYPIPE_STORAGE_OPTIONS``, which never holds
a secret.
"""

from __future__ import annotations

import fnmatch
import io
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace
from typing import IO, Any

from raypipe.core.storage_options import (
    DEFAULT_TIMEOUTS,
    OPTIONS_ENV,
    StorageError,
    explain,
    request_bound,
    storage_options,
)
from raypipe.errors import InputError

__all__ = [
    "DEFAULT_TIMEOUTS",
    "OPTIONS_ENV",
    "AnyPath",
    "ObjectPath",
    "StorageError",
    "as_path",
    "configure",
    "is_url",
    "local_copy",
    "open_fs",
    "reset",
    "rmtree",
    "sorted_paths",
    "storage_options",
    "user_cache_dir",
    "write_bytes_atomic",
    "write_file_atomic",
    "zarr_store",
]

#: The extra to install for each scheme's filesystem.
_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def is_url(path: str | os.PathLike[str] | ObjectPath) -> bool:
    """Whether ``path`` is a URL of an fsspec filesystem other than the local one."""
    if isinstance(path, ObjectPath):
        return True
    m = _URL.match(str(path))
    return m is not None and m.group(1).lower() not in {"file", "local"}


def configure(
    *,
    endpoint: str | None,
    region: str | None,
    anonymous: bool,
    connect_timeout_s: float | None = None,
    read_timeout_s: float | None = None,
    max_attempts: int | None = None,
) -> None:
    """Set the ``storage:`` config section for this process and the Ray workers it starts.

    The timeouts bound every request: at most ``max_attempts`` tries, each waiting at most
    ``connect_timeout_s`` to connect and ``read_timeout_s`` for the answer (defaults:
    :data:`DEFAULT_TIMEOUTS`).
    """
    given = {
        "endpoint": endpoint,
        "region": region,
        "anonymous": anonymous,
        "connect_timeout_s": connect_timeout_s,
        "read_timeout_s": read_timeout_s,
        "max_attempts": max_attempts,
    }
    opts = {k: v for k, v in given.items() if v and DEFAULT_TIMEOUTS.get(k) != v}
    if opts:
        os.environ[OPTIONS_ENV] = json.dumps(opts, sort_keys=True)
    else:
        os.environ.pop(OPTIONS_ENV, None)
    reset()


def reset() -> None:
    """Forget cached filesystems (after credentials or endpoints changed in this process)."""
    _fs.cache_clear()
    import fsspec

    for protocol in ("s3", "gs"):
        try:
            fsspec.get_filesystem_class(protocol).clear_instance_cache()
        except (ImportError, ValueError):
            continue


@lru_cache(maxsize=16)
def _fs(protocol: str, options: str) -> Any:
    import fsspec

    try:
        return fsspec.filesystem(protocol, **json.loads(options))
    except ImportError as exc:
        extra = _EXTRAS.get(protocol)
        fix = (
            f"pip install 'raypipe[{extra}]' (or raypipe[cloud])"
            if extra
            else f"install the fsspec implementation for {protocol}://"
        )
        raise InputError(
            f"{protocol}:// URLs need a filesystem package that is not installed ({exc})", fix=fix
        ) from None
    except ValueError as exc:
        raise InputError(f"unknown storage scheme {protocol}:// ({exc})") from None


def open_fs(protocol: str) -> Any:
    """Return the fsspec filesystem for ``protocol`` (cached per process and options)."""
    return _fs(protocol, json.dumps(storage_options(protocol), sort_keys=True))


class ObjectPath:
    """A file or folder in object storage, with the ``pathlib`` subset raypipe uses.

    Parameters
    ----------
    url
        ``scheme://bucket/key``; trailing slashes are dropped.
    """

    def __init__(self, url: str) -> None:
        m = _URL.match(url)
        if m is None:
            raise InputError(f"{url} is not a URL")
        self.protocol = m.group(1).lower()
        self.key = url[m.end() :].strip("/")

    # ----------------------------------------------------------------- naming
    def __str__(self) -> str:
        return f"{self.protocol}://{self.key}"

    def __repr__(self) -> str:
        return f"ObjectPath({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectPath) and str(other) == str(self)

    def __hash__(self) -> int:
        return hash(str(self))

    def __lt__(self, other: ObjectPath) -> bool:
        return str(self) < str(other)

    def __truediv__(self, other: str | os.PathLike[str]) -> ObjectPath:
        return ObjectPath(f"{self}/{str(other).strip('/')}")

    @property
    def name(self) -> str:
        """Last segment."""
        return self.key.rsplit("/", 1)[-1]

    @property
    def stem(self) -> str:
        """Name without its last suffix."""
        n = self.name
        return n[: n.rfind(".")] if "." in n.lstrip(".") else n

    @property
    def suffix(self) -> str:
        """Last suffix (``.h5ad``)."""
        n = self.name
        return n[n.rfind(".") :] if "." in n.lstrip(".") else ""

    @property
    def parent(self) -> ObjectPath:
        """The folder holding this object (a bucket is its own parent)."""
        head = self.key.rsplit("/", 1)[0] if "/" in self.key else self.key
        return ObjectPath(f"{self.protocol}://{head}")

    def with_name(self, name: str) -> ObjectPath:
        """Sibling named ``name``."""
        return self.parent / name

    @property
    def fs(self) -> Any:
        """The fsspec filesystem."""
        return open_fs(self.protocol)

    # ----------------------------------------------------------------- queries
    def _call(self, action: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{self}: {exc}") from None
        except IsADirectoryError:
            raise
        except InputError:
            raise
        except Exception as exc:
            raise explain(exc, str(self), action) from None

    def exists(self) -> bool:
        """Whether an object or a non-empty prefix exists here."""
        return bool(self._call("read", self.fs.exists, self.key))

    def is_file(self) -> bool:
        """Whether an object exists here (a refused request raises, it is not a "no")."""
        try:
            info = self._call("read", self.fs.info, self.key)
        except FileNotFoundError:
            return False
        return info.get("type") == "file"

    def is_dir(self) -> bool:
        """Whether objects exist under this prefix."""
        return bool(self._call("read", self.fs.isdir, self.key))

    def iterdir(self) -> Iterator[ObjectPath]:
        """Objects and prefixes directly under this prefix."""
        try:
            names = self._call("list", self.fs.ls, self.key, detail=False, refresh=True)
        except FileNotFoundError:
            names = []
        for n in sorted(names):
            n = n.rstrip("/")
            if n != self.key:
                yield ObjectPath(f"{self.protocol}://{n}")

    def glob(self, pattern: str) -> Iterator[ObjectPath]:
        """Objects directly under this prefix whose name matches ``pattern``."""
        for p in self.iterdir():
            if fnmatch.fnmatchcase(p.name, pattern):
                yield p

    # ----------------------------------------------------------------- I/O
    def open(self, mode: str = "rb", **kwargs: Any) -> IO[Any]:
        """Open the object (``rb`` streams ranged reads; ``wb`` is one upload on close)."""
        try:
            return self.fs.open(self.key, mode, **kwargs)  # type: ignore[no-any-return]
        except FileNotFoundError:
            raise explain(FileNotFoundError(), str(self), "read") from None
        except Exception as exc:
            raise explain(exc, str(self), "open") from None

    def read_bytes(self) -> bytes:
        """Read the whole object."""
        return self._call("read", self.fs.cat_file, self.key)  # type: ignore[no-any-return]

    def read_text(self, encoding: str = "utf-8") -> str:
        """Read the whole object as text."""
        return self.read_bytes().decode(encoding)

    def write_bytes(self, data: bytes) -> int:
        """Write the object in one PUT (visible whole or not at all)."""
        self._call("write", self.fs.pipe_file, self.key, data, timeout=request_bound(len(data)))
        return len(data)

    def write_text(self, text: str, encoding: str = "utf-8") -> int:
        """Write ``text`` in one PUT."""
        return self.write_bytes(text.encode(encoding))

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """No-op: object stores have no folders (a bucket must already exist)."""

    def unlink(self, missing_ok: bool = False) -> None:
        """Delete the object."""
        try:
            self._call("delete", self.fs.rm_file, self.key)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def rmtree(self) -> None:
        """Delete every object under this prefix."""
        if self.exists():
            self._call("delete", self.fs.rm, self.key, recursive=True)

    def stat(self) -> Any:
        """``st_size`` and ``st_mtime`` (the object's version tag stands in for the time)."""
        info = self._call("read", self.fs.info, self.key)
        tag = info.get("ETag") or info.get("etag") or info.get("generation") or ""
        mtime = info.get("LastModified") or info.get("mtime") or info.get("updated") or ""
        return SimpleNamespace(st_size=int(info.get("size") or 0), st_mtime=f"{mtime}|{tag}")

    def upload(self, local: Path, *, last: str | None = None) -> None:
        """Copy a local file (one PUT) or folder here; a folder's ``last`` file goes up last.

        The file named ``last`` (e.g. a zarr store's root ``zarr.json``) is the commit point:
        a reader that finds it finds everything else already uploaded.
        """
        if local.is_file():
            bound = request_bound(local.stat().st_size)
            self._call("write", self.fs.put_file, str(local), self.key, timeout=bound)
            return
        files = sorted(f for f in local.rglob("*") if f.is_file())
        for f in sorted(files, key=lambda f: f.relative_to(local).as_posix() == last):
            dest = f"{self.key}/{f.relative_to(local).as_posix()}"
            bound = request_bound(f.stat().st_size)
            self._call("write", self.fs.put_file, str(f), dest, timeout=bound)

    def invalidate(self) -> None:
        """Forget listings cached by the filesystem (after another process wrote here)."""
        self.fs.invalidate_cache(self.key)


#: A local path or an object-storage path; both offer the pathlib subset raypipe uses.
AnyPath = Path | ObjectPath


def as_path(path: str | os.PathLike[str] | ObjectPath) -> AnyPath:
    """Return a :class:`~pathlib.Path` for local paths and ``file://`` URLs, else an ObjectPath."""
    if isinstance(path, ObjectPath | Path):
        return path
    s = os.fspath(path)
    if is_url(s):
        return ObjectPath(s)
    if s.startswith("file://"):
        return Path(s[len("file://") :])
    return Path(s)


def write_bytes_atomic(path: AnyPath, data: bytes) -> None:
    """Write ``data`` so no reader sees it half-written: temp + rename locally, one PUT remotely."""
    if isinstance(path, ObjectPath):
        path.write_bytes(data)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def sorted_paths(paths: Iterator[AnyPath] | list[AnyPath]) -> list[AnyPath]:
    """Sort paths by their text (one folder's listing: the same order as pathlib's)."""
    return sorted(paths, key=str)


def rmtree(path: AnyPath) -> None:
    """Delete a folder (or every object under a prefix); nothing when it is absent."""
    if isinstance(path, ObjectPath):
        path.rmtree()
    elif path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_file_atomic(path: AnyPath, write: Any) -> None:
    """Call ``write(target)`` with a local temporary path or a buffer, then publish ``path``.

    ``write`` receives a file name (local) or a binary buffer (bucket) it can write into,
    e.g. ``fig.savefig`` or ``df.to_parquet``; locally the file is renamed into place, in a
    bucket the buffer is one PUT.
    """
    if isinstance(path, ObjectPath):
        buf = io.BytesIO()
        write(buf)
        path.write_bytes(buf.getvalue())
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    write(tmp)
    os.replace(tmp, path)


def user_cache_dir() -> Path:
    """Return the per-user cache folder: ``$RAYPIPE_CACHE_DIR`` or ``~/.cache/raypipe``."""
    return Path(os.environ.get("RAYPIPE_CACHE_DIR") or "~/.cache/raypipe").expanduser()


def local_copy(path: str | os.PathLike[str] | ObjectPath) -> Path:
    """Return a local path for ``path``: itself when local, else a cached download.

    For inputs that libraries read only from local files (SQLite databases, checkpoint
    folders for ``from_pretrained``, small tables): a URL of a file or folder is downloaded
    once per machine into ``<user cache>/downloads/`` and downloaded again only when the
    object's size or version tag changed. Every Ray worker calls this itself, so each node
    has its own copy.
    """
    p = as_path(path)
    if isinstance(p, Path):
        return p
    import hashlib

    dest_root = user_cache_dir() / "downloads" / hashlib.sha256(str(p).encode()).hexdigest()[:16]
    dest = dest_root / (p.name or "object")
    stamp = dest_root / "source.json"
    if p.is_dir():
        files = p._call("list", p.fs.find, p.key, detail=True)
        version = {k: [v.get("size"), v.get("ETag") or v.get("etag")] for k, v in files.items()}
    else:
        st = p.stat()
        version = {p.key: [st.st_size, st.st_mtime]}
    want = json.dumps({"url": str(p), "version": version}, sort_keys=True, default=str)
    if dest.exists() and stamp.is_file() and stamp.read_text() == want:
        return dest
    tmp = dest_root / f".download-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        target = tmp / dest.name
        if p.is_dir():
            p._call("read", p.fs.get, p.key + "/", str(target) + "/", recursive=True)
        else:
            p._call("read", p.fs.get_file, p.key, str(target))
        if dest.exists():
            shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
        os.replace(target, dest)
        write_bytes_atomic(stamp, want.encode())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def zarr_store(path: str | AnyPath, *, read_only: bool = True) -> Any:
    """Return what ``zarr.open_group`` takes for ``path``: the path itself, or an FsspecStore."""
    p = as_path(path)
    if isinstance(p, Path):
        return str(p)
    from zarr.storage import FsspecStore

    return FsspecStore.from_url(
        str(p), storage_options=storage_options(p.protocol), read_only=read_only
    )
