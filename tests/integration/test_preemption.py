"""Preemption as a scheduler does it: SIGTERM to the process group of a real `fm pretrain` with DataLoader workers.

    python -m pytest tests/integration/test_preemption.py -q
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.integration.pretrain_helpers import REPO, TINY, build_corpus

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.getbasetemp() / "preempt_data", n_cells=200, n_genes=30)


def _wait_for(path, proc, timeout: float) -> None:
    """Until a file matching ``path`` (a glob in its name) exists."""
    deadline = time.monotonic() + timeout
    while not any(path.parent.glob(path.name)):
        if proc.poll() is not None:
            raise AssertionError(f"the run ended ({proc.returncode}) before writing {path}:\n{proc.stdout.read()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {path} after {timeout} s")
        time.sleep(0.2)


def _group_gone(pgid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_signal_to_the_process_group_saves_and_exits_0(corpus, tmp_path, sig):
    """What `scancel`, `timeout` and `kill -- -PGID` do: the workers get the signal too, and must leave it to the
    main process, which saves preempt.ckpt and exits 0 (before the fix: "DataLoader worker ... killed by signal")."""
    out = tmp_path / "run"
    ckpts = out / "checkpoints"
    args = [sys.executable, "-m", "fm.cli", "pretrain", f"data.corpus={corpus}", f"hydra.run.dir={out}", *TINY,
            "data.num_workers=1", "trainer.max_steps=100000", "callbacks.model_checkpoint.every_n_train_steps=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(args, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        # training, with its worker running (any step checkpoint: only the latest 3 are kept, so step 2's may be gone)
        _wait_for(ckpts / "step*.ckpt", proc, timeout=180)
        os.killpg(proc.pid, sig)
        output, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, output[-6000:]
        assert "killed by signal" not in output
        ckpt = torch.load(ckpts / "preempt.ckpt", map_location="cpu", weights_only=False)
        assert ckpt["global_step"] >= 2 and ckpt["state_dict"]
        assert _group_gone(proc.pid, timeout=30), "a process of the run outlived it"
    finally:
        if proc.poll() is None or not _group_gone(proc.pid, timeout=0.1):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_checkpoint_by_wall_time_is_on_by_default(corpus, tmp_path):
    """A run saves by wall time (default every 10 minutes), not only every N steps: a slow run that is killed before
    its first step checkpoint keeps its work. Here the interval is 0 minutes, so every step saves; one file is kept."""
    from datetime import timedelta

    from hydra.utils import instantiate

    from fm.train import run
    from tests.integration.pretrain_helpers import compose

    default = instantiate(compose(corpus, tmp_path / "default").callbacks.time_checkpoint)
    assert default._train_time_interval == timedelta(minutes=10)
    out = tmp_path / "run"
    run(compose(corpus, out, "trainer.max_steps=3", "callbacks.time_checkpoint.train_time_interval.minutes=0"))
    saved = sorted(p.name for p in (out / "checkpoints").glob("time-*.ckpt"))
    assert saved == ["time-step0000003.ckpt"]
    assert torch.load(out / "checkpoints" / saved[0], map_location="cpu", weights_only=False)["global_step"] == 3
