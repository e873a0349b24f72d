"""The README documents every config key, and its test command is what CI runs."""

from __future__ import annotations

from pathlib import Path

from raypipe.config import reference

ROOT = Path(__file__).resolve().parents[1]


def test_readme_lists_every_config_key():
    readme = (ROOT / "README.md").read_text()
    missing = [key for key, _, _ in reference() if f"`{key}`" not in readme]
    assert not missing, f"README config reference lacks {missing}"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = next(line for line in ci.splitlines() if "pytest" in line)
    assert command.strip() in readme
