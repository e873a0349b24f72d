"""LangCell zero-shot against LangCell's own outputs (../shared/data/langcell), bad checkpoints,
``raypipe ce score``, and the in-run path (CEEncode → CE part → the ``langcell`` scorer)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from raypipe.embed.langcell import LangCellModel, LangCellZeroShot, frame_cells, softmax
from raypipe.errors import InputError

# README of the fixture: "Suggested check"
EXACT = 1e-5
LOOSE = 5e-5
HIDDEN = 2e-4


@pytest.fixture(scope="module")
def fx(shared_data: Path) -> Path:
    folder = shared_data / "langcell"
    if not (folder / "expected.npz").is_file():
        pytest.skip(f"LangCell fixture {folder} is absent")
    return folder


@pytest.fixture(scope="module")
def expected(fx: Path) -> dict[str, np.ndarray]:
    with np.load(fx / "expected.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def model(fx: Path) -> LangCellModel:
    return LangCellModel.load(fx / "ckpt", device="cpu")


@pytest.fixture(scope="module")
def texts(fx: Path) -> dict[str, str]:
    return json.loads((fx / "texts.json").read_text())


@pytest.fixture(scope="module")
def cells(fx: Path, model: LangCellModel) -> list[np.ndarray]:
    df = pd.read_parquet(fx / "inputs.parquet")
    return frame_cells(
        list(df["input_ids"]), cls_id=int(model.cell.cls_id), max_length=model.cell.max_length
    )


@pytest.fixture(scope="module")
def zero_shot(model, texts) -> LangCellZeroShot:
    return LangCellZeroShot(model, texts)


@pytest.fixture(scope="module")
def scores(zero_shot, cells):
    return zero_shot.score(cells)


def _maxdiff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def test_framing_and_text_ids_are_exact(expected, cells, zero_shot):
    for i, c in enumerate(cells):
        keep = expected["attention_mask"][i].astype(bool)
        assert c.tolist() == expected["input_ids"][i][keep].tolist(), f"cell {i}"
    for j in range(zero_shot.k):
        keep = expected["text_attention_mask"][j].astype(bool)
        got = zero_shot.text_ids[j][zero_shot.text_mask[j].bool()].tolist()
        assert got == expected["text_input_ids"][j][keep].tolist(), f"text {j}"
    assert zero_shot.names == [str(n) for n in expected["candidate_names"]]


def test_conformance_with_langcell_outputs(expected, zero_shot, scores):
    alpha = float(expected["alpha"])
    got = {
        "cell_embs": scores.embedding,
        "text_embs": zero_shot.text_emb,
        "sim_logits": scores.sim,
        "ctm_logits": scores.ctm,
        "logits": scores.score(alpha),
    }
    diffs = {k: _maxdiff(v, expected[k]) for k, v in got.items()}
    print("max |diff|:", {k: f"{v:.2e}" for k, v in diffs.items()})
    assert all(v <= EXACT for v in diffs.values()), diffs
    assert scores.score(alpha).argmax(1).tolist() == expected["preds"].tolist()
    sim_raw = scores.embedding @ zero_shot.text_emb.T / float(expected["temperature"])
    assert _maxdiff(sim_raw, expected["sim_raw"]) <= LOOSE
    assert _maxdiff(scores.match, expected["ctm_match_prob"]) <= LOOSE
    # the other mixes the notebook prints: the mean (alpha 0.5), sim alone, ctm alone
    assert scores.score(0.5).argmax(1).tolist() == expected["preds_mean"].tolist()
    assert _maxdiff(scores.score(0.5), expected["logits_mean"]) <= EXACT
    assert scores.sim.argmax(1).tolist() == expected["sim_preds"].tolist()
    assert scores.ctm.argmax(1).tolist() == expected["ctm_preds"].tolist()
    assert not scores.empty.any()


def test_intermediate_states_within_readme_tolerances(expected, model):
    """Each piece alone, fed LangCell's own inputs: cell states, text [CLS], multimodal [CLS]."""
    ids = torch.from_numpy(expected["input_ids"])
    mask = torch.from_numpy(expected["attention_mask"])
    with torch.inference_mode():
        h = model.cell.bert(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
        keep = expected["attention_mask"].astype(bool)
        assert _maxdiff(h[keep], expected["cell_last_hidden"][keep]) <= HIDDEN
        cls = []
        for j in range(expected["text_input_ids"].shape[0]):
            t = expected["text_input_ids"][j][expected["text_attention_mask"][j].astype(bool)]
            one = torch.from_numpy(t[None])
            cls.append(model.text(one, torch.ones_like(one))[0, 0].numpy())
        assert _maxdiff(np.stack(cls), expected["text_cls_hidden"]) <= HIDDEN
        # multimodal: cells 0..3 × every text, against LangCell's cell states (pads included)
        tid = torch.from_numpy(expected["text_input_ids"])
        tmask = torch.from_numpy(expected["text_attention_mask"])
        n, k = 4, tid.shape[0]
        states = torch.from_numpy(expected["cell_last_hidden"][:n])
        mm = model.text(tid.repeat(n, 1), tmask.repeat(n, 1), states, mask[:n])[:, 0]
        assert _maxdiff(mm.reshape(n, k, -1).numpy(), expected["ctm_cls_hidden"][:n]) <= HIDDEN
        head = model.ctm_head(torch.from_numpy(expected["ctm_cls_hidden"])).numpy()
        assert _maxdiff(head, expected["ctm_head_out"]) <= HIDDEN


def test_batching_does_not_change_scores(model, texts, cells, scores):
    """One cell and one (cell, text) pair per pass vs the default budget."""
    budget = model.cell.max_tokens_per_batch
    model.cell.max_tokens_per_batch = 1
    try:
        single = LangCellZeroShot(model, texts, max_pairs_tokens=1).score(cells[:12])
    finally:
        model.cell.max_tokens_per_batch = budget
    assert _maxdiff(single.sim, scores.sim[:12]) <= EXACT
    assert _maxdiff(single.ctm, scores.ctm[:12]) <= EXACT
    assert _maxdiff(single.embedding, scores.embedding[:12]) <= EXACT


def test_empty_cells_get_nan_scores(zero_shot, cells):
    res = zero_shot.score([cells[0], np.zeros(0, np.int64), cells[1]])
    assert res.empty.tolist() == [False, True, False]
    assert np.isnan(res.sim[1]).all()
    assert np.isnan(res.ctm[1]).all()
    assert np.all(res.embedding[1] == 0)
    np.testing.assert_allclose(res.sim[[0, 2]].sum(1), 1.0, atol=1e-6)


def test_softmax_rows_sum_to_one():
    x = np.array([[1000.0, 0.0], [-5.0, -5.0]])
    np.testing.assert_allclose(softmax(x), [[1.0, 0.0], [0.5, 0.5]], atol=1e-7)


# --- bad checkpoints ------------------------------------------------------------------


def _copy_ckpt(fx: Path, dest: Path) -> Path:
    return Path(shutil.copytree(fx / "ckpt", dest, copy_function=shutil.copyfile))


@pytest.mark.parametrize(
    ("part", "named"),
    [
        ("text_proj.bin", "text_proj.bin"),
        ("ctm_head.bin", "ctm_head.bin"),
        ("cell_proj.bin", "cell_proj.bin"),
        ("text_tokenizer", "text_tokenizer/"),
        ("text_bert", "text_bert/"),
        ("text_tokenizer/vocab.txt", "text_tokenizer/vocab.txt"),
    ],
)
def test_missing_part_is_named(fx, tmp_path, part, named):
    ckpt = _copy_ckpt(fx, tmp_path / "ckpt")
    target = ckpt / part
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(InputError, match="lacks") as err:
        LangCellModel.load(ckpt, device="cpu")
    assert named in str(err.value)
    assert str(ckpt) in str(err.value)


class _WritesAFile:
    """Unpickling this would create ``path`` (what a hostile checkpoint could do)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_head_that_is_not_a_state_dict_is_refused_unrun(fx, tmp_path):
    ckpt = _copy_ckpt(fx, tmp_path / "ckpt")
    marker = tmp_path / "payload-ran"
    torch.save(_WritesAFile(marker), ckpt / "ctm_head.bin")
    # the payload is live: a full unpickle would run it
    torch.load(ckpt / "ctm_head.bin", weights_only=False).close()
    assert marker.exists()
    marker.unlink()
    with pytest.raises(InputError, match=r"ctm_head\.bin is not a plain state dict"):
        LangCellModel.load(ckpt, device="cpu")
    assert not marker.exists()


@pytest.mark.parametrize(
    "payload",
    [[torch.zeros(2, 32)], {"weight": 1.0}, {"weight": torch.zeros(2, 32), "extra": torch.ones(1)}],
)
def test_head_with_plain_but_wrong_content_is_refused(fx, tmp_path, payload):
    ckpt = _copy_ckpt(fx, tmp_path / "ckpt")
    torch.save(payload, ckpt / "text_proj.bin")
    with pytest.raises(InputError, match="text_proj"):
        LangCellModel.load(ckpt, device="cpu")


def test_text_tokenizer_that_does_not_fit_the_text_encoder(fx, tmp_path):
    ckpt = _copy_ckpt(fx, tmp_path / "ckpt")
    vocab = ckpt / "text_tokenizer" / "vocab.txt"
    extra = "".join(f"extratoken{i}\n" for i in range(300))
    vocab.write_text(vocab.read_text() + extra)
    with pytest.raises(InputError, match=r"text tokenizer .* but the text encoder .* 30,524"):
        LangCellModel.load(ckpt, device="cpu")


def test_text_weights_that_do_not_fit_their_config(fx, tmp_path):
    ckpt = _copy_ckpt(fx, tmp_path / "ckpt")
    cfg = json.loads((ckpt / "text_bert" / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (ckpt / "text_bert" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match=r"missing: encoder\.layer\.2"):
        LangCellModel.load(ckpt, device="cpu")


# --- raypipe ce score -----------------------------------------------------------------


def test_ce_score_command_reproduces_langcell(fx, expected, tmp_path, capsys):
    from raypipe.cli import main

    out = tmp_path / "scores.parquet"
    argv = ["ce", "score", str(fx / "inputs.parquet"), "--model", str(fx / "ckpt")]
    argv += ["--texts", str(fx / "texts.json"), "--out", str(out), "--no-progress"]
    argv += ["--device", "cpu"]  # fp32: the conformance tolerance is not bf16's
    assert main(argv) == 0
    assert "48 cells" in capsys.readouterr().out
    table = pq.read_table(out)
    names = json.loads(table.schema.metadata[b"candidates"])
    df = table.to_pandas()
    assert df["obs_name"].tolist() == [str(x) for x in expected["obs_names"]]
    assert df["label"].tolist() == [names[i] for i in expected["preds"]]
    for col, key in (("sim", "sim_logits"), ("ctm", "ctm_logits"), ("score", "logits")):
        assert _maxdiff(np.stack(df[col].to_numpy()), expected[key]) <= EXACT, col
    assert _maxdiff(np.stack(df["embedding"].to_numpy()), expected["cell_embs"]) <= EXACT
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically


def test_ce_score_accepts_langcell_framed_tokens_and_alpha(fx, expected, tmp_path):
    from raypipe.embed.langcell_score import score_tokens_file

    df = pd.read_parquet(fx / "inputs.parquet")
    framed = tmp_path / "framed.parquet"  # as `raypipe tokenize --variant langcell` writes them
    pd.DataFrame(
        {
            "obs_name": df["obs_name"],
            "input_ids": [np.concatenate([[25426], np.asarray(x)]) for x in df["input_ids"]],
        }
    ).to_parquet(framed)
    out = tmp_path / "s.parquet"
    score_tokens_file(
        framed, fx / "ckpt", fx / "texts.json", out, alpha=0.5, device="cpu", progress=False
    )
    got = pd.read_parquet(out)
    assert _maxdiff(np.stack(got["score"].to_numpy()), expected["logits_mean"]) <= EXACT


def test_ce_score_bad_inputs_are_named(fx, tmp_path):
    from raypipe.embed.langcell_score import score_tokens_file

    bad_tokens = tmp_path / "t.parquet"
    pd.DataFrame({"cell": ["a"], "ids": [[1, 2]]}).to_parquet(bad_tokens)
    with pytest.raises(InputError, match=r"needs columns obs_name and input_ids; it has cell, ids"):
        score_tokens_file(bad_tokens, fx / "ckpt", fx / "texts.json", tmp_path / "o.parquet")
    bad_texts = tmp_path / "texts.json"
    bad_texts.write_text(json.dumps({"B cell": ""}))
    with pytest.raises(InputError, match="'B cell' have no text"):
        score_tokens_file(fx / "inputs.parquet", fx / "ckpt", bad_texts, tmp_path / "o.parquet")
    assert not (tmp_path / "o.parquet").exists()


# --- in a run: CEEncode computes the scores beside the embedding; the langcell scorer reads them


@pytest.fixture(scope="module")
def tiny(shared_data: Path, tmp_path_factory) -> dict:
    """A 40-cell atlas from data_factory with real Ensembl ids (one zero-count cell), ingested."""
    from data_factory import GENES, make_adata, write_h5ad

    from raypipe.atlas.ingest import ingest
    from raypipe.embed.dictionaries import GeneformerDictionaries

    gdir = shared_data / "geneformer"
    dicts = GeneformerDictionaries.load("V1", search=[gdir])
    genes = [g for g in GENES if dicts.gene_name_id.get(g) in dicts.token_dict]
    assert len(genes) >= 30
    adata = make_adata(40, genes, seed=3, zero_rows=(5,))
    adata.var["ensembl_id"] = [dicts.gene_name_id[g] for g in genes]
    root = tmp_path_factory.mktemp("tiny")
    h5 = write_h5ad(root / "tiny.h5ad", adata)
    atlas = ingest(h5, root / "atlas.zarr", rows_per_chunk=16, progress=False).atlas
    return {"h5ad": h5, "atlas": atlas, "gdir": str(gdir)}


def _job(tiny: dict, fx: Path, out: Path, **ce):
    from raypipe.config import load_config

    cfg = {"model": str(fx / "ckpt"), "dictionary": tiny["gdir"], "dtype": "float32", **ce}
    return load_config(
        {
            "input": {"path": str(tiny["atlas"].path)},
            "output_dir": str(out),
            "embed": {"methods": ["ce"], "ce": cfg},
            "annotate": {"enabled": True, "scorers": {"langcell": 1.0}},
        }
    )


def _run_steps(plan, shards) -> None:
    batch = {
        "shard": np.array([s.index for s in shards]),
        "start": np.array([s.start for s in shards]),
        "stop": np.array([s.stop for s in shards]),
        "content_hash": np.array([s.content_hash for s in shards], dtype=object),
    }
    for step in plan.steps:
        batch = step.stage(**step.kwargs)(batch)


def test_ce_encode_scores_equal_ce_score_and_feed_the_scorer(fx, texts, tiny, tmp_path):
    from raypipe.annotate.stage import AnnotateShards
    from raypipe.atlas.store import plan_shards
    from raypipe.core.outputs import read_parts
    from raypipe.embed.ce import LANGCELL_COLUMNS, build_ce
    from raypipe.embed.langcell_score import score_tokens_file
    from raypipe.embed.tokenizer import write_tokens

    atlas = tiny["atlas"]
    shards = plan_shards(atlas, 16)
    assert len(shards) == 3
    job = _job(tiny, fx, tmp_path / "run")
    plan = build_ce(job, atlas, None, shards, candidate_texts=texts)  # type: ignore[arg-type]
    _run_steps(plan, shards)
    part = read_parts(tmp_path / "run", "embeddings", "ce")
    meta = pq.read_schema(next((tmp_path / "run" / "embeddings" / "ce").glob("*.parquet"))).metadata
    assert json.loads(meta[b"langcell_candidates"]) == list(texts)
    assert meta[b"fingerprint"].decode() == plan.fingerprint

    tokens = tmp_path / "tokens.parquet"  # the same cells through `raypipe ce score`
    write_tokens(tiny["h5ad"], tokens, dictionary=tiny["gdir"])
    ref = tmp_path / "ref.parquet"
    score_tokens_file(
        tokens, fx / "ckpt", fx / "texts.json", ref, dtype="float32", device="cpu", progress=False
    )
    want = pd.read_parquet(ref)
    assert part["obs_name"].tolist() == want["obs_name"].tolist()
    assert part["empty"].tolist() == want["empty"].tolist()
    assert part["empty"].sum() == 1
    for col, key in zip(LANGCELL_COLUMNS, ("sim", "ctm"), strict=True):
        np.testing.assert_allclose(
            np.stack(part[col].to_numpy()), np.stack(want[key].to_numpy()), atol=EXACT
        )
    np.testing.assert_allclose(
        np.stack(part["embedding"].to_numpy()), np.stack(want["embedding"].to_numpy()), atol=EXACT
    )

    # the langcell scorer on those parts, without the runner
    k = len(texts)
    alpha = 0.3
    annotate = AnnotateShards(
        method="ce",
        labels=list(texts),
        text_emb=np.zeros((k, 1), np.float32),
        cell_mean=np.zeros(1, np.float32),
        marker_idx=[np.zeros(0, np.int64)] * k,
        weights={"langcell": 1.0},
        center=True,
        top_k=3,
        unassigned_threshold=None,
        langcell_alpha=alpha,
        atlas_path=atlas.path,
        out_dir=str(tmp_path / "run"),
        fingerprint="annotate-fp",
    )
    annotate(
        {
            "shard": np.array([s.index for s in shards]),
            "start": np.array([s.start for s in shards]),
            "stop": np.array([s.stop for s in shards]),
            "content_hash": np.array([s.content_hash for s in shards], dtype=object),
        }
    )
    got = read_parts(tmp_path / "run", "annotations", "ce")
    mix = alpha * np.stack(want["sim"].to_numpy()) + (1 - alpha) * np.stack(want["ctm"].to_numpy())
    full = ~want["empty"].to_numpy()
    assert got["label"][full].tolist() == [list(texts)[i] for i in mix[full].argmax(1)]
    np.testing.assert_allclose(got["score"][full], mix[full].max(1), atol=1e-6)
    assert got["margin"][~full].tolist() == [0.0]  # no tokens: every candidate 1/k


def test_build_ce_fingerprint_covers_candidate_texts_and_checks_the_setup(
    fx, texts, tiny, tmp_path
):
    from raypipe.atlas.store import plan_shards
    from raypipe.embed.ce import build_ce
    from raypipe.errors import ConfigError

    atlas = tiny["atlas"]
    shards = plan_shards(atlas, 16)
    job = _job(tiny, fx, tmp_path)
    plain = build_ce(job, atlas, None, shards)  # type: ignore[arg-type]
    with_texts = build_ce(job, atlas, None, shards, candidate_texts=texts)  # type: ignore[arg-type]
    other = dict(texts, **{"B cell": "B cell: a different text."})
    changed = build_ce(job, atlas, None, shards, candidate_texts=other)  # type: ignore[arg-type]
    assert len({plain.fingerprint, with_texts.fingerprint, changed.fingerprint}) == 3
    assert "candidate_names" not in plain.steps[1].kwargs
    assert with_texts.steps[1].kwargs["candidate_names"] == list(texts)
    with pytest.raises(ConfigError, match="variant langcell"):
        build_ce(
            _job(tiny, fx, tmp_path, variant="geneformer_v1"),
            atlas,
            None,
            shards,
            candidate_texts=texts,
        )  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="pooling is mean"):
        build_ce(
            _job(tiny, fx, tmp_path, pooling="mean"), atlas, None, shards, candidate_texts=texts
        )  # type: ignore[arg-type]
    only_cell = tmp_path / "only_cell"
    _copy_ckpt(fx, only_cell)
    shutil.rmtree(only_cell / "text_bert")
    with pytest.raises(InputError, match="lacks text_bert/"):
        build_ce(
            _job(tiny, fx, tmp_path, model=str(only_cell)),
            atlas,
            None,
            shards,
            candidate_texts=texts,
        )  # type: ignore[arg-type]


def test_langcell_scorer_mixes_and_requires_its_inputs():
    from raypipe.annotate.scorers import SCORERS, ScoreInputs
    from raypipe.errors import ConfigError

    sim = np.array([[0.7, 0.3], [np.nan, np.nan]], np.float32)
    ctm = np.array([[0.4, 0.6], [np.nan, np.nan]], np.float32)
    got = SCORERS.get("langcell")(
        ScoreInputs(langcell_sim=sim, langcell_ctm=ctm, langcell_alpha=0.1)
    )
    np.testing.assert_allclose(got, [[0.43, 0.57], [0.5, 0.5]], atol=1e-6)
    with pytest.raises(ConfigError, match="langcell"):
        SCORERS.get("langcell")(ScoreInputs())
