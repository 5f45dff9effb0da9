"""fm predict: pretrain, fine-tune (velocity and expression), export, load and predict on CPU; each bad input an error.

    python -m pytest tests/integration/test_predict.py -q

The reference is computed without fm.predict: every corpus cell as the training stream tokenises it, plus every other
vocabulary gene appended as a token hidden from the encoder and queried (fm.heads.expression's documented way to
predict absent genes), through the FinetuneTask loaded from the training checkpoint.
"""

from __future__ import annotations

import copy
import shutil
from dataclasses import replace
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import scipy.sparse as sp
import torch

from fm import finetune, keys, train
from fm.checkpoint import VOCAB_NAME, WEIGHTS_NAME, ReleaseError, export, load_pretrained
from fm.cli import main
from fm.data.schema import load_manifest
from fm.data.stream import decode_unit, gather_block
from fm.data.tokenize import TokenizerConfig, moment_scale, tokenize_block
from fm.heads.expression import QUERY_MASK
from fm.predict import predict
from fm.tasks.finetune import FinetuneTask
from tests.conftest import PANCREAS
from tests.integration.pretrain_helpers import build_corpus, compose
from tests.integration.test_finetune import compose_finetune
from tests.tolerance import assert_close_rounding
from tests.unit.test_model import encoder_terms

pytestmark = pytest.mark.slow

HEADS = {"velocity": ["head.mode=supervised", "head.velocity_param=rates"], "expression": []}
OUTPUTS = {"velocity": ("velocity", keys.LAYER_VELOCITY), "velocity_u": ("velocity", keys.LAYER_VELOCITY_U),
           "alpha": ("velocity", keys.LAYER_ALPHA), "gamma": ("velocity", keys.LAYER_GAMMA),
           "spliced_mu": ("expression", keys.LAYER_IMPUTED[keys.LAYER_SPLICED]),
           "unspliced_mu": ("expression", keys.LAYER_IMPUTED[keys.LAYER_UNSPLICED])}


def train_and_export(root: Path, corpus: Path, heads: dict[str, list[str]]) -> tuple[dict, dict]:
    """Two pretraining steps, then two fine-tuning steps per head: ({head: checkpoint}, {head: release})."""
    train.run(compose(corpus, root / "pretrain", "trainer.max_steps=2"))
    pretrained = root / "pretrain" / "checkpoints" / "last.ckpt"
    ckpts, releases = {}, {}
    for head, extra in heads.items():
        finetune.run(compose_finetune(corpus, root / head, pretrained, f"head={head}", "trainer.max_steps=2", *extra))
        ckpts[head] = root / head / "checkpoints" / "last.ckpt"
        releases[head] = export(ckpts[head], root / "releases" / head)
    return ckpts, releases


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    corpus = build_corpus(root / "data")  # 400 cells x 40 genes; a gene filtered by the converter is not in vocab
    ckpts, releases = train_and_export(root, corpus, HEADS)
    return {"h5ad": root / "data" / "sim.h5ad", "corpus": corpus, "ckpts": ckpts, "releases": releases}


@pytest.fixture(scope="module")
def models(trained):
    return [load_pretrained(trained["releases"][h]) for h in HEADS]


def user_input(path: Path) -> ad.AnnData:
    """The simulated file as a user might hand it over: extra genes no vocabulary has, columns permuted."""
    adata = ad.read_h5ad(path)
    rng = np.random.default_rng(1)
    n_extra = 3
    extra = ad.AnnData(
        X=sp.csr_matrix(rng.poisson(2.0, (adata.n_obs, n_extra)).astype(np.float32)),
        obs=adata.obs[[]],
        var=pd.DataFrame({keys.VAR_GENE_ID: [f"NOTAGENE{i}" for i in range(n_extra)]},
                         index=[f"Extra{i}" for i in range(n_extra)]),
        layers={name: sp.csr_matrix(rng.poisson(2.0, (adata.n_obs, n_extra)).astype(np.float32))
                for name in adata.layers},
    )
    both = ad.concat([adata, extra], axis=1, merge="first", uns_merge="first")
    both.obs, both.obsm, both.uns = adata.obs, adata.obsm, adata.uns
    return both[:, rng.permutation(both.n_vars)].copy()


