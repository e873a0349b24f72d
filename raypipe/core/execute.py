"""Ray plumbing: start/connect Ray, and stream shard specs through a stage's actor pool."""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from raypipe.core import watchdog
from raypipe.core.plan import StageSpec

if TYPE_CHECKING:
    from raypipe.config import RayConfig
    from raypipe.core.plan import Shard, StagePlan

__all__ = ["StageSpec", "init_ray", "map_shards", "run_plan", "worker_error"]

log = logging.getLogger(__name__)


def init_ray(cfg: RayConfig) -> str:
    """Start an embedded Ray (``address: local``) or connect to a cluster; return a description.

    Under ``ray job submit`` (``RAY_ADDRESS`` set) ``local`` connects to that cluster instead.
    An existing session (a notebook's own ``ray.init``) is used as it is; in every case Ray
    Data's own progress output is switched off (raypipe draws one bar per stage) and, unless
    raypipe logs at INFO (``-v``), Ray's expected chatter is kept off the terminal.
    """
    import ray

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    quiet = not log.isEnabledFor(logging.INFO)  # `raypipe -v` (raypipe logging at INFO) shows all
    if ray.is_initialized():
        _configure_ray_data(quiet)
        return "existing Ray session"
    with _quiet_ray_backend(quiet):
        if cfg.address == "local" and not os.environ.get("RAY_ADDRESS"):
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # embedded, loopback-only Ray
            ray.init(
                address="local",  # always a new embedded instance, never a cluster in /tmp/ray
                num_cpus=cfg.num_cpus,
                object_store_memory=cfg.object_store_memory,
                include_dashboard=False,
                configure_logging=False,
                log_to_driver=False,
            )
            desc = f"embedded Ray ({int(ray.cluster_resources().get('CPU', 0))} CPUs)"
            _start_reaper()
        else:
            address = None if cfg.address == "local" else cfg.address
            from raypipe.core.storage import OPTIONS_ENV

            # the job's storage: section reaches every worker (never a credential: those come
            # from each node's own environment: instance profile, IRSA, workload identity)
            env = {OPTIONS_ENV: os.environ[OPTIONS_ENV]} if os.environ.get(OPTIONS_ENV) else {}
            ray.init(
                address=address,
                configure_logging=False,
                log_to_driver=False,
                runtime_env={"env_vars": env} if env else None,
            )
            res = ray.cluster_resources()
            desc = f"Ray cluster {address or os.environ.get('RAY_ADDRESS')} ({int(res.get('CPU', 0))} CPUs, {int(res.get('GPU', 0))} GPUs)"
    _configure_ray_data(quiet)
    return desc


_REAPER: list[Any] = []  # the embedded Ray's watcher process (kept referenced while it runs)


def _start_reaper() -> None:
    """Have a watcher kill the embedded Ray's processes if this driver dies (even by SIGKILL)."""
    from raypipe.core.reaper import start_reaper

    if not any(p.poll() is None for p in _REAPER):
        proc = start_reaper()
        if proc is not None:
            _REAPER.append(proc)


def worker_error(exc: BaseException) -> BaseException | None:
    """Return the raypipe error a Ray task or actor raised, unwrapped from Ray's wrappers.

    Ray wraps an exception raised in a worker (``RayTaskError``, Ray Data's
    ``UserCodeException``) with its own traceback text; the user should read raypipe's
    message. A full disk (``ENOSPC``, ``EDQUOT``) becomes a :class:`RaypipeError` naming the
    path. None when the chain holds neither.
    """
    from raypipe.core.outputs import disk_full_error, is_disk_full
    from raypipe.errors import RaypipeError

    seen: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or any(e is s for s in seen):
            continue
        seen.append(e)
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__]
    seen = [e for e in seen if not type(e).__module__.startswith("ray.")]  # Ray's wrappers
    for e in seen:
        if isinstance(e, RaypipeError):
            return e
    for e in seen:
        if is_disk_full(e):
            return disk_full_error(getattr(e, "filename", None) or "the output folder")
    return None


