"""``raypipe markers fetch``: download a curated marker resource into the user cache.

``raypipe.cli`` adds it with ``add_markers_parser(subparsers)``; the handler is stored as
``args.func`` and returns the exit code.
"""

from __future__ import annotations

import argparse

__all__ = ["add_markers_parser", "run_markers_command"]


def add_markers_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``markers`` command (``fetch``) to a CLI's subparsers."""
    p = subparsers.add_parser("markers", help="curated marker resources (PanglaoDB)")
    sub = p.add_subparsers(dest="markers_cmd", required=True)
    f = sub.add_parser(
        "fetch", help="download a marker resource into the user cache ($RAYPIPE_CACHE_DIR)"
    )
    f.add_argument("--source", default="panglaodb", help="registry name (default panglaodb)")
    f.add_argument("--url", default=None, help="download from this URL (a mirror) instead")
    f.add_argument("--dest", default=None, help="target file (default: the user cache)")
    p.set_defaults(func=run_markers_command)
    return p


def run_markers_command(args: argparse.Namespace) -> int:
    """Run ``markers fetch``; return the exit code."""
    from raypipe.annotate.marker_db import MARKER_DBS, fetch_markers, read_marker_file

    res = MARKER_DBS.get(args.source)
    path = fetch_markers(args.source, url=args.url, dest=args.dest)
    rows = read_marker_file(path, args.source)
    print(
        f"{res.name}: {len(rows):,} rows, {rows['cell_type'].nunique()} cell types, "
        f"{rows['organ'].nunique()} organs in {path}\n"
        f"  licence: {res.licence}\n  cite: {res.citation}\n"
        "  use it with annotate.marker_db.enabled: true"
    )
    return 0
