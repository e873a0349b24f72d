"""Cell encoder: bucketed batching equals one-at-a-time, pooling, layouts and bad checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from raypipe.embed.ce_model import CellEncoder, bucket_batches, build_random_encoder
from raypipe.embed.dictionaries import GeneformerDictionaries
from raypipe.embed.tokenizer import RankValueTokenizer
from raypipe.errors import ConfigError, InputError

SMALL = {
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "intermediate_size": 128,
}


@pytest.fixture(scope="module")
def v1(shared_data: Path) -> GeneformerDictionaries:
    return GeneformerDictionaries.load("V1", search=[shared_data / "geneformer"])


@pytest.fixture(scope="module")
def v1_config(shared_data: Path) -> Path:
    return shared_data / "geneformer" / "config_Geneformer-V1-10M.json"


@pytest.fixture(scope="module")
def cells(shared_data: Path) -> list[np.ndarray]:
    df = pd.read_parquet(shared_data / "geneformer" / "expected_tokens_kang_1.5k.parquet")
    rng = np.random.default_rng(0)
    picked = [np.asarray(df["input_ids"][i]) for i in rng.choice(len(df), 20, replace=False)]
    return [c[: int(n)] for c, n in zip(picked, rng.integers(5, 300, size=20), strict=True)]


@pytest.fixture(scope="module")
def gf_dir(v1_config, tmp_path_factory) -> Path:
    return build_random_encoder(v1_config, tmp_path_factory.mktemp("gf"), 0, **SMALL)


@pytest.fixture(scope="module")
def gf(gf_dir, v1) -> CellEncoder:
    return CellEncoder(gf_dir, tokenizer=RankValueTokenizer(v1), max_tokens_per_batch=1500)


def test_bucketed_batches_equal_one_at_a_time(gf, cells):
    batched = gf.encode(cells)
    single = np.vstack([gf.encode([c]) for c in cells])
    assert batched.dtype == np.float32
    assert batched.shape == (len(cells), 64)
    np.testing.assert_allclose(batched, single, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("budget", [1, 700, 10_000, 1_000_000])
def test_result_independent_of_batch_budget(gf, gf_dir, v1, cells, budget):
    other = CellEncoder(gf_dir, tokenizer=RankValueTokenizer(v1), max_tokens_per_batch=budget)
    np.testing.assert_allclose(other.encode(cells), gf.encode(cells), atol=1e-5)


def test_mean_pooling_matches_manual_forward(gf, cells):
    import torch

    got = gf.encode(cells[:3])
    for c, g in zip(cells[:3], got, strict=True):
        with torch.inference_mode():
            h = gf.bert(input_ids=torch.as_tensor(c[None].astype(np.int64))).last_hidden_state[0]
        want = h.mean(0).numpy()
        np.testing.assert_allclose(g, want / np.linalg.norm(want), atol=1e-5)


def test_bucket_batches_respect_budget_and_cover_all():
    lengths = [0, 5, 300, 120, 120, 7, 2048, 0, 64]
    batches = bucket_batches(lengths, 400)
    seen = np.concatenate(batches)
    assert sorted(seen.tolist()) == [i for i, n in enumerate(lengths) if n > 0]
    for b in batches:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 400


def test_langcell_layout_cls_projection_and_empty_cells(v1, v1_config, cells, tmp_path):
    out = build_random_encoder(v1_config, tmp_path / "lc", 1, layout="langcell", **SMALL)
    assert (out / "cell_bert" / "config.json").is_file()
    assert (out / "cell_proj.bin").is_file()
    tok = RankValueTokenizer(v1, variant="langcell")
    enc = CellEncoder(out, tokenizer=tok)
    assert enc.pooling == "cls"
    framed = [np.concatenate([[tok.prefix[0]], c]).astype(np.int32) for c in cells[:4]]
    emb = enc.encode([*framed, np.zeros(0, np.int32)])
    assert emb.shape == (5, 256)
    assert enc.last_empty.tolist() == [False] * 4 + [True]
    assert np.all(emb[4] == 0)
    np.testing.assert_allclose(np.linalg.norm(emb[:4], axis=1), 1.0, atol=1e-5)
    single = np.vstack([enc.encode([f]) for f in framed])
    np.testing.assert_allclose(emb[:4], single, atol=1e-5)


def test_vocab_mismatch_names_both_sizes(gf_dir, v1):
    with pytest.raises(InputError, match=r"vocab_size 25426.*needs 25427"):
        CellEncoder(gf_dir, tokenizer=RankValueTokenizer(v1, variant="langcell"))


def test_max_length_beyond_positions_is_rejected(gf_dir, v1):
    with pytest.raises(InputError, match="max_position_embeddings 2048"):
        CellEncoder(gf_dir, tokenizer=RankValueTokenizer(v1, max_length=4096))


def test_cls_pooling_without_cls_token_is_a_config_error(gf_dir, v1):
    with pytest.raises(ConfigError, match="cls"):
        CellEncoder(gf_dir, tokenizer=RankValueTokenizer(v1), pooling="cls")


def test_missing_and_corrupt_checkpoints_name_the_folder(v1, tmp_path):
    tok = RankValueTokenizer(v1)
    with pytest.raises(InputError, match="nope"):
        CellEncoder(tmp_path / "nope", tokenizer=tok)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    with pytest.raises(InputError, match="bad"):
        CellEncoder(bad, tokenizer=tok)
    lc = tmp_path / "lc"
    (lc / "cell_bert").mkdir(parents=True)
    with pytest.raises(InputError, match="cell_proj"):
        CellEncoder(lc, tokenizer=tok)
