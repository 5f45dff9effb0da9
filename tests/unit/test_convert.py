"""The converter: exact round trip, filters, vocabularies, loom, idempotence, interrupted runs, bad input, datasets.

.venv/bin/python -m pytest -q tests/unit/test_convert.py
"""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
import anndata.io
import h5py
import numpy as np
import pyarrow as pa
import pytest
import scipy.sparse as sp

from data_prep.convert import ConversionError, FilterConfig, TargetConfig, convert
from fm import keys
from fm.cli import main as fm_main
from fm.data.schema import MANIFEST_NAME, load_manifest
from fm.data.vocab import GeneVocab
from fm.velocity.neighbours import NeighbourConfig, neighbourhood
from tests.conftest import PANCREAS, SIM_RECORD_BATCH, TINY_NEIGHBOURS, make_adata, write_loom


def read_corpus(corpus: Path) -> pa.Table:
    manifest = load_manifest(corpus)
    tables = []
    for s in manifest.shards:
        with pa.memory_map(str(corpus / s.path)) as f:
            tables.append(pa.ipc.open_file(f).read_all())
    return pa.concat_tables(tables)


def _dense(t: pa.Table, name: str, n_genes: int) -> np.ndarray:
    """A list column as a dense [rows, vocabulary] array (NaN where not stored)."""
    gi = t.column(keys.GENE_INDEX).combine_chunks()
    rows = np.repeat(np.arange(len(gi)), np.diff(gi.offsets.to_numpy()))
    out = np.full((len(gi), n_genes), np.nan, dtype=np.float32)
    out[rows, gi.flatten().to_numpy()] = t.column(name).combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return out


def assert_matches_source(corpus: Path, adata, velocity_layer=None, velocity_u_layer=None, genes_kept=None, cells=None):
    """Every corpus row equals its source row exactly: the genes with s + u > 0 (in the vocabulary), their counts
    and velocities; and every source cell with a count (or those in ``cells``) is there, in file order."""
    vocab = GeneVocab.load(corpus / "vocab.tsv")
    ids = adata.var[keys.VAR_GENE_ID].tolist() if keys.VAR_GENE_ID in adata.var else None
    vidx, _ = vocab.map_genes(ids, adata.var_names.tolist())
    if genes_kept is not None:
        vidx = np.where(genes_kept, vidx, -1)
    src = vidx >= 0

    def source(layer: str, rows) -> np.ndarray:  # [rows, vocabulary]
        x = adata.layers[layer][rows]
        x = x.toarray() if sp.issparse(x) else np.asarray(x)
        out = np.zeros((len(rows), len(vocab)), dtype=np.float32)
        out[:, vidx[src]] = x[:, src]
        return out

    all_rows = np.arange(adata.n_obs)
    total = source(keys.LAYER_SPLICED, all_rows) + source(keys.LAYER_UNSPLICED, all_rows)
    expected = np.flatnonzero((total > 0).any(1)) if cells is None else np.asarray(cells)
    table = read_corpus(corpus)
    t = table.select([f for f in table.column_names if f not in keys.LIST_COLUMNS]).to_pydict()
    assert t[keys.CELL_ID] == adata.obs_names[expected].tolist()
    gi = table.column(keys.GENE_INDEX).combine_chunks()
    step = np.diff(gi.flatten().to_numpy())
    row_start = np.zeros(len(step) + 1, dtype=bool)
    row_start[gi.offsets.to_numpy()[1:-1]] = True
    assert (step[~row_start[1:]] > 0).all()  # sorted and unique within each cell
    s, u = source(keys.LAYER_SPLICED, expected), source(keys.LAYER_UNSPLICED, expected)
    stored = s + u > 0
    ms_mu = expected_moments(load_manifest(corpus), s, u, np.flatnonzero(src) if genes_kept is None else None, vidx)
    if ms_mu is not None:  # each stored gene with its moments (a gene only the neighbours detected is not stored)
        for name, want in zip((keys.MS, keys.MU), ms_mu, strict=True):
            got = _dense(table, name, len(vocab))
            assert np.isfinite(got[stored]).all() and np.isnan(got[~stored]).all(), name
            np.testing.assert_allclose(got[stored], want[stored], rtol=1e-5, atol=1e-7 * want.max(), err_msg=name)
    got_s = _dense(table, keys.SPLICED, len(vocab))
    np.testing.assert_array_equal(~np.isnan(got_s), stored)  # exactly the genes with s + u > 0
    np.testing.assert_array_equal(got_s[stored], s[stored])
    np.testing.assert_array_equal(_dense(table, keys.UNSPLICED, len(vocab))[stored], u[stored])
    np.testing.assert_allclose(t[keys.LIBRARY_SIZE_SPLICED], s.sum(1), rtol=1e-6)
    np.testing.assert_allclose(t[keys.LIBRARY_SIZE_UNSPLICED], u.sum(1), rtol=1e-6)
    for layer, col in ((velocity_layer, keys.VELOCITY), (velocity_u_layer, keys.VELOCITY_U)):
        if layer is not None:
            np.testing.assert_array_equal(_dense(table, col, len(vocab))[stored], source(layer, expected)[stored])
    return t


