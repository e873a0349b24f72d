"""Ray plumbing: start/connect Ray, and stream shard specs through a stage's actor pool."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from raypipe.core.plan import StageSpec

if TYPE_CHECKING:
    from raypipe.config import RayConfig
    from raypipe.core.plan import Shard, StagePlan

__all__ = ["StageSpec", "init_ray", "map_shards", "run_plan"]

log = logging.getLogger(__name__)


def init_ray(cfg: RayConfig) -> str:
    """Start an embedded Ray (``address: local``) or connect to a cluster; return a description.

    Under ``ray job submit`` (``RAY_ADDRESS`` set) ``local`` connects to that cluster instead.
    """
    import ray

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if ray.is_initialized():
        return "existing Ray session"
    if cfg.address == "local" and not os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # embedded, loopback-only Ray
        ray.init(
            address="local",  # always a new embedded instance, never a cluster found in /tmp/ray
            num_cpus=cfg.num_cpus,
            object_store_memory=cfg.object_store_memory,
            include_dashboard=False,
            configure_logging=False,
            log_to_driver=False,
        )
        desc = f"embedded Ray ({int(ray.cluster_resources().get('CPU', 0))} CPUs)"
    else:
        address = None if cfg.address == "local" else cfg.address
        ray.init(address=address, configure_logging=False, log_to_driver=False)
        res = ray.cluster_resources()
        desc = f"Ray cluster {address or os.environ.get('RAY_ADDRESS')} ({int(res.get('CPU', 0))} CPUs, {int(res.get('GPU', 0))} GPUs)"
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    return desc


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
    for row in ds.iter_rows():
        done.append(row)
        if on_done is not None:
            on_done(row)
    return done


def run_plan(
    plan: StagePlan,
    out_dir: str,
    method: str,
    shards: list[Shard],
    *,
    progress: bool = True,
    desc: str | None = None,
) -> list[Shard]:
    """Run a plan over the shards its ledger says are pending; return those shards.

    Parts and markers of shard indices beyond ``shards`` are dropped first (the atlas shrank);
    fresh shards are reused; the rest stream through the plan's steps with a progress bar.
    """
    from tqdm.auto import tqdm

    from raypipe.core.ledger import Ledger

    ledger = Ledger(out_dir, plan.kind, method)
    ledger.drop_stale(len(shards))
    todo = ledger.pending(shards, plan.fingerprint)
    bar = tqdm(
        total=sum(s.n_rows for s in todo),
        unit="cell",
        desc=desc or ledger.stage,
        disable=not progress or not todo,
    )
    try:
        map_shards(plan.steps, todo, on_done=lambda row: bar.update(int(row["n_cells"])))
    finally:
        bar.close()
    return todo
