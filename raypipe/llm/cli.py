"""``raypipe cache stats|prune``: inspect and shrink the LLM result cache.

``raypipe.cli`` adds it with ``add_cache_parser(subparsers)``; the handler is stored as
``args.func`` and returns the exit code.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

__all__ = ["add_cache_parser", "run_cache_command"]


def add_cache_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``cache`` command (``stats``, ``prune``) to a CLI's subparsers."""
    p = subparsers.add_parser("cache", help="inspect or prune the LLM result cache")
    sub = p.add_subparsers(dest="cache_cmd", required=True)
    s = sub.add_parser("stats", help="entries, bytes and tokens by model and kind")
    s.add_argument("path", help="cache folder (default of a job: <output_dir>/cache)")
    s.add_argument("--json", action="store_true", help="print JSON")
    r = sub.add_parser("prune", help="remove entries and compact the segments into one file")
    r.add_argument("path", help="cache folder")
    r.add_argument("--model", help="remove entries of this model")
    r.add_argument("--kind", choices=["embed", "chat"], help="remove entries of this kind")
    r.add_argument("--older-than-days", type=float, help="remove entries older than this")
    r.add_argument("--all", action="store_true", help="remove every entry")
    p.set_defaults(func=run_cache_command)
    return p


def run_cache_command(args: argparse.Namespace) -> int:
    """Run ``cache stats`` / ``cache prune``; return the exit code."""
    from raypipe.errors import InputError
    from raypipe.llm.cache import prune, stats

    path = Path(args.path)
    if not path.is_dir():
        raise InputError(
            f"cache folder {path} does not exist", fix="pass a job's <output_dir>/cache"
        )
    if args.cache_cmd == "stats":
        st = stats(path)
        if args.json:
            print(json.dumps(st, indent=2))
        else:
            print(
                f"{st['path']}: {st['entries']} entries in {st['files']} files, "
                f"{st['bytes'] / 1e6:.1f} MB, {st['tokens_in']} tokens in, "
                f"{st['tokens_out']} out"
            )
            for row in st["by_model_kind"]:
                print(f"  {row['model']} {row['kind']}: {row['entries']}")
        return 0
    conds = (args.model, args.kind, args.older_than_days)
    if args.all and any(c is not None for c in conds):
        raise InputError("cache prune: --all cannot be combined with filters", fix="drop --all")
    out = prune(
        path,
        model=args.model,
        kind=args.kind,
        older_than_days=args.older_than_days,
        everything=args.all,
    )
    print(
        f"removed {out['removed']} of {out['rows_in']} entries; {out['files_in']} files "
        f"compacted into {1 if out['rows_out'] else 0}"
    )
    return 0
