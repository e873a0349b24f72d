"""The README documents every config key, and its test command is what CI runs."""

from __future__ import annotations

from pathlib import Path

from raypipe.config import reference, reference_markdown

ROOT = Path(__file__).resolve().parents[1]


def test_readme_lists_every_config_key():
    readme = (ROOT / "README.md").read_text()
    missing = [key for key, _, _ in reference() if f"`{key}`" not in readme]
    assert not missing, f"README config reference lacks {missing}"


def test_readme_config_table_is_current():
    """The table is `raypipe config reference` verbatim: defaults and meanings never go stale."""
    readme = (ROOT / "README.md").read_text()
    stale = [row for row in reference_markdown().splitlines() if row not in readme]
    assert not stale, "regenerate the table with `raypipe config reference`:\n" + "\n".join(stale)


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = next(line for line in ci.splitlines() if "pytest" in line)
    assert command.strip() in readme
