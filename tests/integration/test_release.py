"""Release round trip: pretrain and fine-tune through the real entry points, export, load; each bad input an error.

    python -m pytest tests/integration/test_release.py -q
"""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import fm
from fm import checkpoint, finetune, train
from fm.checkpoint import CONFIG_NAME, VOCAB_NAME, WEIGHTS_NAME, ReleaseError, export, load_pretrained
from fm.cli import main
from fm.tasks.finetune import FinetuneTask
from fm.tasks.pretrain import PretrainTask
from tests.integration.pretrain_helpers import build_corpus, compose, example_batch
from tests.integration.test_finetune import compose_finetune
from tests.tolerance import assert_close_rounding
from tests.unit.test_model import encoder_terms

pytestmark = pytest.mark.slow

TASKS = {"pretrain": PretrainTask, "finetune": FinetuneTask}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A few pretraining steps, then a few velocity fine-tuning steps: {task: last checkpoint}."""
    root = tmp_path_factory.mktemp("release")
    corpus = build_corpus(root / "data")
    train.run(compose(corpus, root / "pretrain", "trainer.max_steps=3"))
    pretrained = root / "pretrain" / "checkpoints" / "last.ckpt"
    finetune.run(compose_finetune(corpus, root / "finetune", pretrained, "head=velocity", "head.mode=supervised",
                                  "task.finetune.encoder=last_k", "trainer.max_steps=3"))
    return {"pretrain": pretrained, "finetune": root / "finetune" / "checkpoints" / "last.ckpt"}


@pytest.fixture(scope="module")
def releases(checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("releases")
    return {task: export(ckpt, root / task) for task, ckpt in checkpoints.items()}


@pytest.fixture
def finetuned_copy(releases, tmp_path):
    """A copy of the fine-tuned release to spoil."""
    return shutil.copytree(releases["finetune"], tmp_path / "release")


# --- the round trip ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attention", ["sdpa", "blocks"])
@pytest.mark.parametrize("task", ["pretrain", "finetune"])
def test_loaded_release_computes_what_the_training_checkpoint_does(checkpoints, releases, task, attention):
    trained = TASKS[task].load_from_checkpoint(checkpoints[task], map_location="cpu").eval()
    model = load_pretrained(releases[task], attention=attention)
    assert model.encoder.cfg.attention == attention
    assert {**model.encoder.cfg.to_dict(), "attention": "sdpa"} == trained.model_config.to_dict()  # only that field

    batch = example_batch(model.encoder.cfg.vocab_size)
    with torch.no_grad():
        want, got = trained.encoder(batch), model.encode(batch)
        terms = encoder_terms(model.encoder)  # another attention backend sums in another order
        for name in ("z_spliced", "z_unspliced", "z_fusion", "z_global", "h_spliced", "h_unspliced", "h_fusion"):
            assert_close_rounding(getattr(got, name), getattr(want, name), terms=terms, msg=name)
        if task == "finetune":
            assert model.head_name == "velocity"
            want_v, got_v = trained.head(batch, want)["velocity"], model.head(batch, got)["velocity"]
            assert_close_rounding(got_v, want_v, terms=terms)
        else:
            assert model.head is None


def test_release_layout(releases, checkpoints):
    for task, folder in releases.items():
        assert sorted(p.name for p in folder.iterdir()) == ["README.md", CONFIG_NAME, WEIGHTS_NAME, VOCAB_NAME]
        prefixes = {k.split(".")[0] for k in load_file(folder / WEIGHTS_NAME)}
        assert prefixes == ({"encoder", "head"} if task == "finetune" else {"encoder"})
        config = load_pretrained(folder).config
        assert config["task"] == task and config["tokenizer"]["max_genes"] == 32
        assert config["training"]["checkpoint"] == str(checkpoints[task])
        assert config["training"]["datasets"][0]["dataset_id"] == "train"
        card = (folder / "README.md").read_text()
        assert "fm.load_pretrained" in card and "train" in card
    assert load_pretrained(releases["finetune"]).config["head"]["config"]["mode"] == "supervised"


def test_cli_export_and_lazy_import(checkpoints, releases, tmp_path):
    corpus_vocab = load_pretrained(releases["pretrain"]).path / VOCAB_NAME
    assert main(["export", str(checkpoints["finetune"]), "--out", str(tmp_path / "r"),
                 "--vocab", str(corpus_vocab)]) == 0
    assert fm.load_pretrained(tmp_path / "r").head_name == "velocity"


def test_loads_from_a_hub_cache_offline(releases, tmp_path):
    commit = "0" * 40  # the layout huggingface_hub keeps: models--owner--name/{refs/main, snapshots/<commit>/}
    repo = tmp_path / "hub" / "models--fm-test--tiny-velocity"
    shutil.copytree(releases["finetune"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    model = load_pretrained("fm-test/tiny-velocity", cache_dir=tmp_path / "hub", local_files_only=True)
    assert model.head_name == "velocity"
    with pytest.raises(FileNotFoundError, match="fm-test/other.*Hub repository could not be fetched"):
        load_pretrained("fm-test/other", cache_dir=tmp_path / "hub", local_files_only=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_loads_on_gpu(releases):
    model = load_pretrained(releases["finetune"], device="cuda")
    batch = example_batch(model.encoder.cfg.vocab_size)
    cpu = load_pretrained(releases["finetune"]).encode(batch).z_global
    torch.testing.assert_close(model.encode(batch).z_global.cpu(), cpu, atol=1e-4, rtol=1e-4)


# --- bad input: each a clear error naming the file and key -------------------------------------------------------
def test_truncated_weights(finetuned_copy):
    path = finetuned_copy / WEIGHTS_NAME
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ReleaseError, match=f"{WEIGHTS_NAME}: unreadable safetensors file.*truncated"):
        load_pretrained(finetuned_copy)


def test_tampered_vocabulary(finetuned_copy):
    path = finetuned_copy / VOCAB_NAME
    lines = path.read_text().split("\n")
    lines[1] = lines[1].split("\t")[0] + "\tRENAMED"
    path.write_text("\n".join(lines))
    with pytest.raises(ReleaseError, match=f"{VOCAB_NAME}: hash .* differs from {CONFIG_NAME} field 'vocab_hash'"):
        load_pretrained(finetuned_copy)


@pytest.mark.parametrize(
    "spoil, match",
    [
        (lambda s: {**s, "head.extra": torch.zeros(1)}, "unexpected keys head.extra"),
        (lambda s: {k: v for k, v in s.items() if k != "encoder.norm.weight"}, "missing keys encoder.norm.weight"),
        (lambda s: {**s, "encoder.norm.weight": torch.zeros(7)}, r"'encoder.norm.weight' has shape \(7,\)"),
    ],
    ids=["extra-key", "missing-key", "shape"],
)
def test_weights_that_do_not_fit_the_config(finetuned_copy, spoil, match):
    path = finetuned_copy / WEIGHTS_NAME
    save_file(spoil(load_file(path)), path)
    with pytest.raises(ReleaseError, match=f"{WEIGHTS_NAME}: .*{match}"):
        load_pretrained(finetuned_copy)


def test_pickle_weights_are_refused(finetuned_copy):
    state = load_file(finetuned_copy / WEIGHTS_NAME)
    (finetuned_copy / WEIGHTS_NAME).unlink()
    torch.save(state, finetuned_copy / "model.pt")
    for offered in (finetuned_copy, finetuned_copy / "model.pt"):
        with pytest.raises(ReleaseError, match=r"model.pt: pickle weights are not loaded.*fm export"):
            load_pretrained(offered)


def test_export_with_another_vocabulary_is_refused(checkpoints, tmp_path):
    other = build_corpus(tmp_path / "other", n_cells=60, n_genes=30, gene_seed=7)
    with pytest.raises(ReleaseError, match="vocabulary hash .* differs"):
        export(checkpoints["finetune"], tmp_path / "r", vocab=other / VOCAB_NAME)
    assert not (tmp_path / "r").exists()


# --- atomic export -----------------------------------------------------------------------------------------------
def test_failed_export_leaves_no_half_folder_and_keeps_the_good_one(checkpoints, tmp_path, monkeypatch):
    out = export(checkpoints["pretrain"], tmp_path / "r")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def fail(config):
        raise RuntimeError("disk full")

    monkeypatch.setattr(checkpoint, "model_card", fail)  # after the weights, config and vocabulary are written
    for target in (out, tmp_path / "new"):
        with pytest.raises(RuntimeError, match="disk full"):
            export(checkpoints["finetune"], target)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]  # no temporary or half-written folder


def test_export_replaces_a_release_but_nothing_else(checkpoints, tmp_path):
    out = export(checkpoints["pretrain"], tmp_path / "r")
    export(checkpoints["finetune"], out)
    assert load_pretrained(out).head_name == "velocity"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ReleaseError, match="not an fm release folder; will not replace it"):
        export(checkpoints["pretrain"], tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
