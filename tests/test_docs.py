"""The docs cannot drift from the code.

The generated reference pages equal what the code generates now; the site builds with
``mkdocs build --strict``; every ``python`` block of the README and the docs runs; every
``raypipe`` command line parses with the real CLI parser and every ``--set`` / YAML config
validates; every error message quoted on the troubleshooting page exists in the code; the
README stays short and its test command is what CI runs.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import itertools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from raypipe.cli import build_parser
from raypipe.config import JobConfig, load_config, reference
from raypipe.config.reference import type_name
from raypipe.docs_gen import COMMAND, cli_page, generated_pages

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
BASE = {"input": {"path": "atlas.zarr"}, "output_dir": "runs/x"}
NOT_RUN = "<!-- not run -->"
FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
    re.M | re.S,
)


def _nav_pages() -> list[Path]:
    """The pages of ``mkdocs.yml``'s nav, in nav order."""

    def walk(node: Any) -> list[str]:
        if isinstance(node, str):
            return [node]
        if isinstance(node, list):
            return [p for item in node for p in walk(item)]
        if isinstance(node, dict):
            return [p for v in node.values() for p in walk(v)]
        return []

    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    return [DOCS / p for p in walk(nav)]


def _documents() -> list[Path]:
    """The README, then every docs page in nav order, then pages outside the nav."""
    pages = _nav_pages()
    rest = sorted(p for p in DOCS.rglob("*.md") if p not in pages)
    return [ROOT / "README.md", *pages, *rest]


def _blocks(path: Path, *langs: str) -> list[tuple[str, int, bool]]:
    """``(code, line, runs)`` of the fenced blocks of ``path`` in one of ``langs``."""
    text = path.read_text()
    out = []
    for m in FENCE.finditer(text):
        if m.group("lang") not in langs:
            continue
        indent = len(m.group("indent"))
        code = "\n".join(line[indent:] for line in m.group("body").splitlines()) + "\n"
        before = text[: m.start()].rstrip().splitlines()
        runs = not (before and before[-1].strip() == NOT_RUN)
        out.append((code, text.count("\n", 0, m.start()) + 1, runs))
    return out


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# ------------------------------------------------------------------ generated pages


def test_generated_pages_are_current():
    stale = []
    for rel, text in generated_pages().items():
        path = DOCS / rel
        old = path.read_text() if path.is_file() else ""
        if old != text:
            diff = difflib.unified_diff(
                old.splitlines(), text.splitlines(), f"docs/{rel} (committed)", "(from the code)"
            )
            stale.append("\n".join(list(diff)[:40]))
    assert not stale, f"regenerate the docs with `{COMMAND}`:\n" + "\n\n".join(stale)


def test_configuration_page_has_every_key_with_type_default_and_description():
    page = (DOCS / "reference" / "configuration.md").read_text()
    rows = reference()
    assert len(rows) > 50
    assert {r.key for r in rows} >= {"input.path", "embed.ce.model", "annotate.smoothing"}
    missing = [r.key for r in rows if f"| `{r.key}` |" not in page]
    assert not missing, f"the configuration page lacks {missing}; run `{COMMAND}`"
    undescribed = [r.key for r in rows if not r.description.strip()]
    assert not undescribed, f"give these config fields a Field(description=...): {undescribed}"
    row = next(r for r in rows if r.key == "input.x_kind")
    assert (row.type, row.default) == ('"auto" | "counts" | "lognorm"', '"auto"')
    row = next(r for r in rows if r.key == "annotate.scorers")
    assert row.default == '{"text": 0.25, "markers": 1.0}'
    assert "<code>str &#124; null</code>" in page  # unions stay in one table cell
    row = next(r for r in rows if r.key == "genes.min_coverage")
    assert row.type == "float (≥ 0.0, ≤ 1.0)"


def test_type_names_read_as_yaml_types():
    from typing import Literal

    from raypipe.config import Price

    assert type_name(int | None) == "int | null"
    assert type_name(list[Literal["a", "b"]]) == 'list["a" | "b"]'
    assert type_name(dict[str, Price]) == "dict[str, {input: float, output: float}]"


def test_cli_page_documents_every_command_and_option():
    page = cli_page()

    def walk(parser: Any, prog: str) -> None:
        assert f"`{prog}`" in page, f"{prog} missing from the CLI page"
        for action in parser._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert flag in page, f"{prog} {flag} missing from the CLI page"
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{prog} {name}")

    walk(build_parser(), "raypipe")
    assert "raypipe cache stats path [--json]" in page


