"""Zorro attention backends: fwd+bwd and forward time, and peak memory, at 512 / 1,024 / 2,048 genes per modality.

    python -m bench.attention                        # CPU: sdpa, flex, blocks; writes a run to docs/BENCHMARKS.md
    python -m bench.attention --genes 512 --no-write # quick look
    python -m bench.attention --batch 8 --heads 8    # on a GPU machine: also flash (when flash-attn is installed)

Times the attention call alone (``attend(q, k, v)``), on one batch of ragged cells (full, 3/4), the batch's mask
prepared once outside the timing (the encoder builds it once per forward and shares it over its layers); the
mask-build time is reported separately. Peak memory: CUDA's allocator peak, or on CPU the process's peak RSS
(reset through /proc/self/clear_refs) above the RSS before the call.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from bench.report import record
from fm.model.attention import get_attention_backend


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakMemory:
    """Peak extra memory (MiB) of the enclosed code: CUDA allocator peak, or CPU peak RSS above the start."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.mib = device, float("nan")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        elif Path("/proc/self/clear_refs").exists():
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (peak RSS) to the current RSS
            self.start = _rss_kib("VmRSS:") * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.mib = (torch.cuda.max_memory_allocated() - self.start) / 2**20
        elif Path("/proc/self/clear_refs").exists():
            self.mib = (_rss_kib("VmHWM:") * 1024 - self.start) / 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(attend, q, k, v, backward: bool, reps: int) -> tuple[float, float]:
    """Median seconds and peak MiB of ``attend`` (+ backward of a sum), after one warm-up call."""
    device = q.device

    def step():
        if backward:
            for t in (q, k, v):
                t.grad = None
            attend(q, k, v).float().sum().backward()
        else:
            with torch.no_grad():
                attend(q, k, v)

    step()  # warm-up (and compile)
    times, peak = [], 0.0
    for _ in range(reps):
        with PeakMemory(device) as mem:
            _sync(device)
            t0 = time.perf_counter()
            step()
            _sync(device)
            times.append(time.perf_counter() - t0)
        peak = max(peak, mem.mib)
    return statistics.median(times), peak


def run(genes: list[int], batch: int, heads: int, head_dim: int, n_fusion: int, reps: int, backends: list[str]):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for G in genes:
        lengths = [G if i % 2 == 0 else (3 * G) // 4 for i in range(batch)]
        gene_mask_BG = (torch.arange(G)[None] < torch.tensor(lengths)[:, None]).to(device)
        L = 2 * G + n_fusion
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(batch, heads, L, head_dim, generator=g, device=device, dtype=dtype).requires_grad_()
                   for _ in range(3))
        row = {"genes": G, "tokens": L}
        for name in backends:
            backend = get_attention_backend(name)
            _sync(device)
            t0 = time.perf_counter()
            attend = backend.prepare(gene_mask_BG, n_fusion)
            _sync(device)
            row[f"{name}_mask_s"] = time.perf_counter() - t0
            # CPU flex with grad is torch's unfused math path (seconds per call): one timed repetition is enough
            slow = name == "flex" and device.type == "cpu"
            row[f"{name}_fb_s"], row[f"{name}_fb_mib"] = measure(attend, q, k, v, True, 1 if slow else reps)
            row[f"{name}_f_s"], row[f"{name}_f_mib"] = measure(attend, q, k, v, False, reps)
            print(f"G={G} {name}: fwd+bwd {row[f'{name}_fb_s']:.3f}s {row[f'{name}_fb_mib']:.0f} MiB, "
                  f"fwd {row[f'{name}_f_s']:.3f}s {row[f'{name}_f_mib']:.0f} MiB, mask {row[f'{name}_mask_s']:.3f}s",
                  flush=True)
        rows.append(row)
    return device, dtype, rows


def to_markdown(device, dtype, rows, args, backends) -> str:
    if device.type == "cuda":
        machine = torch.cuda.get_device_name()
    else:
        machine = platform.processor() or platform.machine()
    head = (f"### {datetime.date.today().isoformat()}: {machine}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
            f"{device.type} {str(dtype).removeprefix('torch.')}\n\n"
            f"`python -m bench.attention --batch {args.batch} --heads {args.heads} --head-dim {args.head_dim}` "
            f"(cells of G and 3G/4 genes, {args.n_fusion} fusion tokens; attention call only, mask built outside)\n\n")
    others = [b for b in backends if b != "sdpa"]
    cols = ["genes/modality", "tokens L", "sdpa fwd+bwd s", "sdpa fwd+bwd MiB"]
    for b in others:
        cols += [f"{b} fwd+bwd s", f"{b} fwd+bwd MiB", f"{b}/sdpa fwd+bwd", f"{b}/sdpa fwd", f"{b} mask s"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [f"{r['genes']:,}", f"{r['tokens']:,}", f"{r['sdpa_fb_s']:.3f}", f"{r['sdpa_fb_mib']:.0f}"]
        for b in others:
            cells += [f"{r[f'{b}_fb_s']:.3f}", f"{r[f'{b}_fb_mib']:.0f}", f"{r[f'{b}_fb_s'] / r['sdpa_fb_s']:.2f}",
                      f"{r[f'{b}_f_s'] / r['sdpa_f_s']:.2f}", f"{r[f'{b}_mask_s']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    note = ""
    if device.type == "cpu" and "flex" in backends:
        note = ("\nCPU flex fwd+bwd is torch's unfused math path (torch has no CPU flex backward kernel: "
                "the public API raises and inductor's backward lowering is Triton-only); the flex fwd column is the "
                "compiled, block-skipping CPU kernel. CPU memory is peak RSS, coarse (allocator reuse).\n")
    return head + "\n".join(lines) + "\n" + note


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--genes", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--n-fusion", type=int, default=16)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--no-write", action="store_true", help="print only; do not touch docs/BENCHMARKS.md")
    args = p.parse_args()
    backends = ["sdpa", "flex", "blocks"]
    if torch.cuda.is_available():
        try:
            import flash_attn  # noqa: F401

            backends.append("flash")
        except ImportError:
            print("flash-attn not installed: flash skipped")
    torch.manual_seed(0)
    device, dtype, rows = run(args.genes, args.batch, args.heads, args.head_dim, args.n_fusion, args.reps, backends)
    text = to_markdown(device, dtype, rows, args, backends)
    print(text)
    if not args.no_write:
        record("Attention", text)


if __name__ == "__main__":
    main()