def corpus_blocks(corpus: Path):
    """The corpus's cells as the training stream decodes them, one CellBlock per record batch."""
    for shard in load_manifest(corpus).shards:
        with pa.memory_map(str(corpus / shard.path)) as f:
            reader = pa.ipc.open_file(f)
            for i in range(reader.num_record_batches):
                unit = decode_unit(reader.get_batch(i), shard.path)
                n = len(unit.offsets) - 1
                names = [np.asarray(a.to_pylist(), dtype=object) for a in (unit.cell_id, unit.dataset_id,
                                                                            unit.cell_type)]
                yield gather_block([unit], np.zeros(n, np.int64), np.arange(n), names)


def reference(task: FinetuneTask, corpus: Path, cfg: TokenizerConfig, vocab_size: int) -> dict[str, dict]:
    """{output: {cell_id: [vocab_size] values (NaN where not predicted)}} from the training-checkpoint task."""
    out: dict[str, dict] = {}
    for block in corpus_blocks(corpus):
        moments = (keys.B_MS, keys.B_MU) if block.ms_N is not None else ()  # the corpus's moments, as trained on
        batch = tokenize_block(block, cfg, np.random.default_rng(0), targets=moments)
        B, G = batch[keys.B_GENE_IDS].shape
        ids, vis = torch.zeros(B, G + vocab_size, dtype=torch.long), torch.zeros(B, G + vocab_size, dtype=torch.bool)
        vals = {k: torch.zeros(B, G + vocab_size) for k in (keys.B_SPLICED, keys.B_UNSPLICED, *moments)}
        query = torch.zeros_like(vis)
        for b in range(B):
            lo, hi = block.offsets_B1[b], block.offsets_B1[b + 1]
            genes = block.gene_index_N[lo:hi]
            n = int(batch[keys.B_GENE_MASK][b].sum())
            seen = batch[keys.B_GENE_IDS][b, :n]
            ids[b, :n], vis[b, :n] = seen, True
            for k in vals:
                vals[k][b, :n] = batch[k][b, :n]
            # every other vocabulary gene, hidden from the encoder: its normalised value (0 without counts)
            others = np.setdiff1d(np.arange(vocab_size), seen.numpy())
            ids[b, n:n + len(others)] = torch.from_numpy(others)
            for k, counts, lib in ((keys.B_SPLICED, block.spliced_N, block.library_size_spliced_B),
                                   (keys.B_UNSPLICED, block.unspliced_N, block.library_size_unspliced_B)):
                dense = np.zeros(vocab_size, np.float64)
                dense[genes] = counts[lo:hi]
                scale = cfg.target_sum / lib[b] if lib[b] > 0 else 0.0  # a zero library gives zeros, as the tokenizer
                vals[k][b, n:n + len(others)] = torch.from_numpy(np.log1p(dense[others] * scale))
            for k, moment in zip(moments, (block.ms_N, block.mu_N)):  # stored as fractions of the library
                dense = np.zeros(vocab_size, np.float64)
                dense[genes] = np.asarray(moment)[lo:hi]
                vals[k][b, n:n + len(others)] = torch.from_numpy(np.log1p(dense[others] * moment_scale(cfg)))
            query[b, :n + len(others)] = True
        full = {keys.B_GENE_IDS: ids, keys.B_GENE_MASK: vis, **vals, QUERY_MASK: query,
                keys.B_LIBRARY_SIZE_SPLICED: batch[keys.B_LIBRARY_SIZE_SPLICED],
                keys.B_LIBRARY_SIZE_UNSPLICED: batch[keys.B_LIBRARY_SIZE_UNSPLICED]}
        with torch.no_grad():
            pred = task.head(full, task.encoder(full))
        for name in pred:
            if name == "query_mask" or name.endswith(("_theta", "_zi_logits")):
                continue
            for b, cell in enumerate(block.cell_id):
                row = np.full(vocab_size, np.nan)
                row[ids[b][query[b]].numpy()] = pred[name][b][query[b]].double().numpy()
                out.setdefault(name, {})[cell] = row
    return out