def expected_moments(manifest, s_CV: np.ndarray, u_CV: np.ndarray, cols, vidx) -> tuple | None:
    """The moments conversion should store for one dataset's cells [C, vocabulary], computed here from the source
    (genes in vocabulary order, as conversion stores them), in the corpus's units; None without a neighbourhood."""
    (ds,) = manifest.datasets
    if not ds.neighbourhood:
        return None
    cfg = NeighbourConfig(**ds.neighbourhood)
    genes = np.sort(vidx[vidx >= 0])
    nb, _, _ = neighbourhood(sp.csr_matrix(s_CV[:, genes]), sp.csr_matrix(u_CV[:, genes]), cfg)
    out = []
    for m in (nb.Ms, nb.Mu):
        full = np.zeros_like(s_CV)
        full[:, genes] = m / (cfg.target_sum if cfg.normalization == "total" else 1.0)
        out.append(full)
    return tuple(out)


def test_simulated_h5ad_round_trip_is_exact(sim_h5ad, sim_corpus):
    adata = ad.read_h5ad(sim_h5ad)
    t = assert_matches_source(sim_corpus, adata, keys.LAYER_VELOCITY_TRUE, keys.LAYER_VELOCITY_U_TRUE)
    rows = np.array([adata.obs_names.get_loc(c) for c in t[keys.CELL_ID]])
    assert t[keys.CELL_TYPE] == adata.obs[keys.OBS_CLUSTERS].astype(str).to_numpy()[rows].tolist()
    np.testing.assert_array_equal(np.float32(t[keys.TIME]), adata.obs[keys.OBS_TIME_TRUE].to_numpy()[rows])
    assert set(t[keys.DATASET_ID]) == {"sim"}
    manifest = load_manifest(sim_corpus)
    assert manifest.n_cells == len(t[keys.CELL_ID])
    assert all(len(s.record_batch_rows) >= 1 and max(s.record_batch_rows) <= SIM_RECORD_BATCH for s in manifest.shards)
    assert len(manifest.shards) >= 2
    (ds,) = manifest.datasets
    assert ds.targets == [keys.VELOCITY, keys.VELOCITY_U, keys.CELL_TYPE, keys.TIME, keys.MS, keys.MU]
    assert ds.neighbourhood == NeighbourConfig().to_dict()


@pytest.mark.skipif(not PANCREAS.is_file(), reason="../shared/data is absent")
def test_pancreas_round_trip_is_exact(tmp_path):
    out = tmp_path / "pancreas"
    manifest = convert([PANCREAS], out, shard_size=2048, progress=False)
    adata = ad.read_h5ad(PANCREAS)
    t = assert_matches_source(out, adata)
    assert manifest.n_cells == len(t[keys.CELL_ID]) == 3696
    assert manifest.n_genes == 2000
    assert manifest.datasets[0].targets == [keys.CELL_TYPE, keys.MS, keys.MU]
    assert t[keys.CELL_TYPE][:3] == adata.obs[keys.OBS_CLUSTERS].astype(str).tolist()[:3]


