"""One writer per run folder: a lease with owner, host, pid and a heartbeat.

A run takes the lease (``<out>/lease.json``) before it writes anything else and gives it back
when it ends. A second run on the same folder is refused, naming the holder (user, host,
pid, since when, last heartbeat). A lease whose heartbeat is older than ``stale_after_s``,
or whose owner process is gone (same host), is taken over, and the new owner says so.

Locally the lease is created with ``O_CREAT | O_EXCL`` (atomic on POSIX file systems; NFS
v3+ honours it too) and a takeover first renames the stale file away (only one contender
can). On S3 it is a conditional PUT: ``If-None-Match: *`` to create, ``If-Match: <ETag>`` to
take over or beat, so two runs can never both hold it on a store that honours conditional
writes (AWS S3, MinIO, moto; checked by a probe). A store that ignores them gets a
best-effort lease: the owner reads the lease back after writing it and after every beat and
stops when it finds another owner's.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raypipe.core.storage import AnyPath, ObjectPath, as_path
from raypipe.core.storage_options import request_bound
from raypipe.errors import RaypipeError

__all__ = ["LEASE", "Lease", "LeaseHeld", "LeaseLost", "describe_holder"]

log = logging.getLogger(__name__)

#: The lease file, at the top of the run folder.
LEASE = "lease.json"


class LeaseHeld(RaypipeError):
    """Another run holds the lease of this output folder."""


class LeaseLost(RaypipeError):
    """The lease of this run was taken over (its heartbeat stalled longer than ``stale_after_s``)."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def describe_holder(holder: dict[str, Any], now: float | None = None) -> str:
    """``pid 123 on host h (user u), started 2026-..., last heartbeat 4 s ago``."""
    now = time.time() if now is None else now
    beat = float(holder.get("heartbeat") or 0.0)
    return (
        f"pid {holder.get('pid')} on host {holder.get('host')} (user {holder.get('user')}), "
        f"started {holder.get('started')}, last heartbeat {max(0.0, now - beat):.0f} s ago"
    )