# --- the round trip ----------------------------------------------------------------------------------------------
def test_predictions_equal_the_training_checkpoints(trained, models):
    adata = user_input(trained["h5ad"])
    before = copy.deepcopy(adata)
    result = predict(models, adata, batch_size=64, progress=False)

    vocab = models[0].vocab
    index = {g: i for i, g in enumerate(vocab.gene_ids)}
    vocab_of_col = np.array([index.get(g, -1) for g in adata.var[keys.VAR_GENE_ID]])
    in_vocab = vocab_of_col >= 0
    assert 0 < in_vocab.sum() < adata.n_vars and not in_vocab[adata.var_names.str.startswith("Extra")].any()
    np.testing.assert_array_equal(result.var[keys.VAR_FM_IN_VOCAB].to_numpy(), in_vocab)
    assert result.uns[keys.UNS_FM]["genes"]["n_matched"] == in_vocab.sum()

    row_of = {c: i for i, c in enumerate(adata.obs_names)}
    n_compared = 0
    for head in HEADS:
        task = FinetuneTask.load_from_checkpoint(trained["ckpts"][head], map_location="cpu").eval()
        model = models[list(HEADS).index(head)]
        cfg = replace(TokenizerConfig(**model.config["tokenizer"]), gene_set="cell", gene_sampling="top_expressed")
        ref = reference(task, trained["corpus"], cfg, len(vocab))
        for name, (owner, layer) in OUTPUTS.items():
            if owner != head:
                continue
            got_NV = result.layers[layer]
            assert got_NV.dtype == np.float32 and got_NV.shape == adata.shape
            assert np.isnan(got_NV[:, ~in_vocab]).all(), layer  # NaN exactly outside the vocabulary
            assert np.isfinite(got_NV[:, in_vocab]).all(), layer
            for cell, want_vocab in ref[name].items():  # predict batches cells otherwise: rounding apart
                assert_close_rounding(got_NV[row_of[cell], in_vocab], want_vocab[vocab_of_col[in_vocab]],
                                      terms=encoder_terms(model.encoder), msg=f"{layer}, cell {cell}")
                n_compared += 1
    assert n_compared > 0
    s = result.layers[keys.LAYER_IMPUTED[keys.LAYER_SPLICED]][:, in_vocab]
    lib = np.asarray(adata.layers[keys.LAYER_SPLICED][:, in_vocab].sum(1)).ravel()
    np.testing.assert_allclose(s.sum(1), lib, rtol=1e-4)  # expected counts sum to the library size
    assert result.obsm[keys.OBSM_EMBEDDING].shape == (adata.n_obs, models[0].encoder.cfg.d_model)

    # the input is untouched, and the output holds its fields unchanged
    for obj in (adata, result):
        pd.testing.assert_frame_equal(obj.obs, before.obs)
        pd.testing.assert_frame_equal(obj.var[before.var.columns], before.var)
        assert (obj.X != before.X).nnz == 0
        for name in before.layers:
            assert (obj.layers[name] != before.layers[name]).nnz == 0, name
        for name in before.obsm:
            np.testing.assert_array_equal(obj.obsm[name], before.obsm[name])
        assert obj.uns["simulation"].keys() == before.uns["simulation"].keys()
    assert list(adata.layers) == list(before.layers) and list(adata.obsm) == list(before.obsm)
    assert list(adata.uns) == list(before.uns) and list(adata.var.columns) == list(before.var.columns)


