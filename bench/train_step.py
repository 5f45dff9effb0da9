"""Train-step throughput of the pretraining task: cells/s and tokens/s per preset (and bf16 MFU on CUDA).

    python bench/train_step.py                                # CPU: debug and small
    python bench/train_step.py --presets base --genes 1024    # on a GPU: bf16 autocast, MFU of the base preset

One step = the task's loss (encoder + contrastive head) forward, backward and AdamW, on synthetic batches in the
collator's layout (every gene real; G gene tokens per modality). FLOPs per step are counted by
torch.utils.flop_counter on the first step; MFU = achieved FLOP/s / peak (H100 bf16 dense: 989 TFLOP/s, or
--peak-tflops). Adds a run (a dated block) to the "## Train step" section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import record  # noqa: E402
from fm import keys  # noqa: E402
from fm.tasks.pretrain import PretrainTask, model_config  # noqa: E402


def synthetic_batch(batch: int, genes: int, vocab: int, device: str) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randperm(vocab - 1, generator=g)[:genes] + 1 for _ in range(batch)])
    mask = torch.ones(batch, genes, dtype=torch.bool, device=device)
    return {keys.B_GENE_IDS: ids.to(device), keys.B_GENE_MASK: mask,
            keys.B_SPLICED: (torch.rand(batch, genes, generator=g) * 3).to(device),
            keys.B_UNSPLICED: (torch.rand(batch, genes, generator=g) * 2).to(device)}


def measure(preset: str, batch: int, genes: int, vocab: int, steps: int, device: str, bf16: bool,
            attention: str, checkpointing: bool = False) -> dict:
    cfg = model_config(preset, vocab, attention=attention, activation_checkpointing=checkpointing)
    task = PretrainTask(cfg).to(device).train()
    opt = torch.optim.AdamW(task.parameters(), lr=1e-4)
    data = synthetic_batch(batch, genes, vocab, device)
    ctx = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else torch.enable_grad

    def step():
        with ctx():
            loss = task.compute_loss(data).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    for _ in range(2):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    peak_gib = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return {"peak_gib": peak_gib, "preset": preset,
            "params": task.encoder.num_parameters(), "batch": batch, "genes": genes,
            "step_ms": dt * 1e3, "cells_s": batch / dt, "tokens_s": 2 * batch * genes / dt, "tflops": flops / dt / 1e12}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=None)
    parser.add_argument("--batch", type=int, nargs="+", default=[32])
    parser.add_argument("--genes", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--attention", default="sdpa")
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--activation-checkpointing", action="store_true", help="recompute each block in backward")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    presets = args.presets or (["debug", "small", "base"] if cuda else ["debug", "small"])
    rows = [measure(p, b, args.genes, args.vocab, args.steps, device, cuda, args.attention,
                    args.activation_checkpointing) for p in presets for b in args.batch]
    where = torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()}, " \
        f"{torch.get_num_threads()} threads)"
    machine = f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs"
    machine += f", {torch.cuda.get_device_name()}" if cuda else ""
    lines = [f"### {datetime.date.today().isoformat()}, {machine}", "",
             f"`python bench/train_step.py --batch {' '.join(map(str, args.batch))} --genes {args.genes}` on {where}, "
             f"{'bf16 autocast' if cuda else 'fp32'}, attention {args.attention}, activation checkpointing "
             f"{'on' if args.activation_checkpointing else 'off'}; one step = loss forward, backward "
             "and AdamW of the pretraining task.", "",
             "| preset | encoder params | batch × genes | ms/step | cells/s | tokens/s | TFLOP/s" +
             (" | MFU | peak GiB |" if cuda else " |"),
             "|---|---|---|---|---|---|---|" + ("---|---|" if cuda else "")]
    for r in rows:
        mfu = f" {r['tflops'] / args.peak_tflops:.1%} | {r['peak_gib']:.1f} |" if cuda else ""
        lines.append(f"| {r['preset']} | {r['params'] / 1e6:.2f}M | {r['batch']} × {r['genes']} | {r['step_ms']:.1f} | "
                     f"{r['cells_s']:.1f} | {r['tokens_s']:.0f} | {r['tflops']:.3f} |{mfu}")
    text = "\n".join(lines) + "\n"
    sys.stdout.write(text)
    if not args.no_write:
        record("Train step", text)


if __name__ == "__main__":
    main()
