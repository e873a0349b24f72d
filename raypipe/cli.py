"""The ``raypipe`` command line (argparse: ``--help`` imports nothing heavy)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from raypipe import __version__
from raypipe.annotate.markers_cli import add_markers_parser
from raypipe.errors import RaypipeError
from raypipe.llm.cli import add_cache_parser

__all__ = ["build_parser", "main"]


def _cmd_ingest(args: argparse.Namespace) -> int:
    from raypipe.atlas.ingest import ingest

    res = ingest(
        args.input,
        args.out,
        rows_per_chunk=args.rows_per_chunk,
        x_kind=args.x_kind,
        layer=args.layer,
        overwrite=args.overwrite,
    )
    a = res.atlas
    print(
        f"wrote {a.path}: {a.n_obs:,} cells × {a.n_vars:,} genes, X = {a.x_kind}"
        f" (detected {a.x_kind_detected}), {len(a.chunk_hashes)} row chunks of {a.rows_per_chunk}"
        f", {res.seconds:.1f} s"
    )
    if res.zero_count_cells:
        print(f"note: {res.zero_count_cells} cells have zero counts (flagged `empty` in outputs)")
    if res.duplicate_genes:
        print(
            f"note: {len(res.duplicate_genes)} duplicate gene names (summed when mapped), e.g. {res.duplicate_genes[:5]}"
        )
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from raypipe.config import load_config
    from raypipe.orchestrate.runner import run_job

    job = load_config(args.config, args.set)
    if args.dry_run:
        from raypipe.orchestrate.dryrun import dry_run

        print(dry_run(job))
        return 0
    summary = run_job(
        job,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        force=args.force,
        refit=args.refit,
    )
    print(summary.render())
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from raypipe.api import open_run

    run = open_run(args.run)
    if args.soma:
        rep = run.export_soma(
            args.soma, methods=args.methods, measurement=args.measurement, overwrite=args.overwrite
        )
        print(
            f"wrote into {rep.uri} ({rep.measurement}): {rep.n_cells:,} cells; obsm "
            + (", ".join(rep.obsm) or "(none)")
            + (f"; obs {', '.join(rep.obs_columns)}" if rep.obs_columns else "")
            + (f" (replaced {', '.join(rep.replaced)})" if rep.replaced else "")
        )
        return 0
    out = run.export(args.out, methods=args.methods, overwrite=args.overwrite)
    methods = args.methods or run.methods
    annotated = [m for m in methods if m in run.annotation_methods]
    print(
        f"wrote {out}: {run.n_obs:,} cells; obsm "
        + ", ".join(f"X_{m}" for m in methods)
        + (
            f"; obs raypipe_<method>_label/score/margin for {', '.join(annotated)}"
            if annotated
            else ""
        )
        + "; uns['raypipe']"
    )
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from raypipe.evaluate.report import rerender_report

    index = rerender_report(args.run)
    print(index)
    if args.open:
        import webbrowser

        webbrowser.open(index.resolve().as_uri() if isinstance(index, Path) else str(index))
    return 0


def _cmd_tokenize(args: argparse.Namespace) -> int:
    from raypipe.embed.tokenizer import write_tokens

    res = write_tokens(
        args.input,
        args.out,
        dictionary=args.dictionary,
        variant=args.variant,
        gene_name_id=args.gene_name_id,
        x_kind=args.x_kind,
        min_coverage=args.min_coverage,
    )
    coverage: Any = res["coverage"]
    print(
        f"wrote {res['out']}: {res['n_cells']:,} cells ({res['n_empty']} without known genes), "
        f"gene coverage {float(coverage):.1%}, input {res['x_kind']}, Ensembl ids from {res['id_source']}"
    )
    return 0


def _cmd_fetch_orgdb(args: argparse.Namespace) -> int:

    from raypipe.genes.orgdb import fetch_orgdb

    dest = fetch_orgdb(Path(args.dest).expanduser()) if args.dest else fetch_orgdb()
    print(f"org.Hs.eg.sqlite and GO.sqlite are in {dest}")
    return 0


def _cmd_ce_init_random(args: argparse.Namespace) -> int:
    from raypipe.embed.ce_model import build_random_encoder

    out = build_random_encoder(
        args.config, args.out, args.seed, layout=args.layout, num_hidden_layers=args.layers
    )
    print(
        f"wrote a RANDOMLY INITIALISED cell encoder to {out} (for smoke tests only: no pretrained weights)"
    )
    return 0


def _cmd_ce_score(args: argparse.Namespace) -> int:
    from raypipe.embed.langcell_score import score_tokens_file

    res = score_tokens_file(
        args.tokens,
        args.model,
        args.texts,
        args.out,
        alpha=args.alpha,
        text_max_length=args.text_max_length,
        max_tokens_per_batch=args.max_tokens_per_batch,
        dtype=args.dtype,
        device=args.device,
        progress=not args.no_progress,
    )
    counts = ", ".join(f"{k} {v:,}" for k, v in res["label_counts"].items())
    print(
        f"wrote {res['out']}: {res['n_cells']:,} cells ({res['n_empty']} without tokens) × "
        f"{len(res['candidates'])} candidates on {res['device']}; labels: {counts}"
    )
    return 0


def _cmd_config_reference(args: argparse.Namespace) -> int:
    from raypipe.config import reference_markdown

    print(reference_markdown())
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser (cheap: no heavy imports)."""
    p = argparse.ArgumentParser(
        prog="raypipe",
        description="Distributed batch processor on Ray for single-cell RNA atlases: "
        "GenePT / CE cell embeddings, zero-shot annotation, evaluation tables.",
    )
    p.add_argument("--version", action="version", version=f"raypipe {__version__}")
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show everything: raypipe's INFO log and every third-party warning and log line "
        "(by default only progress bars, results and raypipe's own warnings are shown)",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ing = sub.add_parser(
        "ingest", help="write an .h5ad / AnnData .zarr / 10x folder as a row-chunked Zarr atlas"
    )
    ing.add_argument(
        "input", help=".h5ad, AnnData .zarr, 10x matrix.mtx(.gz) folder, or builtin:pbmc68k_reduced"
    )
    ing.add_argument("--out", required=True, help="destination ATLAS.zarr")
    ing.add_argument(
        "--rows-per-chunk", type=int, default=1024, help="rows per Zarr chunk (default 1024)"
    )
    ing.add_argument(
        "--x-kind", choices=["auto", "counts", "lognorm"], default="auto", help="override detection"
    )
    ing.add_argument("--layer", default=None, help="read X from `raw` or a named layer")
    ing.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    ing.set_defaults(func=_cmd_ingest)

    run = sub.add_parser("run", help="run the stages a YAML config names")
    run.add_argument("config", help="job config (YAML), e.g. configs/demo.yaml")
    run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (repeatable)",
    )
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="start fresh: delete the previous run in output_dir (only what raypipe wrote; the LLM cache is kept)",
    )
    run.add_argument(
        "--dry-run", action="store_true", help="print the plan and cost estimate; call nothing"
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument(
        "--force",
        action="store_true",
        help="use a suspicious label column (numeric, or nearly one class per cell) anyway; "
        "with --overwrite, also delete files raypipe did not write inside its own folders",
    )
    run.add_argument(
        "--refit",
        action="store_true",
        help="fit the statistics recorded from the atlas (HVG genes, centring means) again: a "
        "new embedding-space version, every shard recomputed (default: reuse them, so a grown "
        "atlas computes only its new shards)",
    )
    run.set_defaults(func=_cmd_run)

    exp = sub.add_parser(
        "export",
        help="write a finished run's results (with the atlas) as .h5ad or AnnData .zarr, or "
        "into a TileDB-SOMA experiment",
    )
    exp.add_argument("run", metavar="RUN", help="the run's output_dir")
    where = exp.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", help="destination .h5ad or .zarr (a path or a bucket URL)")
    where.add_argument(
        "--soma",
        metavar="URI",
        help="a TileDB-SOMA experiment holding the run's cells: embeddings into "
        "obsm['X_<method>'], calls into obs raypipe_<method>_label/cl_id/score (docs/soma.md)",
    )
    exp.add_argument(
        "--measurement",
        default=None,
        help="with --soma: the measurement (default: the run's, or RNA)",
    )
    exp.add_argument(
        "--methods",
        nargs="+",
        default=None,
        metavar="METHOD",
        help="embedding methods to include (default: all the run computed)",
    )
    exp.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out (with --soma: existing X_<method> arrays and obs columns)",
    )
    exp.set_defaults(func=_cmd_export)

    rep = sub.add_parser("report", help="re-render a run's HTML report and print its path")
    rep.add_argument("run", metavar="RUN", help="the run's output_dir")
    rep.add_argument("--open", action="store_true", help="open it in a web browser")
    rep.set_defaults(func=_cmd_report)

    tok = sub.add_parser("tokenize", help="Geneformer rank-value tokens of every cell → parquet")
    tok.add_argument(
        "input", help=".h5ad or AnnData .zarr with raw counts or log-normalised values"
    )
    tok.add_argument("--out", required=True, help="tokens.parquet (obs_name, input_ids, length)")
    tok.add_argument("--dictionary", default="V1", help="V1, V2 or a folder with the dictionaries")
    tok.add_argument(
        "--variant", choices=["geneformer_v1", "geneformer_v2", "langcell"], default="geneformer_v1"
    )
    tok.add_argument(
        "--gene-name-id", default=None, help="symbol→Ensembl table (default: the dictionary's)"
    )
    tok.add_argument("--x-kind", choices=["auto", "counts", "lognorm"], default="auto")
    tok.add_argument(
        "--min-coverage", type=float, default=0.5, help="fail below this share of known genes"
    )
    tok.set_defaults(func=_cmd_tokenize)

    genes = sub.add_parser("genes", help="gene text helpers")
    gsub = genes.add_subparsers(dest="genes_command", required=True, metavar="COMMAND")
    fetch = gsub.add_parser(
        "fetch-orgdb", help="fetch Bioconductor org.Hs.eg.db + GO.db sqlite files via apt"
    )
    fetch.add_argument("--dest", default=None, help="folder (default ~/.cache/raypipe/orgdb)")
    fetch.set_defaults(func=_cmd_fetch_orgdb)

    ce = sub.add_parser("ce", help="cell-encoder helpers")
    csub = ce.add_subparsers(dest="ce_command", required=True, metavar="COMMAND")
    rnd = csub.add_parser(
        "init-random", help="save a randomly initialised encoder built from a real config"
    )
    rnd.add_argument(
        "--config",
        required=True,
        help="a Geneformer config.json (e.g. config_Geneformer-V1-10M.json)",
    )
    rnd.add_argument("--out", required=True, help="folder to write")
    rnd.add_argument("--layout", choices=["geneformer", "langcell"], default="langcell")
    rnd.add_argument(
        "--layers", type=int, default=None, help="override num_hidden_layers (smaller = faster)"
    )
    rnd.add_argument("--seed", type=int, default=0)
    rnd.set_defaults(func=_cmd_ce_init_random)
    sc = csub.add_parser(
        "score", help="LangCell zero-shot scores of tokenised cells against candidate texts"
    )
    sc.add_argument(
        "tokens", help="tokens parquet (raypipe tokenize) or any obs_name + input_ids parquet"
    )
    sc.add_argument("--model", required=True, help="LangCell checkpoint folder (LangCell layout)")
    sc.add_argument("--texts", required=True, help="JSON object: candidate name → text")
    sc.add_argument("--out", required=True, help="output parquet")
    sc.add_argument(
        "--alpha", type=float, default=0.1, help="score = alpha·sim + (1-alpha)·ctm (0.1)"
    )
    sc.add_argument("--text-max-length", type=int, default=512, help="text tokens kept (512)")
    sc.add_argument("--max-tokens-per-batch", type=int, default=65_536)
    sc.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    sc.add_argument("--device", default=None, help="torch device (default: cuda if present)")
    sc.add_argument("--no-progress", action="store_true", help="no progress bar")
    sc.set_defaults(func=_cmd_ce_score)

    conf = sub.add_parser("config", help="the job config's keys")
    confsub = conf.add_subparsers(dest="config_command", required=True, metavar="COMMAND")
    ref = confsub.add_parser(
        "reference", help="print every config key with its type, default and meaning (markdown)"
    )
    ref.set_defaults(func=_cmd_config_reference)

    add_cache_parser(sub)
    add_markers_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``raypipe`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    # raypipe's level is also the switch its filters of expected third-party noise read
    # (they filter only while raypipe logs below INFO): `-v` shows everything
    logging.getLogger("raypipe").setLevel(level)
    try:
        try:
            return int(args.func(args) or 0)
        except RaypipeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted: finished shards are kept; re-run to resume", file=sys.stderr)
            return 130
        finally:
            _end_ray()
    except KeyboardInterrupt:  # a Ctrl-C while the error above was being printed
        _end_ray()
        return 130


def _end_ray() -> None:
    """Shut this process's Ray down now, with Ctrl-C ignored from here to the exit.

    Otherwise Ray's own ``atexit`` shutdown runs during interpreter teardown, where a Ctrl-C
    prints an "Exception ignored in atexit callback" traceback and can crash the process
    (SIGSEGV in Ray's C++ teardown); after this, that handler has nothing left to do.
    """
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ray = sys.modules.get("ray")  # never imported here: only when the command used it
    if ray is not None and ray.is_initialized():
        ray.shutdown()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
