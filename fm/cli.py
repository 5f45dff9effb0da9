"""The `fm` command.

    fm prep simulate --out sim.h5ad --cells 2000 --genes 200 --regime bifurcation --seed 0
    fm prep convert sim.h5ad --out corpus/
    fm prep validate corpus/
    fm demo --out runs/demo          # the README's main job on a built-in default
    fm pretrain data.corpus=corpus/ trainer.max_steps=50        # Hydra overrides pass through (-m: a sweep)
    fm finetune head=velocity checkpoint=runs/pretrain/x/checkpoints/last.ckpt data.corpus=corpus/
    fm export runs/finetune/x/checkpoints/last.ckpt --out releases/fm-velocity   # a release folder
    fm predict --checkpoint releases/fm-velocity --input my.h5ad --output my_fm.h5ad   # velocity, X_fm, imputation
    fm evaluate my_fm.h5ad --transitions "Ductal>Ngn3 low EP"     # a table on screen, JSON on disk
    fm plot velocity my_fm.h5ad --out velocity.png                 # stream lines on X_umap (or a PCA)
    fm plot loss runs/pretrain/x runs/finetune/y --out loss.png
    fm velocity my.h5ad --out my_velocity.h5ad --method stochastic   # a velocity teacher, moments, graph

Each subcommand lives in the module that does the work and registers itself through ``add_parser``; heavy imports
(torch, anndata) happen inside the command, so `fm --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys

from fm.command import run


def build_parser() -> argparse.ArgumentParser:
    from data_prep import convert, simulate, validate
    from fm import __version__, checkpoint, demo, evaluate, plot, predict
    from fm.velocity import command as velocity_command

    parser = argparse.ArgumentParser(prog="fm", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"fm {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    prep = commands.add_parser("prep", help="simulate, convert and validate corpora")
    prep_commands = prep.add_subparsers(dest="prep_command", required=True, metavar="STEP")
    simulate.add_parser(prep_commands)
    convert.add_parser(prep_commands)
    validate.add_parser(prep_commands)

    demo.add_parser(commands)

    pretrain = commands.add_parser(
        "pretrain", add_help=False, help="contrastive pretraining; Hydra overrides key=value ... (-m to sweep)"
    )
    pretrain.add_argument("overrides", nargs=argparse.REMAINDER, help="passed to Hydra (configs/pretrain.yaml)")
    pretrain.set_defaults(func=_pretrain)

    finetune = commands.add_parser(
        "finetune", add_help=False, help="fine-tune a decoder head from a checkpoint; head=... checkpoint=... key=value"
    )
    finetune.add_argument("overrides", nargs=argparse.REMAINDER, help="passed to Hydra (configs/finetune.yaml)")
    finetune.set_defaults(func=_finetune)

    checkpoint.add_parser(commands)
    plot.add_parser(commands)
    predict.add_parser(commands)
    evaluate.add_parser(commands)
    velocity_command.add_parser(commands)
    return parser


def _pretrain(args: argparse.Namespace) -> int:
    from fm.train import cli

    cli(args.overrides)
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from fm.finetune import cli

    cli(args.overrides)
    return 0


# Hydra parses its own flags (-m, --cfg, --help), which argparse would reject: hand everything after these over
HYDRA_COMMANDS = {"pretrain": _pretrain, "finetune": _finetune}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in HYDRA_COMMANDS:
        return HYDRA_COMMANDS[argv[0]](argparse.Namespace(overrides=argv[1:]))
    parser = build_parser()
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
