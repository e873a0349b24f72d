"""Options of object-storage requests: endpoint, region, anonymous access, bounded waits.

The ``storage:`` config section reaches every process (Ray workers included) through
``RAYPIPE_STORAGE_OPTIONS`` (JSON, never a secret); :func:`storage_options` turns it into
fsspec options. Every S3 request is bounded: ``max_attempts`` attempts, each waiting at most
``connect_timeout_s`` to connect and ``read_timeout_s`` for the answer
(:data:`DEFAULT_TIMEOUTS` unless the section says otherwise). :func:`explain` turns a
filesystem exception into one clear error naming the URL (and the endpoint that did not
answer), never a credential.
"""

from __future__ import annotations

import json
import os
from typing import Any

from raypipe.errors import InputError

__all__ = [
    "DEFAULT_TIMEOUTS",
    "OPTIONS_ENV",
    "StorageError",
    "endpoint",
    "explain",
    "options",
    "request_bound",
    "storage_options",
]

#: Environment variable carrying the ``storage:`` config section (JSON, no secrets) to workers.
OPTIONS_ENV = "RAYPIPE_STORAGE_OPTIONS"

#: Bounded waits of every storage request unless the ``storage:`` section says otherwise.
DEFAULT_TIMEOUTS = {"connect_timeout_s": 10.0, "read_timeout_s": 60.0, "max_attempts": 3}
#: Longest pause between two attempts (botocore's standard retry mode caps its backoff here).
MAX_BACKOFF_S = 20.0


class StorageError(InputError):
    """Object storage refused or could not serve a request (names the URL, never a secret)."""


def options() -> dict[str, Any]:
    """Return the ``storage:`` section this process was given (empty when none)."""
    try:
        opts = json.loads(os.environ.get(OPTIONS_ENV) or "{}")
    except ValueError:
        return {}
    return opts if isinstance(opts, dict) else {}


def endpoint() -> str:
    """Return the object-storage endpoint in use, for messages (never a credential)."""
    return str(
        options().get("endpoint")
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
        or "(the default AWS endpoint)"
    )


def request_bound(n_bytes: int = 0) -> float:
    """Return the longest a request of ``n_bytes`` may take, in seconds (then it fails).

    Attempts x (connect + read timeout), the backoffs between attempts (at most
    :data:`MAX_BACKOFF_S` each), plus one second per MB of body (an upload slower than 1 MB/s
    is treated as stalled). It bounds uploads too: a server that stops reading stalls a
    write, which no read timeout sees.
    """
    t = {**DEFAULT_TIMEOUTS, **options()}
    per_try = float(t["connect_timeout_s"]) + float(t["read_timeout_s"])
    tries = float(t["max_attempts"])
    return tries * per_try + (tries - 1) * MAX_BACKOFF_S + n_bytes / 1e6


def _s3fs_single_attempt() -> None:
    """Make s3fs try each call once (botocore retries): a class attribute, no option."""
    try:
        import s3fs
    except ImportError:
        return
    s3fs.S3FileSystem.retries = 1


def storage_options(protocol: str) -> dict[str, Any]:
    """Return fsspec options for ``protocol`` from the ``storage:`` section (may be empty)."""
    opts = options()
    # other processes (Ray workers, concurrent runs) write here: never trust a cached listing
    out: dict[str, Any] = {"use_listings_cache": False}
    if protocol in {"s3", "s3a"}:
        client: dict[str, Any] = {}
        t = {k: opts.get(k) or v for k, v in DEFAULT_TIMEOUTS.items()}
        # botocore bounds each attempt and retries transient errors (timeouts, connection
        # errors, 5xx, throttling) in its standard mode; s3fs's own loop, which would repeat
        # all of that 5 times, tries once: a request waits at most request_bound()
        out["config_kwargs"] = {
            "connect_timeout": t["connect_timeout_s"],
            "read_timeout": t["read_timeout_s"],
            "retries": {"max_attempts": int(t["max_attempts"]), "mode": "standard"},
        }
        _s3fs_single_attempt()
        if opts.get("endpoint"):
            out["endpoint_url"] = opts["endpoint"]
        if opts.get("region"):
            client["region_name"] = opts["region"]
        if opts.get("anonymous"):
            out["anon"] = True
        if client:
            out["client_kwargs"] = client
    elif protocol in {"gs", "gcs"}:
        if opts.get("endpoint"):
            out["endpoint_url"] = opts["endpoint"]
        if opts.get("anonymous"):
            out["token"] = "anon"
    return out


def explain(exc: BaseException, url: str, action: str) -> StorageError:
    """Turn a filesystem exception into a clear error naming ``url`` (and no credentials)."""
    name = type(exc).__name__
    text = str(exc)
    low = f"{name} {text}".lower()
    if isinstance(exc, PermissionError) or any(
        s in low for s in ("accessdenied", "access denied", "forbidden", "invalidaccesskeyid")
    ):
        why, fix = (
            "access denied (wrong or missing credentials?)",
            "check the credentials of this environment (AWS_PROFILE/instance role/IRSA, "
            "GOOGLE_APPLICATION_CREDENTIALS/workload identity) and the bucket policy",
        )
    elif "credentials" in low and ("unable to locate" in low or "nocredentials" in low):
        why, fix = (
            "no credentials found",
            "give this environment credentials (AWS_PROFILE, an instance role/IRSA, "
            "GOOGLE_APPLICATION_CREDENTIALS/workload identity) or set storage.anonymous for "
            "public data",
        )
    elif "signaturedoesnotmatch" in low:
        why, fix = "credentials were rejected", "check the secret key of this environment"
    elif "nosuchbucket" in low or "bucket does not exist" in low:
        why, fix = "the bucket does not exist", "create the bucket or fix the URL"
    elif isinstance(exc, FileNotFoundError):
        why, fix = "no such object", "check the URL"
    elif any(s in low for s in ("connect", "endpoint", "timed out", "timeout")):
        t = {**DEFAULT_TIMEOUTS, **options()}
        why, fix = (
            f"the storage endpoint {endpoint()} did not answer ({name}; each of "
            f"storage.max_attempts={t['max_attempts']} tries waits at most "
            f"storage.connect_timeout_s={t['connect_timeout_s']:g} s to connect and "
            f"storage.read_timeout_s={t['read_timeout_s']:g} s for the answer)",
            "check that the endpoint is up (AWS_ENDPOINT_URL / storage.endpoint) and the "
            "network, or raise the storage timeouts",
        )
    else:
        why, fix = f"{name}: {text[:200]}", "check the URL and the credentials of this environment"
    return StorageError(f"cannot {action} {url}: {why}", fix=fix)