def _configure_ray_data(quiet: bool) -> None:
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # raypipe draws one bar per stage itself
    ctx.print_on_execution_start = False
    # a stage's own error (raypipe's message, or OSError ENOSPC with its path) reaches the
    # driver as itself, not as Ray Data's "UDF failed to process a data block" wrapper
    ctx.raise_original_map_exception = True
    if quiet:
        _quiet_ray_data()


#: The line Ray's C++ logger prints (at INFO, before its level applies) to confirm
#: RAY_BACKEND_LOG_LEVEL; it is the only thing :func:`_quiet_ray_backend` holds back.
_BACKEND_LEVEL_ECHO = "Set ray log level from environment variable RAY_BACKEND_LOG_LEVEL"


@contextmanager
def _quiet_ray_backend(quiet: bool) -> Iterator[None]:
    """Start Ray's C++ side (this driver's core worker) with ERROR lines kept off the terminal.

    Why: Ray Data's own actor pools make the driver's core worker log, at ERROR, "Actor ...
    has constructor arguments in the object store and max_restarts > 0" for every run — a
    known false alarm (ray-project/ray#57733: Ray Data passes an internal handle as an actor
    argument; raypipe's own constructor arguments are small). The C++ logger prints every
    ERROR line to the driver's stderr and has no per-message filter; its only switch is the
    process-wide ``RAY_BACKEND_LOG_LEVEL``, read once when the core worker starts (here). So,
    unless the user set it or asked for ``-v``: ``fatal`` while Ray starts (the embedded
    Ray's raylet and workers inherit it: their log files under /tmp/ray keep FATAL lines
    only); real failures still reach raypipe as Python exceptions (task/actor errors, lost
    nodes). Ray echoes that setting once on stderr; that echo line alone is dropped, every
    other byte written to stderr during ``ray.init`` is passed on unchanged.
    """
    if not quiet or "RAY_BACKEND_LOG_LEVEL" in os.environ:
        yield
        return
    os.environ["RAY_BACKEND_LOG_LEVEL"] = "fatal"
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            del os.environ["RAY_BACKEND_LOG_LEVEL"]  # later subprocesses get Ray's default
            captured.seek(0)
            kept = [
                ln
                for ln in captured.read().splitlines(keepends=True)
                if _BACKEND_LEVEL_ECHO.encode() not in ln
            ]
            if kept:
                os.write(2, b"".join(kept))


class _DropRecord(logging.Filter):
    """Drop log records whose message starts with ``prefix`` (one known, expected message)."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


class _DropReportedWorkerError(logging.Filter):
    """Keep Ray Data's console lines about an error raypipe itself reports off the terminal.

    A stage's own error (a :class:`~raypipe.errors.RaypipeError`, a full disk) is raised
    again by :func:`map_shards` as raypipe's one message; Ray Data would first log it at
    ERROR with its stack trace, and call it an internal error, since it is not its own
    ``UserCodeException``. Records logged while handling such an error are dropped from
    the console (Ray Data's log file keeps them); every other error still prints.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else sys.exc_info()[1]
        return exc is None or worker_error(exc) is None


def _quiet_ray_data() -> None:
    """Keep Ray Data's per-dataset INFO chatter on its log file, off the terminal.

    Ray Data logs "Dataset ... execution finished in N s" at INFO for every dataset (several
    per run) through its own ``ray.data`` console handler; raypipe's progress bars and
    summary say the same. The console handler is raised to WARNING (the ``ray-data.log``
    file under the Ray session keeps everything). Ray Data also warns, once, "Progress bars
    disabled" — raypipe disables them on purpose (it draws one bar per stage), so that one
    message is dropped where it is logged. Other Ray Data warnings and errors still print.
    """
    logger = logging.getLogger("ray.data")
    for handler in logger.handlers:
        if handler.get_name() == "console":
            handler.setLevel(logging.WARNING)
            if not any(isinstance(f, _DropReportedWorkerError) for f in handler.filters):
                handler.addFilter(_DropReportedWorkerError())
    progress = logging.getLogger("ray.data._internal.progress")
    if not any(isinstance(f, _DropRecord) for f in progress.filters):
        progress.addFilter(_DropRecord("Progress bars disabled"))


def _pool(actors: int, n_items: int) -> Any:
    """Build an autoscaling actor pool of 1..``actors`` (never more actors than items).

    ``min_size=1`` matters: a pool that insists on its full size can starve Ray Data's own
    read tasks on a small cluster (seen on a 2-CPU cluster), and must shrink after node loss.
    """
    import ray

    return ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, min(actors, n_items)))


