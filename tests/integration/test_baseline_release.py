"""Baselines are released like any head: a tiny cellDancer, scVI or scScope trained by `fm finetune`, exported by
`fm export` (its head alone, no encoder) and run by `fm predict`, whose layers come from what the head declares.

    python -m pytest tests/integration/test_baseline_release.py -q
"""

from __future__ import annotations

import sys

import anndata as ad
import numpy as np
import pytest
import torch

from fm import finetune, keys
from fm.checkpoint import load_pretrained
from fm.cli import main
from fm.data.vocab import GeneVocab
from tests.integration.pretrain_helpers import build_corpus, run_module
from tests.integration.test_baselines_entry import BASE, N_GENES, compose

pytestmark = pytest.mark.slow

LAYERS = {  # what each baseline's release writes (Head.predict_layers)
    "celldancer": [keys.LAYER_VELOCITY, keys.LAYER_VELOCITY_U, keys.LAYER_ALPHA, keys.LAYER_BETA, keys.LAYER_GAMMA],
    "scvi": [keys.LAYER_IMPUTED[keys.LAYER_SPLICED]],
    "scscope": [keys.LAYER_IMPUTED[keys.LAYER_SPLICED]],
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("baseline_release") / "data"
    return build_corpus(root, n_cells=200, n_genes=N_GENES), root / "sim.h5ad"


def train(name: str, corpus, out) -> None:
    overrides = [f"head={name}", f"data.corpus={corpus}", *BASE, "trainer.max_steps=3"]
    if name == "celldancer":  # the command a user runs
        run_module([sys.executable, "-m", "fm.cli", "finetune", *overrides, f"hydra.run.dir={out}"])
    else:  # the same entry point in this process (faster)
        finetune.run(compose(corpus, out, *overrides))


@pytest.mark.parametrize("name", list(LAYERS))
def test_baseline_is_exported_and_predicts(data, tmp_path, capsys, name):
    corpus, h5ad = data
    train(name, corpus, tmp_path / "run")
    ckpt, release = tmp_path / "run" / "checkpoints" / "last.ckpt", tmp_path / "release"
    assert main(["export", str(ckpt), "--out", str(release)]) == 0, capsys.readouterr().err

    model = load_pretrained(release)
    assert model.encoder is None and model.head_name == name and model.config["model"] is None
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    head_state = {k: v for k, v in saved.items() if k.startswith("head.")}
    assert head_state and {f"head.{k}" for k in model.head.state_dict()} == set(head_state)
    for k, v in model.head.state_dict().items():  # weights and buffers (cellDancer's maxima, its stopping state)
        assert torch.equal(v, head_state[f"head.{k}"]), k
    assert f"`{name}` baseline (no encoder)" in (release / "README.md").read_text()
    if name == "celldancer":  # a release loads and predicts without training code (DESIGN.md section 1)
        code = ("import sys, anndata, fm, fm.predict; m = fm.load_pretrained(sys.argv[1]); "
                "fm.predict.predict(m, anndata.read_h5ad(sys.argv[2])[:60].copy(), progress=False); "
                "assert not [k for k in sys.modules if k.startswith(('lightning', 'fm.tasks'))], 'training code'")
        run_module([sys.executable, "-c", code, str(release), str(h5ad)])

    ad.read_h5ad(h5ad)[:60].copy().write_h5ad(tmp_path / "in.h5ad")
    outs = {}
    for batch_size in (16, 60):
        outs[batch_size] = tmp_path / f"out{batch_size}.h5ad"
        args = ["predict", "--checkpoint", str(release), "--input", str(tmp_path / "in.h5ad"),
                "--output", str(outs[batch_size]), "--batch-size", str(batch_size)]
        assert main(args) == 0, capsys.readouterr().err
    assert f"wrote {outs[60]}" in capsys.readouterr().out
    a, b = ad.read_h5ad(outs[16]), ad.read_h5ad(outs[60])
    vocab = GeneVocab.load(corpus / "vocab.tsv")
    in_vocab = np.isin(a.var[keys.VAR_GENE_ID], vocab.gene_ids)
    assert (a.var[keys.VAR_FM_IN_VOCAB].to_numpy() == in_vocab).all() and in_vocab.sum() >= N_GENES // 2
    assert set(LAYERS[name]) <= set(a.uns[keys.UNS_FM]["layers"])  # with their documentation (and the moments')
    assert list(a.uns[keys.UNS_FM]["heads"]) == [name]
    assert keys.OBSM_EMBEDDING not in a.obsm  # a baseline's release has no encoder to embed with
    for layer in LAYERS[name]:
        assert np.isfinite(a.layers[layer][:, in_vocab]).all(), layer
        assert np.isnan(a.layers[layer][:, ~in_vocab]).all(), layer
        # a cell's output does not depend on the cells batched with it (cellDancer: the training maxima normalise)
        np.testing.assert_allclose(a.layers[layer], b.layers[layer], rtol=1e-4, atol=1e-5, err_msg=layer)
    if name == "celldancer":
        assert np.abs(a.layers[keys.LAYER_VELOCITY][:, in_vocab]).max() > 0