def test_tiny_round_trip_shards_and_batches(tmp_path, tiny_h5ad, tiny_adata):
    manifest = convert([tiny_h5ad], tmp_path / "c", shard_size=5, record_batch_size=2,
                       neighbours=TINY_NEIGHBOURS, progress=False)
    t = assert_matches_source(tmp_path / "c", tiny_adata, velocity_layer=keys.LAYER_VELOCITY_TRUE)
    assert "cell0" not in t[keys.CELL_ID]  # no counts at all: nothing to store
    assert [s.n_cells for s in manifest.shards] == [5, 5, 1]
    assert [s.record_batch_rows for s in manifest.shards] == [[2, 2, 1], [2, 2, 1], [1]]
    assert [s.path for s in manifest.shards] == [f"shards/part-0000{i}.arrow" for i in range(3)]
    t = read_corpus(tmp_path / "c")
    assert t.column(keys.VELOCITY_U).null_count == t.column(keys.SIZE_FACTOR).null_count == 11


def test_filters(tmp_path):
    adata = make_adata(n_cells=40, n_genes=8, seed=3)
    s = adata.layers[keys.LAYER_SPLICED].toarray()
    u = adata.layers[keys.LAYER_UNSPLICED].toarray()
    adata.write_h5ad(tmp_path / "f.h5ad")
    f = FilterConfig(min_counts_cell=4, min_genes_cell=3, min_shared_counts=10, min_cells_gene=2)
    manifest = convert([tmp_path / "f.h5ad"], tmp_path / "c", filters=f, progress=False)
    both = (s > 0) & (u > 0)
    genes = (((s + u) * both).sum(0) >= 10) & ((s > 0).sum(0) >= 2)
    cells = np.flatnonzero(((s + u).sum(1) >= 4) & (((s + u) > 0).sum(1) >= 3))
    cells = cells[((s + u)[cells][:, genes] > 0).any(1)]
    assert 0 < genes.sum() < 8 and 0 < len(cells) < 40
    vocab = GeneVocab.load(tmp_path / "c" / "vocab.tsv")
    assert vocab.gene_ids == sorted(adata.var[keys.VAR_GENE_ID][genes])  # the union of the genes that pass
    assert_matches_source(tmp_path / "c", adata, genes_kept=genes, cells=cells)
    (ds,) = manifest.datasets
    assert ds.filters["min_shared_counts"] == 10 and ds.filters["n_genes_failing_filters"] == int((~genes).sum())
    assert ds.n_genes_matched == genes.sum() and ds.n_genes_unmatched == 0


def test_maps_onto_a_given_vocabulary_and_reports_unmatched(tmp_path, tiny_adata):
    # ids for genes 0-2, the symbol (other case) for gene 3; genes 4-5 are absent; a vocabulary-only gene
    vocab = GeneVocab(
        ["ENSG00000", "ENSG00001", "ENSG00002", "OTHER9", "ENSG99999"], ["Gene0", "Gene1", "Gene2", "GENE3", "Extra"]
    )
    vocab.save(tmp_path / "vocab.tsv")
    adata = tiny_adata.copy()
    adata.var[keys.VAR_GENE_ID] = ["ENSG00000", "ENSG00001", "ENSG00002", "X3", "X4", "X5"]
    adata.write_h5ad(tmp_path / "m.h5ad")
    manifest = convert([tmp_path / "m.h5ad"], tmp_path / "c", vocab=tmp_path / "vocab.tsv",
                       neighbours=TINY_NEIGHBOURS, progress=False)
    assert GeneVocab.load(tmp_path / "c" / "vocab.tsv") == vocab
    (ds,) = manifest.datasets
    assert (ds.n_genes_matched, ds.n_genes_unmatched) == (4, 2)
    assert ds.filters["unmatched_genes"] == ["Gene4", "Gene5"]
    assert_matches_source(tmp_path / "c", adata)
    assert max(max(g) for g in read_corpus(tmp_path / "c").column(keys.GENE_INDEX).to_pylist()) == 3


