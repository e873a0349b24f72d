"""The job config's typed pydantic models (one class per YAML section).

Validation never touches hardware, network or heavy libraries (no torch, no vllm).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from raypipe.config.annotate import AnnotateConfig, EvaluateConfig
from raypipe.config.base import Section
from raypipe.config.runtime import LeaseConfig, WatchdogConfig
from raypipe.config.soma import SomaConfig

# Registry names, written out so that validating a config imports no backend; a test
# (tests/test_config.py) keeps each Literal equal to its registry's names.
EmbedMethod = Literal["genept_w", "genept_s", "ce"]  # raypipe.embed.methods.METHODS
TextSourceName = Literal["table", "orgdb", "ncbi", "symbol", "llm"]  # genes.sources.TEXT_SOURCES
EmbedderName = Literal["local", "openai", "vllm"]  # raypipe.llm.backends.EMBEDDERS
GeneratorName = Literal["openai", "vllm"]  # raypipe.llm.generate.GENERATORS


class InputConfig(Section):
    """Where the atlas comes from and which obs columns hold labels and batches."""

    path: str = Field(
        description="Atlas `.zarr` written by `raypipe ingest`; an AnnData `.zarr` (read in place "
        "when X is row-chunked CSR, else ingested); `.h5ad`/10x folder (ingested on the fly); a "
        "TileDB-SOMA experiment (`soma+file:///…`, `soma+s3://…`) or `census:<organism>`."
    )
    label_key: str | None = Field(
        None, description="obs column with cell-type labels (enables evaluation)."
    )
    batch_key: str | None = Field(
        None, description="obs column with batches/donors (enables batch metrics)."
    )
    x_kind: Literal["auto", "counts", "lognorm"] = Field(
        "auto", description="What X holds; `auto` detects it at ingest."
    )
    rows_per_chunk: int = Field(
        1024, gt=0, description="Zarr row-chunk size when ingesting on the fly."
    )
    layer: str | None = Field(
        None, description="Ingest X from `raw` (adata.raw) or a named layer instead of X."
    )
    name: str | None = Field(
        None, description="Dataset name used in metrics.parquet (default: the file stem)."
    )
    in_place: bool = Field(
        True,
        description="Read an AnnData `.zarr` where it is when its X is CSR in chunks no larger "
        "than a shard (false: always ingest a copy into <output_dir>/atlas.zarr).",
    )
    soma: SomaConfig = Field(
        default_factory=SomaConfig,
        description="TileDB-SOMA / Census input (docs/soma.md); used when input.path is one.",
    )
    gene_symbol_column: str | None = Field(
        None,
        description="var column of gene symbols, matched before the Ensembl ids in var_names "
        "(default: `feature_name`, `gene_symbols`, `gene_symbol`, `symbol` or `gene_name` when "
        "var_names are Ensembl ids).",
    )

    @model_validator(mode="after")
    def _keys_differ(self) -> InputConfig:
        if self.label_key is not None and self.label_key == self.batch_key:
            raise ValueError(
                f"input.batch_key equals input.label_key ({self.label_key!r}); batch metrics "
                "would measure label mixing. Set input.batch_key to the donor/sample column."
            )
        return self


class ShardsConfig(Section):
    """How the atlas is split into row-range shards (aligned to Zarr row chunks)."""

    rows: int = Field(4096, description="Target rows per shard (rounded up to whole Zarr chunks).")

    @field_validator("rows")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v <= 0:
            raise ValueError(f"shards.rows must be > 0 (got {v}); e.g. 4096")
        return v


class GenesConfig(Section):
    """Gene identity and the text that describes each gene."""

    text_source: TextSourceName = Field(
        "orgdb", description="Registry name of the gene text source."
    )
    table: str | None = Field(
        None, description="Path of a gene→text table (TSV/CSV/parquet/JSON) for `table`."
    )
    orgdb: str | None = Field(
        None,
        description="orgdb source: a `orgHs_gene_text_go.tsv.gz`-style TSV, or a folder holding "
        "Bioconductor's org.Hs.eg.sqlite and GO.sqlite. Default: searched in known places.",
    )
    id_table: str | None = Field(
        None, description="Symbol↔Ensembl table (CSV/TSV); default: built from the text source."
    )
    aliases: str | None = Field(None, description="Alias→symbol table (TSV: alias, symbol).")
    ncbi_url: str = Field(
        "https://mygene.info/v3", description="MyGene.info base URL for the `ncbi` source."
    )
    ncbi_batch_size: int = Field(1000, gt=0, le=1000, description="Genes per MyGene.info POST.")
    min_coverage: float = Field(
        0.5, ge=0.0, le=1.0, description="Stop when fewer atlas genes than this share have text."
    )
    cross_species: bool = Field(
        False,
        description="Accept non-human gene names (mouse `Cd3e`, `ENSMUSG…`): matched to human "
        "symbols case-insensitively and reported as `casefold`, never `exact`.",
    )
    fallback: Literal["none", "symbol"] = Field(
        "none",
        description="When the text source is unavailable: `symbol` uses gene names as text (loudly warned).",
    )
    species: Literal["human", "mouse"] = Field(
        "human",
        description="Species of the atlas: Cell Ontology terms and marker-resource rows of "
        "other species are never used.",
    )


class TextModelConfig(Section):
    """The text-embedding model that embeds gene and cell-type texts."""

    backend: EmbedderName = Field("local", description="Registry name of the embedding backend.")
    model: str = Field(
        "all-MiniLM-L6-v2",
        description="Model id or local directory (`all-MiniLM-L6-v2` = the packaged offline model).",
    )
    base_url: str | None = Field(None, description="OpenAI-compatible endpoint (openai backend).")
    api_key_env: str = Field(
        "OPENAI_API_KEY", description="Name of the environment variable holding the API key."
    )
    batch_size: int = Field(64, gt=0, description="Texts per embedding request/batch.")
    dimensions: int | None = Field(
        None, gt=0, description="Requested embedding size, where the API supports it."
    )
    num_gpus: float = Field(1.0, ge=0, description="GPUs per vLLM actor.")
    device: str | None = Field(
        None, description="torch device for the local backend (default: cuda if present, else cpu)."
    )


class LLMConfig(Section):
    """The generative model that writes gene descriptions (`genes.text_source: llm`)."""

    backend: GeneratorName = Field("openai", description="Registry name of the generation backend.")
    model: str = Field("gpt-4o-mini", description="Chat model id or local directory (vllm).")
    base_url: str | None = Field(None, description="OpenAI-compatible endpoint.")
    api_key_env: str = Field(
        "OPENAI_API_KEY", description="Name of the environment variable holding the API key."
    )
    prompt_version: str = Field(
        "v1", description="Version of the gene-description prompt template."
    )
    max_tokens: int = Field(300, gt=0, description="Max output tokens per description.")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="Sampling temperature.")
    num_gpus: float = Field(1.0, ge=0, description="GPUs per vLLM actor.")


class LimitsConfig(Section):
    """One cluster-wide budget shared by every LLM actor."""

    requests_per_minute: float = Field(
        500, gt=0, description="Requests per budget window (`window_s`), all actors together."
    )
    tokens_per_minute: float = Field(
        1_000_000, gt=0, description="Tokens per budget window (`window_s`), all actors together."
    )
    max_in_flight: int = Field(8, gt=0, description="Concurrent requests per actor.")
    max_retries: int = Field(
        6, ge=0, description="Retries of a failed request (429, 5xx, timeout)."
    )
    timeout_s: float = Field(60.0, gt=0, description="Per-request timeout.")
    max_failure_share: float = Field(
        0.01, ge=0, le=1, description="Run fails when more items than this share fail."
    )
    actors: int = Field(2, gt=0, description="LLM client actors.")
    window_s: float = Field(
        60.0,
        gt=0,
        description="Budget window of requests_per_minute/tokens_per_minute (scaled down only in tests/benchmarks).",
    )
    backoff_base_s: float = Field(
        0.5, gt=0, description="First retry delay (doubles, with jitter)."
    )
    backoff_max_s: float = Field(30.0, gt=0, description="Longest retry delay.")
    breaker_cooldown_s: float = Field(
        2.0, gt=0, description="How long the circuit breaker stays open before a trial request."
    )
    failure_budget: int = Field(
        12,
        gt=0,
        description="Failed requests in a row (no success between) after which a step stops "
        "with the endpoint's last error instead of retrying on.",
    )


class CacheConfig(Section):
    """Durable caches that outlive runs: LLM results and gene-text embeddings."""

    path: str | None = Field(
        None,
        description="Shared cache folder or URL (`s3://…`) for LLM results and gene-text embeddings "
        "(default: LLM results in <output_dir>/cache, gene-text embeddings in "
        "$RAYPIPE_CACHE_DIR or ~/.cache/raypipe).",
    )


class StorageConfig(Section):
    """Object storage settings the environment cannot give (credentials never go here)."""

    endpoint: str | None = Field(
        None,
        description="S3-compatible endpoint URL (MinIO, Ceph, a test server); default: AWS_ENDPOINT_URL or AWS.",
    )
    region: str | None = Field(
        None, description="Bucket region (default: the AWS config/env chain)."
    )
    anonymous: bool = Field(False, description="Read public buckets without credentials.")
    connect_timeout_s: float = Field(
        10.0, gt=0, description="Seconds to connect to the storage endpoint, per attempt."
    )
    read_timeout_s: float = Field(
        60.0, gt=0, description="Seconds to wait for the endpoint's answer, per attempt."
    )
    max_attempts: int = Field(
        3, gt=0, description="Attempts per storage request (the first one included)."
    )


class Price(Section):
    """USD per 1M tokens."""

    input: float = 0.0
    output: float = 0.0


class GenePTWConfig(Section):
    """GenePT-w options (measured variants: docs/methods/genept.md)."""

    hvg: int | None = Field(
        500,
        gt=0,
        description="Restrict to the N most variable genes with text (null = all genes, the paper's plain method).",
    )
    center: bool = Field(
        True, description="Centre gene embeddings (subtract their mean) before weighting."
    )
    target_sum: float = Field(1e4, gt=0, description="Counts per cell after normalisation.")


class GenePTSConfig(Section):
    """GenePT-s options."""

    top_n: int = Field(100, gt=0, description="Genes per cell sentence.")
    warn_calls: int = Field(
        10_000, ge=0, description="Warn with a cost estimate above this many embedding calls."
    )


class CEConfig(Section):
    """Cell-encoder (Geneformer / LangCell) options."""

    model: str | None = Field(
        None, description="Local HF directory or hub id of the cell encoder checkpoint."
    )
    variant: Literal["geneformer_v1", "geneformer_v2", "langcell"] = Field(
        "langcell",
        description="Token framing: LangCell (`<cls>` + 2,047 genes) or Geneformer V1/V2.",
    )
    dictionary: str = Field(
        "V1", description="`V1`, `V2` or a folder/file with token/median dictionaries."
    )
    gene_name_id: str | None = Field(
        None, description="Symbol→Ensembl table (Geneformer's gene_name_id_dict or GENCODE CSV)."
    )
    pooling: Literal["cls", "mean"] | None = Field(
        None, description="Default: cls for langcell, mean for geneformer."
    )
    max_tokens_per_batch: int = Field(65_536, gt=0, description="Padded tokens per forward pass.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="`auto`: bf16 (else fp16) on CUDA, fp32 on CPU."
    )
    num_gpus: float = Field(0.0, ge=0, description="GPUs per CE actor (0 = CPU).")
    actors: int = Field(1, gt=0, description="CE encode actors.")
    min_coverage: float = Field(
        0.5, ge=0, le=1, description="Stop when fewer atlas genes than this share have a token."
    )


class EmbedConfig(Section):
    """Which cell embeddings to compute."""

    methods: list[EmbedMethod] = Field(
        default_factory=lambda: list[EmbedMethod](["genept_w"]),
        description="Cell embeddings to compute.",
    )
    genept_w: GenePTWConfig = Field(default_factory=GenePTWConfig)
    genept_s: GenePTSConfig = Field(default_factory=GenePTSConfig)
    ce: CEConfig = Field(default_factory=CEConfig)


class RayConfig(Section):
    """Where and how the job runs on Ray."""

    address: str = Field(
        "local", description="`local` starts an embedded Ray; anything else is passed to ray.init."
    )
    num_cpus: int | None = Field(None, gt=0, description="CPUs for the embedded Ray (local only).")
    object_store_memory: int | None = Field(
        None, gt=0, description="Bytes of object store for the embedded Ray."
    )
    actors: int = Field(2, gt=0, description="Actor-pool size for the embedding stages.")
    actor_cpus: float = Field(
        0.5, gt=0, description="CPUs per actor (fractional on small machines)."
    )


class JobConfig(Section):
    """A whole raypipe job."""

    input: InputConfig
    output_dir: str = Field(
        description="Folder for all outputs (embeddings, manifest, metrics, report)."
    )
    shards: ShardsConfig = Field(default_factory=ShardsConfig)
    genes: GenesConfig = Field(default_factory=GenesConfig)
    text_model: TextModelConfig = Field(default_factory=TextModelConfig)
    llm: LLMConfig = Field(default_factory=LLMConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    prices: dict[str, Price] = Field(
        default_factory=dict, description="Model id → USD per 1M tokens."
    )
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    annotate: AnnotateConfig = Field(default_factory=AnnotateConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    lease: LeaseConfig = Field(default_factory=LeaseConfig)
    watchdog: WatchdogConfig = Field(default_factory=WatchdogConfig)

    def cache_dir(self) -> str:
        """Return the LLM cache folder (a path or URL)."""
        if self.cache.path:
            return self.cache.path
        if "://" in self.output_dir:
            return self.output_dir.rstrip("/") + "/cache"
        return str(Path(self.output_dir) / "cache")

    def gene_cache_dir(self) -> str:
        """Return the folder (or URL) of the shared gene-text embedding cache."""
        if self.cache.path:
            return self.cache.path.rstrip("/") + "/gene_embeddings"
        root = os.environ.get("RAYPIPE_CACHE_DIR") or str(Path.home() / ".cache" / "raypipe")
        return str(Path(root).expanduser() / "gene_embeddings")
