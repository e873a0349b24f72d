"""Geneformer dictionaries (token ids, gene medians, symbol → Ensembl), loaded safely.

Geneformer ships its vocabularies as pickles. A pickle can run arbitrary code when it is
loaded, so this module never calls :func:`pickle.load`: :class:`RestrictedUnpickler` admits
plain containers, strings and numbers, plus the two numpy globals that Geneformer's real
pickles need to rebuild numpy scalars (``np.int16`` token ids, ``np.float64`` medians).
Anything else (a class instance, ``os.system``, ``builtins.eval``) is refused before it runs.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from raypipe.errors import InputError

__all__ = [
    "GeneformerDictionaries",
    "RefusedPickleError",
    "RestrictedUnpickler",
    "TokenPlan",
    "default_search_dirs",
    "load_dict",
    "resolve_ensembl_ids",
    "safe_pickle_load",
]

log = logging.getLogger(__name__)

# File names of the two known vocabularies, as Geneformer (and LangCell) release them.
_KNOWN = {
    "V1": {
        "token": ("token_dictionary.pkl", "token_dictionary_gc30M.pkl"),
        "median": ("gene_median_dictionary.pkl", "gene_median_dictionary_gc30M.pkl"),
    },
    "V2": {
        "token": ("token_dictionary_gc95M.pkl", "token_dictionary_gc104M.pkl"),
        "median": ("gene_median_dictionary_gc95M.pkl", "gene_median_dictionary_gc104M.pkl"),
    },
}
_NAME_ID = ("gene_name_id_dict.pkl", "gene_name_id_dict_gc95M.pkl", "gene_name_id_dict_gc30M.pkl")

# The only globals a Geneformer pickle may reference: numpy scalar reconstruction.
_SCALAR_GLOBALS = frozenset(
    {("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")}
)
_SCALAR_KINDS = frozenset("biuf")  # bool, int, unsigned, float: no object/str/void dtypes


class RefusedPickleError(pickle.UnpicklingError):
    """A pickle asked for a global outside the allowed plain-data set."""


def _numpy_scalar(dtype: Any, data: Any = None) -> Any:
    """Rebuild a numpy scalar like ``numpy.core.multiarray.scalar``, numbers only."""
    if not isinstance(dtype, np.dtype) or dtype.kind not in _SCALAR_KINDS:
        raise RefusedPickleError(f"numpy scalar of dtype {dtype!r} is not allowed")
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise RefusedPickleError("malformed numpy scalar payload")
    return np.frombuffer(data, dtype=dtype)[0]


def _numpy_dtype(spec: Any, align: bool = False, copy: bool = False) -> np.dtype:
    dt = np.dtype(spec, align, copy) if isinstance(spec, str) else None
    if dt is None or dt.kind not in _SCALAR_KINDS:
        raise RefusedPickleError(f"numpy dtype {spec!r} is not allowed")
    return dt


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that builds only dicts, lists, tuples, sets, str, bytes and numbers.

    ``find_class`` refuses every global except numpy's scalar/dtype reconstruction, so a
    pickle holding a class instance or a call (``os.system``, ``eval``) raises
    :class:`RefusedPickleError` before anything is executed.
    """

    def find_class(self, module: str, name: str) -> Any:
        """Return one of the few allowed globals; refuse everything else."""
        if (module, name) == ("numpy", "dtype"):
            return _numpy_dtype
        if (module, name) in _SCALAR_GLOBALS:
            return _numpy_scalar
        raise RefusedPickleError(
            f"refused to load global {module}.{name}: only plain dicts, strings and numbers "
            "are allowed in a dictionary pickle"
        )


def safe_pickle_load(data: bytes) -> Any:
    """Unpickle ``data`` with :class:`RestrictedUnpickler`.

    Parameters
    ----------
    data
        The raw pickle bytes.

    Returns
    -------
    object
        The rebuilt object (containers of strings and numbers only).
    """
    return RestrictedUnpickler(io.BytesIO(data)).load()


def _plain(value: Any) -> Any:
    """Turn numpy scalars into Python ints/floats (keys and values of loaded dicts)."""
    return value.item() if isinstance(value, np.generic) else value