def test_two_datasets_share_a_built_vocabulary(tmp_path):
    a = make_adata(seed=1)
    b = make_adata(seed=2, gene_ids=False)  # symbols only: merged with a's genes by symbol
    b.var_names = [f"Gene{j}" for j in range(3, 9)]
    a.write_h5ad(tmp_path / "a.h5ad")
    b.write_h5ad(tmp_path / "b.h5ad")
    manifest = convert([tmp_path / "a.h5ad", tmp_path / "b.h5ad"], tmp_path / "c",
                       neighbours=TINY_NEIGHBOURS, progress=False)
    vocab = GeneVocab.load(tmp_path / "c" / "vocab.tsv")
    assert len(vocab) == 9 and vocab.gene_ids[:6] == [f"ENSG{j:05d}" for j in range(6)]
    assert [d.dataset_id for d in manifest.datasets] == ["a", "b"]
    assert {s.dataset_id for s in manifest.shards} == {"a", "b"}


def test_loom_input_equals_h5ad(tmp_path, tiny_adata, tiny_h5ad):
    loom = write_loom(tiny_adata, tmp_path / "tiny.loom")
    convert([loom], tmp_path / "from_loom", targets=TargetConfig(velocity_layer=None),
            neighbours=TINY_NEIGHBOURS, progress=False)
    convert([tiny_h5ad], tmp_path / "from_h5ad", targets=TargetConfig(velocity_layer=None),
            neighbours=TINY_NEIGHBOURS, progress=False)
    a, b = read_corpus(tmp_path / "from_loom"), read_corpus(tmp_path / "from_h5ad")
    assert a.to_pydict() == b.to_pydict()


def _mtimes(corpus: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in corpus.rglob("*") if p.is_file()}


def test_rerun_is_idempotent(tmp_path, tiny_h5ad):
    out = tmp_path / "c"
    m1 = convert([tiny_h5ad], out, shard_size=4, neighbours=TINY_NEIGHBOURS, progress=False)
    before = _mtimes(out)
    m2 = convert([tiny_h5ad], out, shard_size=4, neighbours=TINY_NEIGHBOURS, progress=False)
    assert _mtimes(out) == before
    assert m1 == m2


def test_killed_run_is_finished_by_a_rerun(tmp_path, tiny_h5ad):
    out = tmp_path / "c"
    m1 = convert([tiny_h5ad], out, shard_size=4, neighbours=TINY_NEIGHBOURS, progress=False)
    # what a kill leaves: no manifest, a temporary file, some shards not yet renamed into place
    (out / MANIFEST_NAME).unlink()
    (out / "shards" / "part-00001.arrow").rename(out / "shards" / ".part-00001.arrow.tmp-99999")
    (out / "shards" / "part-00002.arrow").unlink()
    kept = (out / "shards" / "part-00000.arrow").stat().st_mtime_ns
    m2 = convert([tiny_h5ad], out, shard_size=4, neighbours=TINY_NEIGHBOURS, progress=False)
    assert (out / "shards" / "part-00000.arrow").stat().st_mtime_ns == kept  # finished shard not rewritten
    assert not list((out / "shards").glob(".*"))
    assert [s.sha256 for s in m2.shards] == [s.sha256 for s in m1.shards]


def test_other_settings_are_refused_unless_overwrite(tmp_path, tiny_h5ad):
    out = tmp_path / "c"
    convert([tiny_h5ad], out, shard_size=4, neighbours=TINY_NEIGHBOURS, progress=False)
    with pytest.raises(ConversionError, match="other settings.*--overwrite"):
        convert([tiny_h5ad], out, shard_size=3, neighbours=TINY_NEIGHBOURS, progress=False)
    assert (out / "shards" / "part-00000.arrow").exists()  # nothing was touched
    m = convert([tiny_h5ad], out, shard_size=3, overwrite=True, neighbours=TINY_NEIGHBOURS, progress=False)
    assert sorted(p.name for p in (out / "shards").iterdir()) == [s.path.split("/")[1] for s in m.shards]