def test_docs_gen_check_flags_a_stale_page(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    from raypipe.docs_gen import main

    assert main(["--docs", str(tmp_path), "--check"]) == 1
    assert COMMAND in capsys.readouterr().err
    assert main(["--docs", str(tmp_path)]) == 0
    assert main(["--docs", str(tmp_path), "--check"]) == 0
    assert (tmp_path / "reference" / "cli.md").read_text() == cli_page()


# ------------------------------------------------------------------ README and CI


def test_readme_fits_on_a_few_screens():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines (at most 250): move it to docs/"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = next(line for line in ci.splitlines() if "pytest" in line)
    assert command.strip() in readme


def test_ci_runs_the_slow_tests_after_the_readme_command():
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    runs = [i for i, line in enumerate(lines) if "pytest" in line and not line.startswith("#")]
    assert len(runs) == 2, ".ci/run: the README's test command, then the slow marker"
    assert '-m "slow and not gpu"' in lines[runs[1]]


def test_ci_builds_the_docs_strictly_after_the_tests():
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    tests = next(i for i, line in enumerate(lines) if "pytest" in line)
    docs = [i for i, line in enumerate(lines) if "mkdocs build --strict" in line]
    assert docs, ".ci/run must build the docs with mkdocs build --strict"
    assert docs[0] > tests, ".ci/run builds the docs after the tests"


# ------------------------------------------------------------------ the site


@pytest.mark.integration
def test_mkdocs_build_strict(tmp_path: Path):
    out = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-d", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "WARNING" not in out.stderr, out.stderr[-3000:]
    api = (tmp_path / "reference" / "python-api" / "index.html").read_text()
    assert 'id="raypipe.api.embed"' in api
    assert 'id="raypipe.api.Run.export"' in api
    python = (tmp_path / "python" / "index.html").read_text()
    assert "pbmc68k_reduced" in python  # the README's quick start, included by the snippet


def test_every_doc_page_is_in_the_nav():
    pages = set(_nav_pages())
    missing = sorted(_rel(p) for p in pages if not p.is_file())
    assert not missing, f"mkdocs.yml's nav names missing pages: {missing}"
    orphans = sorted(_rel(p) for p in DOCS.rglob("*.md") if p not in pages)
    assert not orphans, f"add these pages to mkdocs.yml's nav: {orphans}"


def test_readme_links_exist():
    text = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(((?!https?://)[^)#]+)(?:#[^)]*)?\)", text)
    assert links
    missing = sorted({link for link in links if not (ROOT / link).exists()})
    assert not missing, f"README.md links to missing files: {missing}"


# ------------------------------------------------------------------ commands and configs


OPERATORS = {"&&", "||", ";", "{", "}", "|", "&", "(", ")"}


def _commands(path: Path) -> list[tuple[int, list[str]]]:
    """``(line, argv)`` of every shell command in the bash blocks of ``path``."""
    out = []
    for code, line, _runs in _blocks(path, "bash", "sh", "shell", "console"):
        for i, text in enumerate(re.sub(r"\\\n", "  ", code).splitlines()):
            lex = shlex.shlex(text.removeprefix("$ "), posix=True, punctuation_chars=True)
            lex.whitespace_split = True
            argv: list[str] = []
            for token in [*lex, ";"]:
                if token in OPERATORS:
                    if argv:
                        out.append((line + i + 1, argv))
                    argv = []
                else:
                    argv.append(token)
    return out


def test_raypipe_command_lines_in_the_docs_parse():
    parser = build_parser()
    checked, bad = 0, []
    for path in [*_documents(), ROOT / "infra" / "README.md"]:
        for line, argv in _commands(path):
            if Path(argv[0]).name != "raypipe":
                continue
            checked += 1
            try:
                parser.parse_args(argv[1:])
            except SystemExit as exc:
                if exc.code:
                    bad.append(f"{_rel(path)}:{line}: {shlex.join(argv)}")
    assert checked > 20
    assert not bad, "these raypipe command lines do not parse:\n" + "\n".join(bad)


def test_set_overrides_in_the_docs_name_real_keys():
    checked, bad = 0, []
    for path in [*_documents(), ROOT / "infra" / "README.md"]:
        for line, argv in _commands(path):
            for flag, value in itertools.pairwise(argv):
                if flag != "--set":
                    continue
                checked += 1
                try:
                    load_config(BASE, [value])
                except Exception as exc:
                    bad.append(f"{_rel(path)}:{line}: --set {value}: {exc}")
    assert checked > 10
    assert not bad, "\n".join(bad)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def test_yaml_configs_in_the_docs_validate():
    sections = set(JobConfig.model_fields)
    checked, bad = 0, []
    for path in _documents():
        for code, line, _runs in _blocks(path, "yaml", "yml"):
            data = yaml.safe_load(code)
            if not isinstance(data, dict) or not sections & set(data):
                continue
            checked += 1
            try:
                load_config(_merge(BASE, data))
            except Exception as exc:
                bad.append(f"{_rel(path)}:{line}: {exc}")
    assert checked >= 5
    assert not bad, "\n".join(bad)


# ------------------------------------------------------------------ troubleshooting


def _code_strings() -> list[str]:
    """Every string literal of the package; an f-string's fields become a NUL separator."""
    out = []
    for path in (ROOT / "raypipe").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                out.append(node.value)
            elif isinstance(node, ast.JoinedStr):
                out.append(
                    "".join(v.value if isinstance(v, ast.Constant) else "\0" for v in node.values)
                )
    return out


def test_troubleshooting_messages_exist_in_the_code():
    code = "\n".join(_code_strings())
    checked, missing = 0, []
    for block, line, _runs in _blocks(DOCS / "troubleshooting.md", "text"):
        for text in block.splitlines():
            text = text.strip().removeprefix("error: ").removeprefix("fix: ")
            for part in re.split(r"<[^>]*>", text):  # <…> stands for what varies
                part = part.strip(" .,;:()'\"")
                if len(part) < 12:
                    continue
                checked += 1
                if part not in code:
                    missing.append(f"docs/troubleshooting.md:{line}: {part!r}")
    assert checked > 30
    assert not missing, "messages no longer in the code:\n" + "\n".join(missing)


# ------------------------------------------------------------------ python examples


def _examples() -> list[tuple[str, int, str]]:
    """``(file, line, code)`` of every python block that runs: README first, then nav order."""
    out = []
    for path in _documents():
        for code, line, runs in _blocks(path, "python", "py"):
            if runs:
                out.append((_rel(path), line, code))
    return out


def test_blocks_are_found_indented_and_marked(tmp_path: Path):
    page = tmp_path / "page.md"
    page.write_text(
        "text\n\n```python\nprint(1)\n```\n\n<!-- not run -->\n```python\nboom()\n```\n\n"
        "1. a step:\n\n   ```yaml\n   shards: {rows: 8}\n   ```\n"
    )
    assert _blocks(page, "python") == [("print(1)\n", 3, True), ("boom()\n", 8, False)]
    assert _blocks(page, "yaml") == [("shards: {rows: 8}\n", 14, True)]


def test_examples_start_with_the_readme_quick_start():
    examples = _examples()
    files = [f for f, _, _ in examples]
    assert files[0] == "README.md"
    assert "raypipe.embed(" in examples[0][2]
    assert "docs/python.md" in files  # continues the quick start's run folder


@pytest.mark.slow
@pytest.mark.integration
def test_python_examples_run_as_written(tmp_path: Path):
    """Every runnable python block of the README and docs, in one process, in order.

    One interpreter for all of them: imports, Ray's start-up and the text model's load are
    paid once (the docs' continuation of the quick start added 32 s to its 338 s here, on a
    2-core machine at load average 24). ``slow``: a whole annotated + evaluated run.
    """
    from raypipe.errors import InputError
    from raypipe.genes.orgdb import locate_orgdb

    try:
        orgdb = locate_orgdb(None)
    except InputError as exc:
        pytest.skip(f"the examples use org.Hs.eg.db gene text: {exc.message}")
    script = []
    for file, line, code in _examples():
        script += [f"print('>>> {file}:{line}', flush=True)", code]
    (tmp_path / "examples.py").write_text("\n".join(script))
    found = orgdb.main if orgdb.kind == "tsv" else orgdb.main.parent
    out = subprocess.run(
        [sys.executable, "examples.py"],
        cwd=tmp_path,  # the examples write runs/ here
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYTHONPATH": str(ROOT), "RAYPIPE_ORGDB": str(found)},
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    assert "(700, 384)" in out.stdout
    assert "ari_kmeans" in out.stdout
    import anndata as ad
    import numpy as np

    back = ad.read_h5ad(tmp_path / "runs" / "notebook.h5ad")
    assert back.n_obs == 700
    assert back.obsm["X_genept_w"].dtype == np.float32
    assert "raypipe_genept_w_label" in back.obs
    assert "config_hash" in back.uns["raypipe"]
