"""The job config: typed pydantic models loaded from YAML, with ``--set`` overrides.

Validation never touches hardware, network or heavy libraries (no torch, no vllm):
``import raypipe.config`` is cheap and a test proves it.
"""

from raypipe.config.annotate import AnnotateConfig, EvaluateConfig, ScorerName
from raypipe.config.discover import DiscoverConfig, NamingName
from raypipe.config.loading import (
    apply_overrides,
    config_hash,
    load_config,
)
from raypipe.config.markers import MarkerDBConfig, MarkerDBName
from raypipe.config.models import (
    CacheConfig,
    CEConfig,
    EmbedConfig,
    EmbedderName,
    EmbedMethod,
    GenePTSConfig,
    GenePTWConfig,
    GeneratorName,
    GenesConfig,
    InputConfig,
    JobConfig,
    LimitsConfig,
    LLMConfig,
    Price,
    RayConfig,
    ShardsConfig,
    SomaConfig,
    StorageConfig,
    TextModelConfig,
    TextSourceName,
)
from raypipe.config.reference import ConfigKey, reference, reference_markdown, reference_page
from raypipe.config.runtime import LeaseConfig, WatchdogConfig

__all__ = [
    "AnnotateConfig",
    "CEConfig",
    "CacheConfig",
    "ConfigKey",
    "DiscoverConfig",
    "EmbedConfig",
    "EmbedMethod",
    "EmbedderName",
    "EvaluateConfig",
    "GenePTSConfig",
    "GenePTWConfig",
    "GeneratorName",
    "GenesConfig",
    "InputConfig",
    "JobConfig",
    "LLMConfig",
    "LeaseConfig",
    "LimitsConfig",
    "MarkerDBConfig",
    "MarkerDBName",
    "NamingName",
    "Price",
    "RayConfig",
    "ScorerName",
    "ShardsConfig",
    "SomaConfig",
    "StorageConfig",
    "TextModelConfig",
    "TextSourceName",
    "WatchdogConfig",
    "apply_overrides",
    "config_hash",
    "load_config",
    "reference",
    "reference_markdown",
    "reference_page",
]
