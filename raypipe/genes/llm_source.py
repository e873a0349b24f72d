"""``genes.text_source: llm``: gene descriptions written by a language model (scELMo/GenePT).

Each gene gets a versioned prompt (:data:`PROMPTS`); each answer is validated (non-empty, length
bounds, refusals detected) and stored with its provenance (backend, model, prompt version,
time) in ``<output_dir>/genes/gene_texts.parquet``, a file users can review and reuse as a
``table`` source (columns ``symbol``, ``text`` plus provenance). Genes that fail are returned
separately (:attr:`LLMTextSource.failures`) and written to ``genes/gene_text_failures.parquet``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from raypipe.core.storage import as_path, write_file_atomic
from raypipe.errors import ConfigError
from raypipe.genes.sources import TextSource

if TYPE_CHECKING:
    from raypipe.config import GenesConfig, JobConfig
    from raypipe.llm.generate import Generator

__all__ = ["PROMPTS", "LLMTextSource", "load_full_names", "render_prompt", "validate_description"]

PROMPTS: dict[str, str] = {
    "v1": (
        "Describe the human gene {symbol} ({full_name}): function, pathways, cell types where "
        "it is expressed."
    ),
}

_REFUSALS = re.compile(
    r"\b(i'?m sorry|i am sorry|as an ai\b|as a language model|i cannot (help|provide)|"
    r"i can'?t (help|provide)|i do not have (any )?information|i don'?t have (any )?information|"
    r"i'?m not (able|aware)|unable to provide)",
    re.IGNORECASE,
)


def render_prompt(version: str, symbol: str, full_name: str | None = None) -> str:
    """Render the gene-description prompt ``version`` for one gene.

    Raises
    ------
    ConfigError
        For an unknown prompt version (the error lists the known ones).
    """
    if version not in PROMPTS:
        raise ConfigError(
            f"unknown llm.prompt_version {version!r}; known: {', '.join(sorted(PROMPTS))}",
            fix=f"set llm.prompt_version to one of {sorted(PROMPTS)}",
        )
    text = PROMPTS[version].format(symbol=symbol, full_name=full_name or "")
    return text.replace(" ()", "")


def validate_description(text: str, *, min_chars: int = 40, max_chars: int = 6000) -> str | None:
    """Return why ``text`` is not a usable gene description, or None when it is."""
    t = (text or "").strip()
    if not t:
        return "empty answer"
    if len(t) < min_chars:
        return f"too short ({len(t)} < {min_chars} characters)"
    if len(t) > max_chars:
        return f"too long ({len(t)} > {max_chars} characters)"
    if _REFUSALS.search(t[:300]):
        return "refusal"
    return None


def load_full_names(path: str | Path) -> dict[str, str]:
    """Symbol → full gene name from an ``orgHs_gene_text_go.tsv.gz``-style table."""
    df = pd.read_csv(path, sep="\t", usecols=["symbol", "full_name"], dtype=str)
    df = df.dropna().drop_duplicates("symbol")
    return dict(zip(df["symbol"], df["full_name"], strict=True))


def _orgdb_full_names(setting: str | None) -> dict[str, str]:
    from raypipe.errors import InputError
    from raypipe.genes.orgdb import locate_orgdb, read_orgdb

    if setting and os.path.isfile(setting) and not setting.endswith((".sqlite", ".db")):
        try:
            return load_full_names(setting)
        except (ValueError, KeyError):
            pass
    try:
        genes = read_orgdb(locate_orgdb(setting)).genes
    except InputError:
        return {}
    genes = genes.dropna(subset=["symbol", "full_name"]).drop_duplicates("symbol")
    return dict(zip(genes["symbol"].astype(str), genes["full_name"].astype(str), strict=True))


class LLMTextSource(TextSource):
    """Gene texts written by the job's generation backend (``llm`` section).

    Parameters
    ----------
    genes_cfg
        The ``genes`` section (``orgdb``, when a TSV file, supplies full gene names).
    job
        The whole job config (``llm``, ``limits``, ``cache``, ``output_dir``). Required.
    generator
        Inject a generator (default: :func:`raypipe.llm.generate.build_generator`).
    full_names
        Symbol → full name used in the prompt (default: from the orgdb data that
        ``genes_cfg.orgdb`` names or that is found, as for the ``orgdb`` source; none when
        there is none).
    """

    def __init__(
        self,
        genes_cfg: GenesConfig,
        job: JobConfig | None = None,
        *,
        generator: Generator | None = None,
        full_names: dict[str, str] | None = None,
    ) -> None:
        if job is None:
            raise ConfigError(
                "genes.text_source llm needs the whole job config (llm, limits, cache)",
                fix="build it as LLMTextSource(job.genes, job)",
            )
        super().__init__(genes_cfg, job)
        self.job: JobConfig = job
        self.version = job.llm.prompt_version
        render_prompt(self.version, "X")  # fail early on an unknown version
        self._generator = generator
        self._full_names = full_names
        self.out_dir = as_path(job.output_dir) / "genes"

    @property
    def generator(self) -> Generator:
        """The generation backend (built on first use)."""
        if self._generator is None:
            from raypipe.llm.generate import build_generator

            self._generator = build_generator(self.job)
        return self._generator

    @property
    def full_names(self) -> dict[str, str]:
        """Symbol → full gene name for the prompts (read from orgdb on first use)."""
        if self._full_names is None:
            self._full_names = _orgdb_full_names(self.cfg.orgdb)
        return self._full_names

    def usage(self) -> dict[str, dict[str, int]]:
        """Return the calls, tokens and cache hits of the generator so far (empty before any call)."""
        return {} if self._generator is None else dict(self._generator.usage())

    def fingerprint(self) -> str:
        """Hash of everything that changes the texts (backend, model, prompt, parameters)."""
        llm = self.job.llm
        blob = json.dumps(
            [
                "llm",
                llm.backend,
                llm.model,
                self.version,
                PROMPTS[self.version],
                llm.max_tokens,
                llm.temperature,
            ]
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def gene_table(self) -> None:
        """Return None: an LLM source has no gene identity table of its own."""
        return None

    def texts(
        self, symbols: list[str], ensembl_ids: list[str | None] | None = None
    ) -> pd.DataFrame:
        """Describe every gene once.

        Parameters
        ----------
        symbols
            Gene symbols (duplicates are described once).
        ensembl_ids
            Matching Ensembl ids (``gene_id``; the symbol where missing).

        Returns
        -------
        pandas.DataFrame
            ``gene_id, symbol, text, source`` plus provenance (``backend, model,
            prompt_version, prompt, created_at, tokens_in, tokens_out, cached``) for the genes
            that were described; failed genes are in :attr:`failures`.

        Raises
        ------
        FailureShareExceeded
            When more than ``limits.max_failure_share`` of the genes failed (after writing
            both parquet files).
        """
        from raypipe.llm.cost import check_failure_share

        ids = list(ensembl_ids) if ensembl_ids is not None else [None] * len(symbols)
        genes = pd.DataFrame({"symbol": [str(s) for s in symbols], "gene_id": ids})
        genes["gene_id"] = genes["gene_id"].where(genes["gene_id"].notna(), genes["symbol"])
        genes = genes.drop_duplicates("symbol").reset_index(drop=True)
        prompts = [render_prompt(self.version, s, self.full_names.get(s)) for s in genes.symbol]
        gen = self.generator
        results = gen.generate(prompts, version=self.version, validate=validate_description)
        now = pd.Timestamp.now(tz="UTC").isoformat()
        source = f"llm:{gen.backend}:{gen.model_id}:{self.version}"
        rows, fails = [], []
        for (sym, gid), prompt, r in zip(
            genes[["symbol", "gene_id"]].itertuples(index=False), prompts, results, strict=True
        ):
            if r.error is not None:
                fail = {"gene_id": gid, "symbol": sym, "stage": "describe", "reason": r.error}
                fails.append(fail)
                continue
            rows.append(
                {
                    "gene_id": gid,
                    "symbol": sym,
                    "text": r.text,
                    "source": source,
                    "backend": gen.backend,
                    "model": gen.model_id,
                    "prompt_version": self.version,
                    "prompt": prompt,
                    "created_at": now,
                    "tokens_in": r.tokens_in,
                    "tokens_out": r.tokens_out,
                    "cached": r.cached,
                }
            )
        out = pd.DataFrame(rows, columns=_COLUMNS)
        failures = pd.DataFrame(fails, columns=["gene_id", "symbol", "stage", "reason"])
        self.failures = failures.astype(str).to_dict("records")
        self._write(out, "gene_texts.parquet")
        self._write(failures, "gene_text_failures.parquet")
        check_failure_share(
            len(fails), len(genes), self.job.limits.max_failure_share, "gene descriptions"
        )
        return out

    def _write(self, df: pd.DataFrame, name: str) -> None:
        write_file_atomic(self.out_dir / name, lambda target: df.to_parquet(target, index=False))

    def close(self) -> None:
        """Release the generator."""
        if self._generator is not None:
            self._generator.close()


_COLUMNS: list[str] = [
    "gene_id",
    "symbol",
    "text",
    "source",
    "backend",
    "model",
    "prompt_version",
    "prompt",
    "created_at",
    "tokens_in",
    "tokens_out",
    "cached",
]
