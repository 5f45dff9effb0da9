"""fm.ckpt_io: a checkpoint file loads as is; a missing path or a folder without DeepSpeed shards names the path.
(A ZeRO-2/3 folder: tests/integration/test_pretrain_distributed.py.)"""

import pytest
import torch

from fm.ckpt_io import load_training_checkpoint


def test_a_file_loads_as_saved(tmp_path):
    ckpt = {"state_dict": {"w": torch.arange(3.0)}, "fm": {"vocab_hash": "abc"}}
    torch.save(ckpt, tmp_path / "last.ckpt")
    got = load_training_checkpoint(tmp_path / "last.ckpt")
    assert got["fm"] == ckpt["fm"] and torch.equal(got["state_dict"]["w"], ckpt["state_dict"]["w"])


def test_missing_path_and_foreign_folder_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.ckpt"):
        load_training_checkpoint(tmp_path / "nowhere.ckpt")
    (tmp_path / "step.ckpt").mkdir()
    with pytest.raises(FileNotFoundError, match="no DeepSpeed model-states"):
        load_training_checkpoint(tmp_path / "step.ckpt")