def test_parallel_equals_serial(tmp_path, sim_h5ad, sim_corpus):
    m = convert(
        [sim_h5ad], tmp_path / "c", workers=2, shard_size=128, record_batch_size=SIM_RECORD_BATCH, progress=False
    )
    assert [s.sha256 for s in m.shards] == [s.sha256 for s in load_manifest(sim_corpus).shards]


def test_datasets_reads_the_corpus_as_it_is(sim_corpus, tmp_path):
    """Hugging Face `datasets` reads the shards (Arrow IPC *file* format) through its "arrow" builder."""
    import datasets

    manifest = load_manifest(sim_corpus)
    files = [str(sim_corpus / s.path) for s in manifest.shards]
    ds = datasets.load_dataset("arrow", data_files={"train": files}, split="train", cache_dir=str(tmp_path / "hf"))
    assert ds.num_rows == manifest.n_cells
    t = read_corpus(sim_corpus)
    assert ds[5][keys.GENE_INDEX] == t[keys.GENE_INDEX][5].as_py()
    assert ds[5][keys.SPLICED] == t[keys.SPLICED][5].as_py()
    streamed = datasets.load_dataset("arrow", data_files={"train": files}, split="train", streaming=True)
    assert next(iter(streamed))[keys.CELL_ID] == t[keys.CELL_ID][0].as_py()


def test_cli(tmp_path, tiny_h5ad):
    out = tmp_path / "c"
    assert (
        fm_main(
            [
                "prep",
                "convert",
                str(tiny_h5ad),
                "--out",
                str(out),
                "--min-counts-cell",
                "2",
                "--time-key",
                "none",
                "--neighbours",
                "3",
                "--pcs",
                "3",
                "--no-progress",
            ]
        )
        == 0
    )
    m = load_manifest(out)
    assert m.datasets[0].filters["min_counts_cell"] == 2 and keys.TIME not in m.datasets[0].targets
    assert fm_main(["prep", "validate", str(out)]) == 0
    assert fm_main(["prep", "convert", str(tmp_path / "nope.h5ad"), "--out", str(tmp_path / "d")]) == 1


# --- bad input: a ConversionError naming the file and the field; nothing left behind -------------------------------


def _rewrite(path: Path, edit) -> Path:
    with h5py.File(path, "r+") as f:
        edit(f)
    return path


def _replace_layer(name, values):
    def edit(f):
        del f["layers"][name]
        ad.io.write_elem(f["layers"], name, values)

    return edit