@dataclass
class Lease:
    """The lease of one run folder.

    Parameters
    ----------
    out_dir
        The run folder (a path or a bucket URL).
    heartbeat_s
        Seconds between heartbeats.
    stale_after_s
        A lease without a heartbeat for this long is taken over.
    """

    out_dir: str
    heartbeat_s: float = 30.0
    stale_after_s: float = 300.0
    owner: str = field(default_factory=lambda: uuid.uuid4().hex)
    took_over: dict[str, Any] | None = None
    lost: str | None = None
    best_effort: bool = False
    _started: str = ""
    _etag: str | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def path(self) -> AnyPath:
        """The lease file."""
        return as_path(self.out_dir) / LEASE

    def _record(self) -> dict[str, Any]:
        now = time.time()
        return {
            "owner": self.owner,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "user": getpass.getuser(),
            "started": self._started,
            "heartbeat": now,
            "heartbeat_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(now)),
        }

    # ------------------------------------------------------------------ public
    def acquire(self) -> Lease:
        """Take the lease (or take over a stale one); start the heartbeat.

        Raises
        ------
        LeaseHeld
            Naming the holder, when a live run holds it.
        """
        self._started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        for _ in range(3):  # a contender may take over between our read and our write
            if self._create():
                break
            holder, tag = self._read()
            if holder is None:
                continue  # released in between: try again
            why = self._stale(holder)
            if why is None:
                raise LeaseHeld(
                    f"output_dir {self.out_dir} is in use by another raypipe run: "
                    f"{describe_holder(holder)}",
                    fix="wait for that run to end, or point output_dir elsewhere; a lease with "
                    f"no heartbeat for {self.stale_after_s:.0f} s (lease.stale_after_s) or "
                    "whose process is gone is taken over",
                )
            if self._replace(holder, tag):
                self.took_over = dict(holder, why=why)
                log.warning(
                    "took over the lease of %s from a run that is gone (%s): %s",
                    self.out_dir,
                    why,
                    describe_holder(holder),
                )
                break
        else:
            raise LeaseHeld(
                f"output_dir {self.out_dir}: another run took the lease at the same moment",
                fix="run one job per output_dir at a time",
            )
        self._verify()
        self._thread = threading.Thread(target=self._beat, name="raypipe-lease", daemon=True)
        self._thread.start()
        return self

    def check(self) -> None:
        """Raise :class:`LeaseLost` when another run took the lease over."""
        if self.lost:
            raise LeaseLost(
                f"the lease of {self.out_dir} was taken over: {self.lost}",
                fix="this run stalled longer than lease.stale_after_s; raise it, or look for "
                "what blocked the run",
            )

    def release(self) -> None:
        """Stop the heartbeat and delete the lease (when it is still ours)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            holder, _ = self._read()
            if holder is not None and holder.get("owner") == self.owner:
                self.path.unlink()
        except (OSError, RaypipeError) as exc:  # never hide the run's own outcome
            log.warning(
                "could not give back the lease of %s (%s); the next run takes it over once "
                "its heartbeat is %.0f s old",
                self.out_dir,
                exc,
                self.stale_after_s,
            )

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    # ------------------------------------------------------------------ internals
    def _stale(self, holder: dict[str, Any]) -> str | None:
        age = time.time() - float(holder.get("heartbeat") or 0.0)
        if age > self.stale_after_s:
            return f"no heartbeat for {age:.0f} s"
        pid = holder.get("pid")
        same_host = holder.get("host") == socket.gethostname()
        if same_host and isinstance(pid, int) and not _pid_alive(pid):
            return f"process {pid} is gone"
        return None

    def _read(self) -> tuple[dict[str, Any] | None, str | None]:
        p = self.path
        try:
            if isinstance(p, ObjectPath):
                info = p._call("read", p.fs.info, p.key, refresh=True)
                data = p.read_bytes()
                tag = info.get("ETag")
            else:
                data, tag = p.read_bytes(), None
            holder = json.loads(data)
        except (FileNotFoundError, ValueError):
            return None, None
        return (holder, tag) if isinstance(holder, dict) else (None, None)

    def _create(self) -> bool:
        """Create the lease if absent (atomically); False when it exists."""
        body = json.dumps(self._record()).encode()
        p = self.path
        if isinstance(p, ObjectPath):
            return self._put(p, body, IfNoneMatch="*")
        p.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as fh:
            fh.write(body)
            fh.flush()
            os.fsync(fh.fileno())
        return True

    def _replace(self, holder: dict[str, Any], tag: str | None) -> bool:
        """Replace the stale ``holder``'s lease by ours (only one contender wins)."""
        p = self.path
        if isinstance(p, ObjectPath):
            return self._put(p, json.dumps(self._record()).encode(), IfMatch=tag or "*")
        aside = p.with_name(f".{LEASE}.{self.owner}.stale")
        try:
            os.rename(p, aside)  # atomic: a second contender finds nothing to rename
        except FileNotFoundError:
            return False
        os.unlink(aside)
        return self._create()

    def _put(self, p: ObjectPath, body: bytes, **condition: str) -> bool:
        """Make a conditional PUT on S3; return False when the condition failed (412/409)."""
        bucket, _, key = p.key.partition("/")
        try:
            out = p.fs.call_s3(
                "put_object",
                Bucket=bucket,
                Key=key,
                Body=body,
                timeout=request_bound(len(body)),
                **condition,
            )
        except FileExistsError:  # s3fs's word for 412 on If-None-Match
            return False
        except Exception as exc:
            text = f"{type(exc).__name__}: {exc}"
            conflict = ("pre-condition", "PreconditionFailed", "ConditionalRequestConflict")
            if any(s in text for s in conflict):
                return False
            if "NotImplemented" in text or "not implemented" in text.lower():
                self.best_effort = True  # the store refuses conditional writes: plain PUT
                p.write_bytes(body)
                return True
            p._call("write", _reraise, exc)  # raises a StorageError naming the URL
            raise
        self._etag = str(out.get("ETag")) if isinstance(out, dict) else None
        return True

    def _verify(self) -> None:
        """Read the lease back: another owner's means a store that ignored the condition."""
        holder, tag = self._read()
        if holder is None or holder.get("owner") != self.owner:
            raise LeaseHeld(
                f"output_dir {self.out_dir} is in use by another raypipe run: "
                + (describe_holder(holder) if holder else "its lease changed while taken"),
                fix="run one job per output_dir at a time",
            )
        if tag:
            self._etag = tag

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self._heartbeat()
            except Exception as exc:  # storage hiccup: the next beat tries again
                log.warning("lease heartbeat on %s failed: %s", self.out_dir, exc)

    def _heartbeat(self) -> None:
        holder, tag = self._read()
        if holder is None or holder.get("owner") != self.owner:
            self.lost = describe_holder(holder) if holder else "its lease file is gone"
            self._stop.set()
            log.error("the lease of %s was taken over: %s", self.out_dir, self.lost)
            return
        body = json.dumps(self._record()).encode()
        p = self.path
        if isinstance(p, ObjectPath):
            if not self._put(p, body, IfMatch=tag or self._etag or "*"):
                self.lost = "another run replaced it"
                self._stop.set()
            return
        assert isinstance(p, Path)
        tmp = p.with_name(f".{LEASE}.{self.owner}.tmp")
        tmp.write_bytes(body)
        os.replace(tmp, p)


def _reraise(exc: BaseException) -> None:
    raise exc
