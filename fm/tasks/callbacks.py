"""Training callbacks: throughput (cells/s, tokens/s), NaN/inf guard, preemption checkpoint on SIGTERM/SIGUSR1,
the progress bar.

Configured in configs/callbacks/; e.g. ``python -m fm.train callbacks.throughput.window=50``. A preempted job
(SLURM sends SIGUSR1 or SIGTERM before the kill) writes ``<dirpath>/preempt.ckpt`` at the end of the current step
and stops cleanly (DataLoader workers leave these signals to the main process: fm.data.stream); relaunch with
``ckpt_path=<dirpath>/preempt.ckpt``. Between step checkpoints, ``callbacks.time_checkpoint`` saves every 10 minutes.
"""

from __future__ import annotations

import logging
import signal
import time
from collections import deque
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar

from fm import keys

log = logging.getLogger(__name__)


def batch_tokens(batch: dict) -> int:
    """Modality tokens of a batch (spliced + unspliced, padding excluded; fusion tokens not counted)."""
    return 2 * int(batch[keys.B_GENE_MASK].sum())


class ThroughputMonitor(L.Callback):
    """Logs ``perf/cells_per_s`` and ``perf/tokens_per_s`` (global: all ranks) over a sliding window of steps."""

    def __init__(self, window: int = 20, log_every_n_steps: int = 10):
        if window < 1 or log_every_n_steps < 1:
            raise ValueError("ThroughputMonitor: window and log_every_n_steps must be >= 1")
        self.window, self.every = window, log_every_n_steps
        self._times: deque[tuple[float, int, int]] = deque(maxlen=window + 1)
        self.last: dict[str, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        cells = batch[keys.B_GENE_MASK].shape[0] * trainer.world_size
        tokens = batch_tokens(batch) * trainer.world_size  # local tokens scaled: ranks see batches of equal size
        self._times.append((time.perf_counter(), cells, tokens))
        if len(self._times) < 2 or trainer.global_step % self.every:
            return
        dt = self._times[-1][0] - self._times[0][0]
        n_cells = sum(c for _, c, _ in list(self._times)[1:])
        n_tokens = sum(t for _, _, t in list(self._times)[1:])
        self.last = {"perf/cells_per_s": n_cells / dt, "perf/tokens_per_s": n_tokens / dt}
        pl_module.log_dict(self.last, batch_size=cells, rank_zero_only=True)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._times.clear()  # data loader start-up is not throughput


class NanGuard(L.Callback):
    """Stops on non-finite gradients (with the step number) and refuses to write a checkpoint with NaN/inf weights.

    The loss itself is checked in the task's training_step (where ``nan_policy=skip`` can still skip the step).
    """

    def __init__(self, check_grads: bool = True):
        self.check_grads = check_grads

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not self.check_grads:
            return
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        if grads and not torch.isfinite(torch.stack([g.detach().float().norm() for g in grads]).sum()):
            bad = [n for n, p in pl_module.named_parameters() if p.grad is not None and not p.grad.isfinite().all()]
            raise FloatingPointError(f"non-finite gradients at step {trainer.global_step} in {bad[:5]}")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        for name, value in checkpoint.get("state_dict", {}).items():
            if torch.is_tensor(value) and value.is_floating_point() and value.numel() and not value.isfinite().all():
                raise FloatingPointError(
                    f"refusing to write a checkpoint at step {trainer.global_step}: weight {name} is not finite"
                )


class PreemptionCheckpoint(L.Callback):
    """On SIGTERM or SIGUSR1: finish the current step, save ``<dirpath>/<filename>``, stop.

    Every rank installs the handler; ranks agree on "a signal arrived somewhere" each step, so a signal sent to one
    rank still makes all of them save (saving is collective under DDP and DeepSpeed).
    """

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self, dirpath: str, filename: str = "preempt.ckpt"):
        self.path = Path(dirpath) / filename
        self._received: str | None = None
        self._previous: dict[int, object] = {}
        self.saved_at_step: int | None = None

    def _handler(self, signum, frame) -> None:
        self._received = signal.Signals(signum).name

    def on_train_start(self, trainer, pl_module) -> None:
        for name in self.SIGNALS:
            sig = getattr(signal, name)
            self._previous[sig] = signal.signal(sig, self._handler)

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        received = self._received is not None
        if trainer.world_size > 1:
            received = trainer.strategy.reduce_boolean_decision(received, all=False)
        if not received:
            return
        log.warning("%s received: saving %s at step %d and stopping", self._received, self.path, trainer.global_step)
        trainer.save_checkpoint(str(self.path))
        self.saved_at_step = trainer.global_step
        trainer.should_stop = True
        self._received = None


class ProgressBar(RichProgressBar):
    """Lightning's rich progress bar, with "Epoch 3" where Lightning writes "Epoch 3/-2" (``max_epochs=-1``: the
    run is bounded by steps, which the bar's n/N shows)."""

    def _get_train_description(self, current_epoch: int) -> str:
        max_epochs = self.trainer.max_epochs
        description = f"Epoch {current_epoch}" + (f"/{max_epochs - 1}" if max_epochs and max_epochs > 0 else "")
        return f"{description:{len(self.validation_description)}}"  # as Lightning pads it: no flicker