def _bad_inputs(tmp_path: Path, h5ad: Path, adata) -> dict:
    n, g = adata.shape
    s = adata.layers[keys.LAYER_SPLICED].toarray().astype(np.float32)
    neg, nan, frac = s.copy(), s.copy(), s.copy()
    neg[3, 2], nan[4, 3], frac[5, 4] = -1, np.nan, 0.5
    dup = adata.copy()
    dup.var[keys.VAR_GENE_ID] = ["ENSG0", "ENSG1", "ENSG1", "ENSG3", "ENSG4", "ENSG5"]

    def copy(name):
        p = tmp_path / name
        p.write_bytes(h5ad.read_bytes())
        return p

    garbage = tmp_path / "garbage.h5ad"
    garbage.write_bytes(b"not an hdf5 file" * 10)
    empty = tmp_path / "empty.h5ad"
    empty.touch()
    dup.write_h5ad(tmp_path / "dup.h5ad")
    ad.AnnData(layers={"spliced": np.zeros((0, 3)), "unspliced": np.zeros((0, 3))}).write_h5ad(tmp_path / "none.h5ad")
    return {
        "missing_unspliced": (
            _rewrite(copy("mu.h5ad"), lambda f: f["layers"].__delitem__("unspliced")),
            r"layers\['unspliced'\] is missing",
        ),
        "missing_spliced": (
            _rewrite(copy("ms.h5ad"), lambda f: f["layers"].__delitem__("spliced")),
            r"layers\['spliced'\] is missing",
        ),
        "shape": (
            _rewrite(copy("shape.h5ad"), _replace_layer("unspliced", np.zeros((n, g + 1), np.float32))),
            r"layers\['unspliced'\] has shape \(12, 7\)",
        ),
        "negative": (
            _rewrite(copy("neg.h5ad"), _replace_layer("spliced", sp.csr_matrix(neg))),
            r"layers\['spliced'\] has a negative count .* cell 'cell3' .* gene 'Gene2'",
        ),
        "nan": (
            _rewrite(copy("nan.h5ad"), _replace_layer("spliced", nan)),
            r"layers\['spliced'\] has a NaN or infinite count .* cell 'cell4'",
        ),
        "non_integer": (
            _rewrite(copy("frac.h5ad"), _replace_layer("spliced", frac)),
            r"layers\['spliced'\] has a non-integer count \(0.5\) .*--allow-non-integer",
        ),
        "duplicate_genes": (tmp_path / "dup.h5ad", r"var\['gene_id'\] has 1 duplicate gene names: ENSG1 \(2x\)"),
        "unreadable": (garbage, "not a readable .h5ad"),
        "empty_file": (empty, r"empty file \(0 bytes\)"),
        "no_cells": (tmp_path / "none.h5ad", r"empty \(0 cells x 3 genes\)"),
        "velocity_asked_but_missing": (copy("v.h5ad"), r"layers\['velocity'\] is missing \(asked for as a target\)"),
    }


BAD = [
    "missing_unspliced",
    "missing_spliced",
    "shape",
    "negative",
    "nan",
    "non_integer",
    "duplicate_genes",
    "unreadable",
    "empty_file",
    "no_cells",
    "velocity_asked_but_missing",
]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_named_and_leaves_nothing(tmp_path, tiny_h5ad, tiny_adata, case):
    path, pattern = _bad_inputs(tmp_path, tiny_h5ad, tiny_adata)[case]
    out = tmp_path / "out"
    if case == "velocity_asked_but_missing":
        targets, inputs = TargetConfig(velocity_layer="velocity"), [path]
    else:
        targets, inputs = TargetConfig(), [tiny_h5ad, path]  # a good file first: still nothing written
    with pytest.raises(ConversionError, match=pattern) as e:
        convert(inputs, out, targets=targets, dataset_ids=["good", "bad"][-len(inputs) :], progress=False)
    assert str(path) in str(e.value)
    assert not out.exists()


def test_non_integer_counts_pass_behind_the_flag(tmp_path, tiny_h5ad, tiny_adata):
    path, _ = _bad_inputs(tmp_path, tiny_h5ad, tiny_adata)["non_integer"]
    convert([path], tmp_path / "c", allow_non_integer=True, neighbours=TINY_NEIGHBOURS, progress=False)
    t = read_corpus(tmp_path / "c").to_pydict()
    assert 0.5 in t[keys.SPLICED][t[keys.CELL_ID].index("cell5")]


def test_bad_input_keeps_an_existing_corpus(tmp_path, tiny_h5ad, tiny_adata):
    out = tmp_path / "c"
    convert([tiny_h5ad], out, neighbours=TINY_NEIGHBOURS, progress=False)
    before = _mtimes(out)
    path, _ = _bad_inputs(tmp_path, tiny_h5ad, tiny_adata)["negative"]
    with pytest.raises(ConversionError):
        convert([path], out, overwrite=True, neighbours=TINY_NEIGHBOURS, progress=False)
    assert _mtimes(out) == before and os.path.exists(out / MANIFEST_NAME)


