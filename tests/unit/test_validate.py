"""The validator: a good corpus passes with its summary; each kind of damage is caught, naming shard and field.

.venv/bin/python -m pytest -q tests/unit/test_validate.py
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pytest

from data_prep.validate import validate
from fm import keys
from fm.cli import main as fm_main
from fm.data.schema import MANIFEST_NAME, DatasetInfo
from fm.data.vocab import GeneVocab
from fm.data.writer import write_manifest, write_shard


@pytest.fixture
def corpus(sim_corpus, tmp_path) -> Path:
    """A private copy of the session corpus, free to damage."""
    return Path(shutil.copytree(sim_corpus, tmp_path / "corpus"))


def test_good_corpus_passes_with_a_summary(sim_corpus):
    report = validate(sim_corpus)
    assert report.ok, report.errors
    assert report.n_cells > 250 and report.n_genes == 50 and report.n_shards >= 2
    lo, med, hi = report.genes_per_cell
    assert 1 <= lo <= med <= hi <= 50
    assert report.spliced_per_cell[2] > 0
    assert report.targets == sorted([keys.CELL_TYPE, keys.TIME, keys.VELOCITY, keys.VELOCITY_U, keys.MS, keys.MU])


def test_flipped_bytes_fail_the_checksum(corpus):
    shard = corpus / "shards" / "part-00001.arrow"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    report = validate(corpus)
    assert not report.ok
    assert any("shards/part-00001.arrow" in e and "sha256" in e for e in report.errors), report.errors


def test_edited_vocabulary_fails_the_hash(corpus):
    vocab = corpus / "vocab.tsv"
    vocab.write_text(vocab.read_text().replace("SimG1\n", "SimG1x\n"))
    report = validate(corpus)
    assert not report.ok and "vocab_hash" in report.errors[0]


def test_missing_shard_and_stray_file(corpus):
    (corpus / "shards" / "part-00000.arrow").unlink()
    (corpus / "shards" / "part-00099.arrow").write_bytes(b"x")
    errors = validate(corpus).errors
    assert any("part-00000.arrow: missing" in e for e in errors)
    assert any("part-00099.arrow: not listed" in e for e in errors)


def test_manifest_schema_version(corpus):
    m = json.loads((corpus / MANIFEST_NAME).read_text())
    m["schema_version"] = 999
    (corpus / MANIFEST_NAME).write_text(json.dumps(m))
    assert "schema_version" in validate(corpus).errors[0]


def _corpus_with(tmp_path: Path, **columns) -> Path:
    """A one-shard corpus (vocabulary of 4 genes) of two cells with the given columns overriding good ones."""
    good = {
        keys.CELL_ID: ["a", "b"],
        keys.DATASET_ID: ["d", "d"],
        keys.GENE_INDEX: [[0, 2], [1]],
        keys.SPLICED: [[1.0, 0.0], [2.0]],
        keys.UNSPLICED: [[0.0, 3.0], [1.0]],
        keys.LIBRARY_SIZE_SPLICED: [1.0, 2.0],
        keys.LIBRARY_SIZE_UNSPLICED: [3.0, 1.0],
    }
    good.update(columns)
    vocab = GeneVocab([f"g{i}" for i in range(4)])
    out = tmp_path / "crafted"
    info = write_shard(out / "shards" / "part-00000.arrow", pa.table(good), record_batch_size=8, dataset_id="d")
    ds = DatasetInfo("d", "hand", 2, 2, 4, 4, 0)
    write_manifest(out, vocab, [info], [ds], record_batch_size=8)
    return out


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        ({}, None),
        ({keys.GENE_INDEX: [[2, 0], [1]]}, "field 'gene_index' row 0 is not sorted and unique"),
        ({keys.GENE_INDEX: [[0, 0], [1]]}, "field 'gene_index' row 0 is not sorted and unique"),
        ({keys.GENE_INDEX: [[0, 4], [1]]}, "field 'gene_index' row 0 holds 4, outside [0, 4)"),
        ({keys.SPLICED: [[1.0], [2.0]]}, "field 'spliced' row 0 has 1 values but gene_index 2"),
        ({keys.UNSPLICED: [[0.0, -3.0], [1.0]]}, "field 'unspliced' row 0 holds -3.0"),
        ({keys.SPLICED: [[1.0, float("nan")], [2.0]]}, "field 'spliced' row 0 holds nan"),
        (
            {
                keys.SPLICED: [[1.0, 0.0], [0.0]],
                keys.UNSPLICED: [[0.0, 3.0], [0.0]],
                keys.LIBRARY_SIZE_SPLICED: [1.0, 0.0],
                keys.LIBRARY_SIZE_UNSPLICED: [3.0, 0.0],
            },
            "row 1 stores gene 1 with spliced + unspliced = 0",
        ),
        ({keys.LIBRARY_SIZE_SPLICED: [1.0, 5.0]}, "field 'library_size_spliced' row 1 is 5.0"),
        ({keys.VELOCITY: [[0.1, 0.2], [0.3, 0.4]]}, "field 'velocity' row 1 has 2 values but gene_index 1"),
        ({keys.CELL_ID: ["a", "a"]}, "field 'cell_id' is not unique"),
        ({keys.DATASET_ID: ["d", "e"]}, "field 'dataset_id' holds 'e'"),
    ],
)
def test_crafted_damage_is_named(tmp_path, columns, message):
    report = validate(_corpus_with(tmp_path, **columns))
    if message is None:
        assert report.ok, report.errors
    else:
        assert not report.ok
        assert any(message in e for e in report.errors), report.errors
        assert any("shards/part-00000.arrow" in e or "dataset" in e for e in report.errors)


def test_cli_exit_code(corpus, capsys):
    assert fm_main(["prep", "validate", str(corpus)]) == 0
    assert "cells" in capsys.readouterr().out
    (corpus / "shards" / "part-00000.arrow").write_bytes(b"broken")
    assert fm_main(["prep", "validate", str(corpus)]) == 1
    assert "part-00000.arrow" in capsys.readouterr().out


def test_cli_on_a_missing_folder_prints_only_the_error(tmp_path, capsys):
    code = fm_main(["prep", "validate", str(tmp_path / "nowhere")])
    out = capsys.readouterr()
    assert code != 0 and "nowhere" in out.out + out.err
    assert "median" not in out.out  # no empty summary table before the error
