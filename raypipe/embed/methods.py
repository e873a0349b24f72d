"""The embedding-method registry (``embed.methods``): name → the stage's plan builder.

A builder gets the job, the atlas, the gene space and the shard plan and returns a
:class:`raypipe.core.plan.StagePlan`: the chained steps (callable classes, their constructor
kwargs with big payloads as ObjectRefs, actor resources), and the fingerprint that keys its
outputs. Each method's entry carries its capabilities; builders are imported on first use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from raypipe.registry import Registry

if TYPE_CHECKING:
    from raypipe.atlas.store import AtlasInfo
    from raypipe.config import JobConfig
    from raypipe.core.plan import Shard, StagePlan
    from raypipe.genes.space import GeneSpace

__all__ = ["METHODS", "MethodEntry", "text_space_methods"]


@dataclass(frozen=True)
class MethodEntry:
    """One embedding method.

    Attributes
    ----------
    builder
        ``"module:function"`` of its plan builder (imported on first use).
    title
        Its name for people (``GenePT-w``).
    text_space
        Its cells live in the text model's space (candidate texts can be scored against them).
    cell_text_scores
        Its stage computes LangCell's per-cell zero-shot scores when given the candidate texts
        (``build(..., candidate_texts=...)``; the ``langcell`` scorer reads them).
    fits_space
        Its builder fits statistics on the atlas (e.g. GenePT-w's HVG set) and takes the run's
        :class:`~raypipe.core.space.FittedSpace` (``build(..., space=...)``) to record and
        reuse them.
    preflight
        ``"module:function"`` checking the method's inputs on the driver before the run
        writes anything (e.g. loading the CE checkpoint), or None.
    """

    builder: str
    title: str
    text_space: bool = False
    cell_text_scores: bool = False
    fits_space: bool = False
    preflight: str | None = None

    def check(self, job: JobConfig) -> None:
        """Run the method's driver-side preflight (``"module:function"``), if it has one.

        Called before the run writes anything: e.g. CE loads its checkpoint here.
        """
        if self.preflight is None:
            return
        import importlib

        module, _, attr = self.preflight.partition(":")
        getattr(importlib.import_module(module), attr)(job)

    def build(
        self,
        job: JobConfig,
        atlas: AtlasInfo,
        genes: GeneSpace,
        shards: list[Shard],
        **kwargs: Any,
    ) -> StagePlan:
        """Import the builder and plan the method (extra keyword arguments are passed on)."""
        import importlib

        module, _, attr = self.builder.partition(":")
        fn: Any = getattr(importlib.import_module(module), attr)
        return fn(job, atlas, genes, shards, **kwargs)  # type: ignore[no-any-return]


METHODS: Registry[MethodEntry] = Registry("embedding method")
METHODS.add(
    "genept_w",
    MethodEntry(
        "raypipe.embed.genept_w:build_genept_w", "GenePT-w", text_space=True, fits_space=True
    ),
)
METHODS.add(
    "genept_s", MethodEntry("raypipe.embed.genept_s:build_genept_s", "GenePT-s", text_space=True)
)
METHODS.add(
    "ce",
    MethodEntry(
        "raypipe.embed.ce:build_ce",
        "CE",
        cell_text_scores=True,
        preflight="raypipe.embed.ce:check_checkpoint",
    ),
)


def text_space_methods() -> list[str]:
    """Names of the methods whose cells share the text model's space."""
    return [name for name in METHODS if METHODS.get(name).text_space]