def test_zero_count_genes_and_batch_size(trained, models):
    adata = ad.read_h5ad(trained["h5ad"])[:60].copy()
    for name in (keys.LAYER_SPLICED, keys.LAYER_UNSPLICED):
        layer = adata.layers[name].tolil()
        layer[0] = 0  # a cell without any count
        adata.layers[name] = layer.tocsr()
    adata.layers[keys.LAYER_UNSPLICED] = adata.layers[keys.LAYER_UNSPLICED].toarray()  # dense input works too
    a = predict(models, adata, batch_size=60, progress=False)
    b = predict(models, adata, batch_size=7, progress=False)
    in_vocab = a.var[keys.VAR_FM_IN_VOCAB].to_numpy()
    zero = (adata.layers[keys.LAYER_SPLICED].toarray() + adata.layers[keys.LAYER_UNSPLICED] == 0) & in_vocab
    assert zero.sum() > 0 and zero[0, in_vocab].all()
    assert a.uns[keys.UNS_FM]["n_cells_without_counts"] == zero[:, in_vocab].all(1).sum()
    for layer in a.uns[keys.UNS_FM]["layers"]:
        assert np.isfinite(a.layers[layer][zero]).all(), layer
        assert_close_rounding(a.layers[layer], b.layers[layer], terms=encoder_terms(models[0].encoder), msg=layer)
    assert_close_rounding(a.obsm[keys.OBSM_EMBEDDING], b.obsm[keys.OBSM_EMBEDDING],
                          terms=encoder_terms(models[0].encoder))
    again = predict(models, adata, batch_size=60, progress=False)  # deterministic
    np.testing.assert_array_equal(again.layers[keys.LAYER_VELOCITY], a.layers[keys.LAYER_VELOCITY])


def test_max_genes_and_symbol_mapping(trained, models):
    adata = ad.read_h5ad(trained["h5ad"])[:40].copy()
    by_id = predict(models[0], adata, progress=False, max_genes=8)
    assert by_id.uns[keys.UNS_FM]["n_cells_truncated"] > 0
    assert by_id.uns[keys.UNS_FM]["models"]["0"]["tokenizer"]["max_genes"] == 8
    del adata.var[keys.VAR_GENE_ID]  # var_names hold the symbols
    by_symbol = predict(models[0], adata, progress=False, max_genes=8)
    assert by_symbol.uns[keys.UNS_FM]["genes"]["field"] == "var_names"
    np.testing.assert_array_equal(by_symbol.layers[keys.LAYER_VELOCITY], by_id.layers[keys.LAYER_VELOCITY])
    assert keys.LAYER_IMPUTED[keys.LAYER_SPLICED] not in by_symbol.layers  # a velocity release writes no imputation


def test_cli_end_to_end(trained, models, tmp_path, capsys):
    ad.read_h5ad(trained["h5ad"])[:50].copy().write_h5ad(tmp_path / "in.h5ad")
    out = tmp_path / "out" / "pred.h5ad"
    args = ["predict", "--input", str(tmp_path / "in.h5ad"), "--output", str(out), "--batch-size", "32"]
    for release in trained["releases"].values():
        args += ["--checkpoint", str(release)]
    assert main(args) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    written = ad.read_h5ad(out)
    direct = predict(models, ad.read_h5ad(tmp_path / "in.h5ad"), batch_size=32, progress=False)
    assert list(written.var_names) == list(direct.var_names)
    for layer in direct.uns[keys.UNS_FM]["layers"]:
        np.testing.assert_array_equal(written.layers[layer], direct.layers[layer])
    assert written.uns[keys.UNS_FM]["heads"].tolist() == list(HEADS)
    assert sorted(p.name for p in out.parent.iterdir()) == ["pred.h5ad"]  # no temporary file left
    assert keys.VAR_VELOCITY_GENES in written.var

    # an existing output needs --overwrite; the input is never the output
    assert main(args) == 2 and "exists; pass --overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    same = ["predict", "--input", str(out), "--output", str(out), "--checkpoint", str(trained["releases"]["velocity"]),
            "--overwrite"]
    assert main(same) == 2 and "will not overwrite the input" in capsys.readouterr().err


# --- bad input: each a clear error ---------------------------------------------------------------------------------
def rename_genes(adata: ad.AnnData) -> None:
    adata.var[keys.VAR_GENE_ID] = [f"X{i}" for i in range(adata.n_vars)]
    adata.var_names = [f"Y{i}" for i in range(adata.n_vars)]