def load_dict(path: str | Path) -> dict[Any, Any]:
    """Load a key → value dictionary from a pickle, JSON, parquet or CSV/TSV file.

    Parameters
    ----------
    path
        ``.pkl``/``.pickle`` (loaded with :class:`RestrictedUnpickler`), ``.json`` (an object),
        ``.parquet`` (two columns: key, value; or columns named ``key`` and ``value``) or
        ``.csv``/``.tsv`` (two columns, optional header).

    Returns
    -------
    dict
        The mapping, with numpy scalars converted to Python ints/floats.

    Raises
    ------
    InputError
        The file is missing, unreadable, not a mapping, or a pickle holding anything but
        plain data.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"dictionary file {p} does not exist", fix="check the path or spec")
    suffix = "".join(p.suffixes[-2:]).lower() if p.suffix == ".gz" else p.suffix.lower()
    try:
        if suffix in (".pkl", ".pickle"):
            obj = safe_pickle_load(p.read_bytes())
        elif suffix == ".json":
            obj = json.loads(p.read_text())
        elif suffix == ".parquet":
            import pandas as pd

            df = pd.read_parquet(p)
            cols = ["key", "value"] if {"key", "value"} <= set(df.columns) else list(df.columns)
            if len(cols) != 2:
                raise InputError(
                    f"dictionary parquet {p} has columns {list(df.columns)}; need two (key, value)",
                    fix="write a parquet with columns 'key' and 'value'",
                )
            obj = dict(zip(df[cols[0]].tolist(), df[cols[1]].tolist(), strict=True))
        elif suffix in (".csv", ".tsv", ".csv.gz", ".tsv.gz", ".txt"):
            obj = _read_two_column_table(p)
        else:
            raise InputError(
                f"dictionary file {p} has an unknown extension {p.suffix!r}",
                fix="use .pkl, .json, .parquet, .csv or .tsv",
            )
    except RefusedPickleError as e:
        raise InputError(
            f"dictionary pickle {p} was refused: {e}",
            fix="dictionary pickles may hold only plain dicts of strings and numbers; "
            "re-export it as JSON or parquet (key, value) if it came from elsewhere",
        ) from e
    except (pickle.UnpicklingError, EOFError, ValueError, OSError, UnicodeDecodeError) as e:
        raise InputError(
            f"dictionary file {p} is corrupt or unreadable ({type(e).__name__}: {e})",
            fix="re-download the file or point the spec at an intact copy",
        ) from e
    if not isinstance(obj, dict):
        raise InputError(
            f"dictionary file {p} holds a {type(obj).__name__}, not a mapping",
            fix="provide a file that holds one key → value mapping",
        )
    return {_plain(k): _plain(v) for k, v in obj.items()}


def _read_two_column_table(p: Path) -> dict[Any, Any]:
    import pandas as pd

    sep = "\t" if ".tsv" in p.name.lower() else ","
    df = pd.read_csv(p, sep=sep, header=None, dtype=str)
    if df.shape[1] < 2:
        raise InputError(f"table {p} has {df.shape[1]} column(s); need two (key, value)")
    first = df.iloc[0, :2].tolist()
    if str(first[0]).lower() in ("key", "symbol", "gene", "gene_name", "ensembl_id", "id"):
        df = df.iloc[1:]
    return dict(zip(df.iloc[:, 0].tolist(), df.iloc[:, 1].tolist(), strict=True))


def _normalise_id(x: object) -> str:
    s = str(x).strip().upper()
    if s.startswith("ENS") and "." in s:
        s = s.split(".", 1)[0]  # drop the Ensembl version suffix
    return s


@dataclass(frozen=True)
class TokenPlan:
    """How an atlas's columns map to tokens (made once per atlas by ``RankValueTokenizer.plan``).

    Attributes
    ----------
    col_gene
        ``(n_vars,)`` int32: compact gene index of each atlas column, ``-1`` when dropped.
    gene_token
        ``(n_genes,)`` int32: token id of each compact gene.
    gene_median
        ``(n_genes,)`` float64: Geneformer median of each compact gene.
    has_duplicates
        Whether two atlas columns map to one Ensembl id (their values are summed).
    n_vars, n_known
        Atlas columns, and columns with a token and a median.
    unknown_examples
        Up to 10 atlas ids that were dropped.
    """

    col_gene: np.ndarray
    gene_token: np.ndarray
    gene_median: np.ndarray
    has_duplicates: bool
    n_vars: int
    n_known: int
    unknown_examples: tuple[str, ...]

    @property
    def coverage(self) -> float:
        """Share of atlas columns that are tokenised."""
        return self.n_known / self.n_vars if self.n_vars else 0.0


def default_search_dirs() -> list[Path]:
    """Folders searched for the ``V1``/``V2`` dictionaries, in order.

    ``$RAYPIPE_GENEFORMER_DIR``, then ``../shared/data/geneformer`` relative to the current
    directory and to the repository root.
    """
    dirs: list[Path] = []
    env = os.environ.get("RAYPIPE_GENEFORMER_DIR")
    if env:
        dirs.append(Path(env))
    with contextlib.suppress(FileNotFoundError):  # the working directory may be gone
        dirs.append(Path.cwd().parent / "shared" / "data" / "geneformer")
    dirs.append(Path(__file__).resolve().parents[2].parent / "shared" / "data" / "geneformer")
    return dirs


def _first(folder: Path, names: Sequence[str]) -> Path | None:
    for n in names:
        if (folder / n).is_file():
            return folder / n
    return None


@dataclass(frozen=True)
class GeneformerDictionaries:
    """The dictionaries a rank-value tokenizer needs.

    Attributes
    ----------
    token_dict
        Ensembl id (and special tokens such as ``<pad>``) → token id.
    median_dict
        Ensembl id → non-zero median expression over the pretraining corpus.
    gene_name_id
        Gene symbol → Ensembl id (may be empty).
    name
        ``"V1"``, ``"V2"`` or the path the dictionaries came from.
    sources
        Which file each dictionary was read from (for reports and errors).
    notes
        Anything a person should know (e.g. a fallback median file).
    """

    token_dict: dict[str, int]
    median_dict: dict[str, float]
    gene_name_id: dict[str, str] = field(default_factory=dict)
    name: str = "custom"
    sources: dict[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @property
    def pad_id(self) -> int:
        """Id of ``<pad>`` (0 in both Geneformer vocabularies)."""
        return int(self.token_dict.get("<pad>", 0))

    @property
    def cls_id(self) -> int | None:
        """Id of ``<cls>`` when the vocabulary has one (V2), else ``None``."""
        v = self.token_dict.get("<cls>")
        return None if v is None else int(v)

    @property
    def eos_id(self) -> int | None:
        """Id of ``<eos>`` when the vocabulary has one (V2), else ``None``."""
        v = self.token_dict.get("<eos>")
        return None if v is None else int(v)

    @classmethod
    def load(
        cls, spec: str | Path, *, search: Sequence[str | Path] | None = None
    ) -> GeneformerDictionaries:
        """Load the dictionaries named by ``spec``.

        Parameters
        ----------
        spec
            ``"V1"`` (Geneformer 30M vocabulary, as LangCell uses it), ``"V2"`` (95M, with
            ``<cls>``/``<eos>``), a folder holding the files, or one token-dictionary file
            (the median and name files are then looked up next to it).
        search
            Folders to look in for ``V1``/``V2`` (default: :func:`default_search_dirs`).

        Returns
        -------
        GeneformerDictionaries

        Raises
        ------
        InputError
            A required file is missing or corrupt (the message names it).
        """
        key = str(spec).upper()
        if key in _KNOWN:
            dirs = [Path(d) for d in search] if search is not None else default_search_dirs()
            names = _KNOWN[key]
            for d in dirs:
                if _first(d, names["token"]) is not None:
                    return cls._from_folder(d, names["token"], names["median"], key)
            raise InputError(
                f"Geneformer {key} dictionary ({names['token'][0]}) not found in "
                + ", ".join(str(d) for d in dirs),
                fix="set RAYPIPE_GENEFORMER_DIR to the folder holding Geneformer's "
                "token_dictionary*.pkl and gene_median_dictionary*.pkl, or pass a path",
            )
        p = Path(spec)
        if p.is_dir():
            token = _first(p, _KNOWN["V1"]["token"] + _KNOWN["V2"]["token"])
            if token is None:
                raise InputError(
                    f"no token dictionary (token_dictionary*.pkl) in folder {p}",
                    fix="put Geneformer's token dictionary there or pass V1/V2",
                )
            v2 = token.name in _KNOWN["V2"]["token"]
            names = _KNOWN["V2" if v2 else "V1"]
            return cls._from_folder(p, (token.name,), names["median"], str(p))
        if p.is_file():
            v2 = "95M" in p.name or "104M" in p.name
            medians = _KNOWN["V2" if v2 else "V1"]["median"]
            return cls._from_folder(p.parent, (p.name,), medians, str(p))
        raise InputError(
            f"dictionary spec {spec!r} is neither V1, V2, a folder nor a file",
            fix="use V1, V2 or the path of Geneformer's dictionary folder",
        )

    @classmethod
    def _from_folder(
        cls, folder: Path, token_names: Sequence[str], median_names: Sequence[str], name: str
    ) -> GeneformerDictionaries:
        notes: list[str] = []
        token_path = _first(folder, token_names)
        if token_path is None:
            raise InputError(f"token dictionary {folder / token_names[0]} does not exist")
        median_path = _first(folder, median_names)
        if median_path is None:
            fallback = _first(folder, _KNOWN["V1"]["median"])
            if fallback is None:
                raise InputError(
                    f"gene median dictionary {folder / median_names[0]} does not exist",
                    fix="put Geneformer's gene_median_dictionary*.pkl next to the token dictionary",
                )
            msg = (
                f"{folder / median_names[0]} is absent; using the V1 medians {fallback.name} "
                "(genes without a V1 median are dropped)"
            )
            log.warning(msg)
            notes.append(msg)
            median_path = fallback
        name_path = _first(folder, _NAME_ID)
        token_dict = {str(k): int(v) for k, v in load_dict(token_path).items()}
        median_dict = {str(k): float(v) for k, v in load_dict(median_path).items()}
        gene_name_id = (
            {str(k): str(v) for k, v in load_dict(name_path).items()} if name_path else {}
        )
        sources = {"token": str(token_path), "median": str(median_path)}
        if name_path:
            sources["gene_name_id"] = str(name_path)
        return cls(token_dict, median_dict, gene_name_id, name, sources, tuple(notes))

    def plan_columns(self, var_ensembl_ids: Sequence[object]) -> TokenPlan:
        """Map atlas columns to compact genes with a token and a median.

        Parameters
        ----------
        var_ensembl_ids
            Ensembl id of each atlas column (``None``/empty when unmapped); version suffixes
            and case are ignored. Columns sharing an id map to one gene (values summed).

        Returns
        -------
        TokenPlan
        """
        tok, med = self.token_dict, self.median_dict
        ids = [
            _normalise_id(x) if x is not None and str(x) not in ("", "nan") else ""
            for x in var_ensembl_ids
        ]
        gene_of: dict[str, int] = {}
        col_gene = np.full(len(ids), -1, dtype=np.int32)
        tokens: list[int] = []
        medians: list[float] = []
        unknown: list[str] = []
        dup = False
        for j, e in enumerate(ids):
            if e in tok and e in med and not e.startswith("<"):
                g = gene_of.get(e)
                if g is None:
                    g = gene_of[e] = len(tokens)
                    tokens.append(tok[e])
                    medians.append(med[e])
                else:
                    dup = True
                col_gene[j] = g
            elif len(unknown) < 10:
                unknown.append(str(var_ensembl_ids[j]))
        return TokenPlan(
            col_gene=col_gene,
            gene_token=np.asarray(tokens, dtype=np.int32),
            gene_median=np.asarray(medians, dtype=np.float64),
            has_duplicates=dup,
            n_vars=len(ids),
            n_known=int((col_gene >= 0).sum()),
            unknown_examples=tuple(unknown),
        )


def resolve_ensembl_ids(
    var_names: Sequence[object],
    ensembl_column: Sequence[object] | None = None,
    gene_name_id: dict[str, str] | None = None,
) -> tuple[list[str | None], str]:
    """Give every atlas gene an Ensembl id.

    Parameters
    ----------
    var_names
        The atlas's gene names (symbols or Ensembl ids).
    ensembl_column
        ``var['ensembl_id']`` when the atlas has it (used as is).
    gene_name_id
        Symbol → Ensembl mapping (e.g. ``GeneformerDictionaries.gene_name_id``); symbols are
        matched as given, then upper-cased.

    Returns
    -------
    ids, how
        One id (or ``None``) per gene, and ``"var['ensembl_id']"``, ``"var_names"`` or
        ``"gene_name_id"``.
    """
    if ensembl_column is not None:
        ids = [
            None if v is None or str(v) in ("", "nan", "None") else str(v) for v in ensembl_column
        ]
        return ids, "var['ensembl_id']"
    names = [str(v) for v in var_names]
    if names and sum(n.upper().startswith("ENS") for n in names) > 0.5 * len(names):
        return list(names), "var_names"
    table = gene_name_id or {}
    upper = {k.upper(): v for k, v in table.items()}
    return [table.get(n) or upper.get(n.upper()) for n in names], "gene_name_id"