@pytest.mark.parametrize("method", ["steady_state", "stochastic"])
def test_velocity_teacher_writes_the_velocity_target(tmp_path, sim_h5ad, method):
    """`--velocity-teacher`: the teacher's velocity on the dataset's moments (fm velocity's, computed here from the
    file) is the velocity column at every stored gene, NaN where it has no velocity gene; the file's own
    velocity layer is not stored."""
    from fm.velocity.teachers import TeacherConfig, run_teacher

    out = tmp_path / "c"
    assert fm_main(["prep", "convert", str(sim_h5ad), "--out", str(out), "--velocity-teacher", method,
                    "--no-progress"]) == 0
    manifest = load_manifest(out)
    (ds,) = manifest.datasets
    assert ds.targets.count(keys.VELOCITY) == 1 and keys.VELOCITY_U not in ds.targets
    assert ds.filters["velocity_teacher"] == method
    adata = ad.read_h5ad(sim_h5ad)
    table = read_corpus(out)
    rows = np.array([adata.obs_names.get_loc(c) for c in table.column(keys.CELL_ID).to_pylist()])
    cfg = NeighbourConfig(**ds.neighbourhood)
    nb, s_n, u_n = neighbourhood(adata.layers[keys.LAYER_SPLICED][rows], adata.layers[keys.LAYER_UNSPLICED][rows], cfg)
    r = run_teacher(TeacherConfig(method=method), nb, s_n, u_n, cfg)
    want = np.where(r.velocity_genes, r.velocity, np.nan)
    got = _dense(table, keys.VELOCITY, manifest.n_genes)  # NaN where not stored, as the teacher's NaN genes
    stored = ~np.isnan(_dense(table, keys.SPLICED, manifest.n_genes))
    vocab = GeneVocab.load(out / "vocab.tsv")
    cols = vocab.map_genes(adata.var[keys.VAR_GENE_ID].tolist(), adata.var_names.tolist())[0]
    want_v = np.full_like(got, np.nan)
    want_v[:, cols] = want
    assert r.velocity_genes.any()  # some genes have velocity: the comparison below is not empty
    np.testing.assert_array_equal(np.isnan(got[stored]), np.isnan(want_v[stored]))
    ok = stored & ~np.isnan(want_v)
    np.testing.assert_allclose(got[ok], want_v[ok], rtol=1e-5, atol=1e-6 * np.nanmax(np.abs(want)))
    with pytest.raises(ConversionError, match="needs neighbours"):
        convert([sim_h5ad], tmp_path / "d", neighbours=NeighbourConfig(n_neighbours=0), velocity_teacher=method,
                progress=False)


def test_a_neighbourhood_that_cannot_be_computed_is_a_clear_error_and_leaves_nothing(tmp_path, tiny_h5ad):
    """Fewer cells than neighbours, or spliced counts that give no PCA: an error naming the file and what to change;
    a new corpus folder is removed, an existing corpus is kept as it was."""
    with pytest.raises(ConversionError, match=rf"{tiny_h5ad}.*fewer than n_neighbours \+ 1 = 31.*--neighbours"):
        convert([tiny_h5ad], tmp_path / "new", progress=False)  # 11 cells with counts, 30 neighbours
    assert not (tmp_path / "new").exists()
    adata = make_adata(n_cells=40, n_genes=6, seed=2)
    adata.layers[keys.LAYER_SPLICED] = sp.csr_matrix(adata.shape, dtype=np.float32)  # no spliced count: no PCA
    adata.write_h5ad(tmp_path / "flat.h5ad")
    good = tmp_path / "good"
    convert([tiny_h5ad], good, neighbours=TINY_NEIGHBOURS, progress=False)
    before = {p.name: p.read_bytes() for p in (good / "shards").iterdir()}
    with pytest.raises(ConversionError, match="flat.h5ad.*PCA cannot be computed"):
        convert([tmp_path / "flat.h5ad"], good, overwrite=True, neighbours=TINY_NEIGHBOURS, progress=False)
    assert {p.name: p.read_bytes() for p in (good / "shards").iterdir()} == before
    assert load_manifest(good).n_cells > 0 and not (good / ".neighbourhoods").exists()  # no working files left