@pytest.mark.parametrize("spoil, match", [
    (lambda a: a.layers.pop(keys.LAYER_UNSPLICED), r"layers\['unspliced'\] is missing"),
    (lambda a: a.layers.__setitem__(keys.LAYER_SPLICED, -a.layers[keys.LAYER_SPLICED]),
     r"layers\['spliced'\] has a negative count .* at cell"),
    (lambda a: a.layers.__setitem__(keys.LAYER_SPLICED, a.layers[keys.LAYER_SPLICED].toarray() * np.nan),
     r"layers\['spliced'\] has a NaN or infinite count"),
    (lambda a: rename_genes(a), r"the AnnData: no gene in common with the vocabulary .*var\['gene_id'\]"),
], ids=["missing-layer", "negative", "nan", "no-common-gene"])
def test_bad_input(trained, models, spoil, match):
    adata = ad.read_h5ad(trained["h5ad"])[:20].copy()
    spoil(adata)
    with pytest.raises(ValueError, match=match):
        predict(models, adata, progress=False)


def test_outputs_already_present(trained, models):
    adata = ad.read_h5ad(trained["h5ad"])[:20].copy()
    once = predict(models[0], adata, progress=False)
    with pytest.raises(ValueError, match=r"already holds layers\['velocity'\].*overwrite=True"):
        predict(models[0], once, progress=False)
    twice = predict(models[0], once, progress=False, overwrite=True)
    np.testing.assert_array_equal(twice.layers[keys.LAYER_VELOCITY], once.layers[keys.LAYER_VELOCITY])
    with pytest.raises(ValueError, match=r"both write layers\['velocity'\]"):
        predict([models[0], models[0]], adata, progress=False)


def test_bad_releases(trained, tmp_path, capsys):
    release = shutil.copytree(trained["releases"]["velocity"], tmp_path / "r")
    lines = (release / VOCAB_NAME).read_text().split("\n")
    (release / VOCAB_NAME).write_text("\n".join([lines[0], lines[1].split("\t")[0] + "\tOTHER", *lines[2:]]))
    with pytest.raises(ReleaseError, match="vocab.tsv: hash .* another model's vocabulary"):
        load_pretrained(release)
    shutil.copy(trained["releases"]["velocity"] / VOCAB_NAME, release / VOCAB_NAME)
    weights = release / WEIGHTS_NAME
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    args = ["predict", "--input", str(trained["h5ad"]), "--output", str(tmp_path / "o.h5ad")]
    assert main([*args, "--checkpoint", str(release)]) == 2
    assert "model.safetensors: unreadable safetensors file" in capsys.readouterr().err
    weights.unlink()
    torch.save({"x": torch.zeros(1)}, release / "model.pt")
    assert main([*args, "--checkpoint", str(release / "model.pt")]) == 2
    assert "model.pt: pickle weights are not loaded" in capsys.readouterr().err
    assert not (tmp_path / "o.h5ad").exists()


# --- real data -----------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not PANCREAS.exists(), reason="needs /work/shared/data (pancreas)")
def test_pancreas_round_trip(tmp_path):
    from data_prep.convert import convert

    subset = ad.read_h5ad(PANCREAS)[:240].copy()
    subset.write_h5ad(tmp_path / "pancreas.h5ad")
    corpus = tmp_path / "corpus"
    convert([tmp_path / "pancreas.h5ad"], corpus, progress=False)
    _, releases = train_and_export(tmp_path, corpus, {"velocity": []})  # the self-supervised dynamical default
    model = load_pretrained(releases["velocity"])
    result = predict(model, subset, batch_size=100, progress=False)
    in_vocab = result.var[keys.VAR_FM_IN_VOCAB].to_numpy()
    assert in_vocab.sum() == len(model.vocab)  # the corpus's genes are the file's genes that pass the filters
    v = result.layers[keys.LAYER_VELOCITY]
    fitted = result.var[keys.VAR_VELOCITY_GENES].to_numpy()  # the genes the dynamical model fits
    assert fitted.sum() >= 10 and not fitted[~in_vocab].any()
    assert np.isfinite(v[:, fitted]).all() and np.isnan(v[:, ~in_vocab]).all()
    assert np.isfinite(result.layers[keys.LAYER_VELOCITY_CONFIDENCE][:, fitted]).all()
    assert result.uns[keys.UNS_FM]["genes"]["field"] == "var_names"