def map_shards(
    specs: list[StageSpec],
    shards: list[Shard],
    *,
    on_done: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Stream ``shards`` through chained stages (e.g. CPU tokenise → GPU encode).

    Each step runs on its own actor pool, so Ray Data overlaps them; the last step must
    return the shard-stage summary (see raypipe.core.stage). Actors restart on node loss
    (Ray Data's default ``max_restarts=-1``) and their tasks are retried; every step is idempotent because
    parts are written atomically under deterministic names.

    Parameters
    ----------
    specs
        The steps, in order.
    shards
        The shards still to do.
    on_done
        Progress callback per finished shard (summary row).
    """
    import ray

    if not shards:
        return []
    ds: Any = ray.data.from_items(
        [
            {"shard": s.index, "start": s.start, "stop": s.stop, "content_hash": s.content_hash}
            for s in shards
        ],
        override_num_blocks=len(shards),
    )
    for spec in specs:
        ds = ds.map_batches(
            spec.stage,
            fn_constructor_kwargs=spec.kwargs,
            batch_size=1,
            compute=_pool(spec.actors, len(shards)),
            num_cpus=spec.actor_cpus,
            num_gpus=spec.num_gpus or None,
            # Ray Data's actor pools default to max_restarts=-1, max_task_retries=-1: actors
            # lost with a node are recreated and their shards retried.
        )
    done = []
    try:
        for row in ds.iter_rows():
            done.append(row)
            if on_done is not None:
                on_done(row)
    except Exception as exc:
        ours = worker_error(exc)
        if ours is None:
            raise
        raise ours from None
    return done


def run_plan(
    plan: StagePlan,
    out_dir: str,
    method: str,
    shards: list[Shard],
    *,
    progress: bool = True,
    desc: str | None = None,
) -> dict[Shard, str]:
    """Run a plan over the shards its ledger says are stale; return them with the reason.

    Parts and markers of shard indices beyond ``shards`` are dropped first (the atlas shrank);
    fresh shards are reused; the rest stream through the plan's steps with a progress bar.
    The result maps each computed shard to why it was (:meth:`Ledger.why_stale`).
    """
    from tqdm.auto import tqdm

    from raypipe.core.ledger import Ledger

    ledger = Ledger(out_dir, plan.kind, method)
    ledger.drop_stale(len(shards))
    todo = ledger.stale(shards, plan.fingerprint)
    bar = tqdm(
        total=sum(s.n_rows for s in todo),
        unit="cell",
        desc=desc or ledger.stage,
        disable=not progress or not todo,
    )
    name = desc or ledger.stage
    left = [len(todo)]

    def done(row: dict[str, Any]) -> None:
        bar.update(int(row["n_cells"]))
        left[0] -= 1
        watchdog.progress(f"{name}: {left[0]} of {len(todo)} shards still running on Ray actors")

    if todo:
        watchdog.activity(f"{name}: {len(todo)} shards starting on Ray actors")
    try:
        map_shards(plan.steps, list(todo), on_done=done)
    finally:
        bar.close()
    return todo
