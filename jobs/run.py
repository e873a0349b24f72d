"""Entry point for `ray job submit -- python jobs/run.py --config configs/x.yaml`.

Runs locally too. Thin on purpose: parse the arguments, run the job, print the summary.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # working_dir upload without install

from raypipe.cli import main


def _args(argv: list[str] | None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", required=True, help="job config YAML")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--dry-run", action="store_true")
    a = p.parse_args(argv)
    out = ["run", a.config, "--no-progress"]
    for s in a.set:
        out += ["--set", s]
    out += ["--overwrite"] * a.overwrite + ["--dry-run"] * a.dry_run
    return out


if __name__ == "__main__":
    sys.exit(main(_args(None)))
