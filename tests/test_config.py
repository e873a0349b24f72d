"""Config: unknown keys, --set overrides, validation errors, and lazy imports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from raypipe.config import apply_overrides, config_hash, load_config
from raypipe.errors import ConfigError

BASE = {"input": {"path": "atlas.zarr"}, "output_dir": "out"}


def _cfg(**extra):
    return {**json.loads(json.dumps(BASE)), **extra}


def test_defaults_load():
    job = load_config(_cfg())
    assert job.shards.rows == 4096
    assert job.embed.methods == ["genept_w"]
    assert job.ray.address == "local"
    assert job.input.label_key is None


def test_unknown_top_level_key_names_key_and_valid_ones():
    with pytest.raises(ConfigError) as err:
        load_config(_cfg(shardz={"rows": 10}))
    msg = str(err.value)
    assert "'shardz'" in msg
    for valid in ("shards", "genes", "embed", "output_dir", "input", "ray"):
        assert valid in msg


def test_unknown_nested_key_names_section_keys():
    with pytest.raises(ConfigError) as err:
        load_config(_cfg(), ["embed.genept_w.hvgs=100"])
    msg = str(err.value)
    assert "embed.genept_w.hvgs" in msg
    assert "valid keys here: center, hvg, target_sum" in msg


def test_set_overrides_nested_and_lists(tmp_path: Path):
    path = tmp_path / "job.yaml"
    path.write_text("input:\n  path: a.zarr\noutput_dir: out\nshards:\n  rows: 100\n")
    job = load_config(
        path,
        [
            "shards.rows=2048",
            "embed.methods=[genept_w, ce]",
            "embed.genept_w.hvg=null",
            "embed.genept_w.center=false",
            "ray.actors=3",
            "input.label_key=cell_type",
            "output_dir=/tmp/elsewhere",
        ],
    )
    assert job.shards.rows == 2048
    assert job.embed.methods == ["genept_w", "ce"]
    assert job.embed.genept_w.hvg is None
    assert job.embed.genept_w.center is False
    assert job.ray.actors == 3
    assert job.input.label_key == "cell_type"
    assert job.output_dir == "/tmp/elsewhere"


def test_set_value_with_equals_sign_and_empty():
    data = apply_overrides({}, ["genes.table=/a=b.tsv", "input.name="])
    assert data == {"genes": {"table": "/a=b.tsv"}, "input": {"name": ""}}


def test_set_errors():
    with pytest.raises(ConfigError, match="not key=value"):
        load_config(_cfg(), ["shards.rows"])
    with pytest.raises(ConfigError, match="'output_dir' is not a section"):
        load_config(_cfg(), ["output_dir.x=1"])


@pytest.mark.parametrize("rows", [0, -5])
def test_shard_rows_must_be_positive(rows: int):
    with pytest.raises(ConfigError) as err:
        load_config(_cfg(), [f"shards.rows={rows}"])
    assert "shards.rows must be > 0" in str(err.value)
    assert f"got {rows}" in str(err.value)


def test_batch_key_equal_to_label_key_is_an_error():
    with pytest.raises(ConfigError) as err:
        load_config(_cfg(input={"path": "a.zarr", "label_key": "donor", "batch_key": "donor"}))
    assert "input.batch_key equals input.label_key ('donor')" in str(err.value)


def test_bad_literal_and_missing_key():
    with pytest.raises(ConfigError) as err:
        load_config(_cfg(), ["genes.text_source=wikipedia"])
    assert "genes.text_source" in str(err.value)
    assert "wikipedia" in str(err.value)
    with pytest.raises(ConfigError, match="missing key 'output_dir'"):
        load_config({"input": {"path": "a"}})


def test_missing_and_invalid_yaml(tmp_path: Path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("input: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listy)


def test_config_hash_stable_and_sensitive():
    a, b = load_config(_cfg()), load_config(_cfg())
    assert config_hash(a) == config_hash(b)
    c = load_config(_cfg(), ["embed.genept_w.center=false"])
    assert config_hash(a) != config_hash(c)
    assert config_hash(a.embed.genept_w) != config_hash(c.embed.genept_w)


def test_shipped_configs_validate():
    root = Path(__file__).resolve().parents[1]
    shipped = sorted((root / "configs").glob("*.yaml"))
    assert shipped, f"no configs in {root / 'configs'}: the README's commands need them"
    for path in shipped:
        load_config(path)


def test_config_literals_equal_registry_names():
    """Every backend/method/scorer name the config accepts is registered, and vice versa."""
    from typing import get_args

    from raypipe import config as C
    from raypipe.annotate.naming import NAMERS
    from raypipe.annotate.scorers import SCORERS
    from raypipe.embed.methods import METHODS
    from raypipe.genes.sources import TEXT_SOURCES
    from raypipe.llm.backends import EMBEDDERS
    from raypipe.llm.generate import GENERATORS

    pairs = {
        "EmbedMethod": (C.EmbedMethod, METHODS),
        "TextSourceName": (C.TextSourceName, TEXT_SOURCES),
        "EmbedderName": (C.EmbedderName, EMBEDDERS),
        "GeneratorName": (C.GeneratorName, GENERATORS),
        "ScorerName": (C.ScorerName, SCORERS),
        "NamingName": (C.NamingName, NAMERS),
    }
    for name, (literal, registry) in pairs.items():
        assert sorted(get_args(literal)) == registry.names(), name


def test_unknown_scorer_fails_at_load_listing_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(
            {
                "input": {"path": "x.h5ad"},
                "output_dir": str(tmp_path),
                "annotate": {"scorers": {"txt": 1}},
            }
        )
    msg = str(err.value)
    assert "annotate.scorers" in msg
    assert "txt" in msg
    assert "'text'" in msg
    assert "'markers'" in msg


HEAVY = (
    "torch",
    "transformers",
    "vllm",
    "sentence_transformers",
    "ray",
    "tiledbsoma",
    "cellxgene_census",
)

LAZY_PROBE = """
import sys, contextlib, io
import raypipe.config
from raypipe.cli import main
for argv in (["--help"], ["run", "--help"], ["ingest", "--help"], ["export", "--help"]):
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            main(argv)
        except SystemExit:
            pass
mods = set(sys.modules)
heavy = [m for m in {heavy!r} if m in mods or any(k.startswith(m + ".") for k in mods)]
print("HEAVY=" + ",".join(heavy))
"""


def test_config_and_help_import_nothing_heavy():
    probe = LAZY_PROBE.format(heavy=HEAVY)
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == "HEAVY=", out.stdout + out.stderr
