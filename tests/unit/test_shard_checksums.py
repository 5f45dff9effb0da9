"""A shard altered after conversion (same size, valid Arrow) stops training by default, naming the file and the fix.

    python -m pytest -q tests/unit/test_shard_checksums.py
"""

from __future__ import annotations

import pytest

from fm.data.datamodule import CorpusDataModule
from fm.data.schema import CorpusError, load_manifest
from fm.data.shards import check_shards
from tests.stream_helpers import write_corpus


def test_a_same_size_corrupted_shard_is_refused_by_default(tmp_path):
    bad = write_corpus(tmp_path / "corpus", [40, 30])
    shard = bad / load_manifest(bad).shards[0].path
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a count in the body: the size and the Arrow footer stay valid
    shard.write_bytes(bytes(data))
    assert all(check_shards(bad, load_manifest(bad), checksum=False))  # invisible to the structural checks
    CorpusDataModule(corpus=str(bad), verify_checksums=False).setup()  # the opt-out still trains on it
    source = load_manifest(bad).datasets[0].source
    with pytest.raises(CorpusError) as error:
        CorpusDataModule(corpus=str(bad)).setup()  # the default, as `fm pretrain` builds it
    message = str(error.value)
    assert str(shard) in message and "sha256" in message
    assert f"fm prep convert {source} --out {bad}" in message, message
