"""The README's Quickstart runs as written, at a tiny size: its bash block is read from README.md, its sizes and step
counts are made small, and each command runs in an empty folder as a user would run it on a fresh clone (fm's
subcommands in this process; `fm pretrain` and `fm finetune`, which hand their arguments to Hydra, as the `fm`
command in a subprocess).

    python -m pytest tests/integration/test_readme.py -q        # CPU, ~30 s
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import anndata as ad
import pytest

from fm import keys
from fm.cli import main

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SMALL = [  # the README's sizes and step counts -> a test's (the same documented options, smaller values)
    (r"--cells (\d+)", lambda m: f"--cells {max(60, int(m[1]) // 10)}"),
    (r"--genes \d+", "--genes 24"),
    (r"data\.max_genes=\d+", "data.max_genes=24"),
    (r"trainer\.max_steps=\d+", "trainer.max_steps=3"),
]
# added to the Hydra commands, for speed only: no wandb, no loader processes, every step logged (for fm plot loss)
FAST = ["logger=csv", "data.num_workers=0", "trainer.log_every_n_steps=1"]
HYDRA = ("pretrain", "finetune")


def command_lines(block: str) -> list[str]:
    """A bash block's command lines, continuations joined, comments dropped."""
    lines = [line.split(" #", 1)[0].strip() for line in block.replace("\\\n", " ").splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def quickstart(readme: str) -> list[str]:
    """The command lines of the first bash block under '## Quickstart'."""
    section = readme.split("\n## Quickstart\n", 1)[1].split("\n## ", 1)[0]
    return command_lines(section.split("```bash\n", 1)[1].split("```", 1)[0])


def shrink(line: str) -> str:
    for pattern, small in SMALL:
        line = re.sub(pattern, small, line)
    return line


def test_the_quickstart_is_the_whole_path():
    commands = [shlex.split(c)[:2] for c in quickstart((REPO / "README.md").read_text())]
    assert all(c[0] == "fm" for c in commands), commands
    for step in ("prep", "pretrain", "finetune", "export", "predict", "evaluate", "plot"):
        assert ["fm", step] in commands, step


def test_every_fm_command_of_the_readme_parses():
    """The commands the Quickstart does not run (other heads, your own data, GPU scale): their flags exist, and their
    Hydra overrides compose with the real configs (a sweep's first value; hydra.* run settings aside)."""
    from fm.cli import build_parser
    from fm.train import compose

    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    lines = [line for block in blocks for line in command_lines(block) if line.startswith("fm ")]
    assert len(lines) > len(quickstart((REPO / "README.md").read_text())), lines
    for line in lines:
        argv = shlex.split(line)[1:]
        if argv[0] in HYDRA:
            overrides = [re.sub(r"=([^,=]*),.*", r"=\1", a) for a in argv[1:]
                         if a != "-m" and not a.startswith("hydra.")]
            compose(overrides, argv[0])
        else:
            build_parser().parse_args(argv)


def test_quickstart_runs_as_written_at_a_tiny_size(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    for line in quickstart((REPO / "README.md").read_text()):
        argv = shlex.split(shrink(line))[1:]
        if argv[0] in HYDRA:
            proc = subprocess.run([sys.executable, "-m", "fm.cli", *argv, *FAST], cwd=tmp_path, env=env,
                                  capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, f"{line}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        else:
            assert main(argv) == 0, line
    predicted = ad.read_h5ad("heldout_fm.h5ad")
    assert keys.LAYER_VELOCITY in predicted.layers and keys.OBSM_EMBEDDING in predicted.obsm
    assert "velocity" in json.loads(Path("heldout_metrics.json").read_text())  # scored against the held-out truth
    assert Path("velocity.png").stat().st_size > 0 and Path("loss.png").stat().st_size > 0
