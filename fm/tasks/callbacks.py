"""Training callbacks: throughput (cells/s, tokens/s, FLOP/s, MFU), NaN/inf guard, preemption checkpoint on
SIGTERM/SIGUSR1, the progress bar.

Configured in configs/callbacks/; e.g. ``python -m fm.train callbacks.throughput.window=50``. A preempted job
(SLURM sends SIGUSR1 or SIGTERM before the kill) writes ``<dirpath>/preempt.ckpt`` at the end of the current step
and stops cleanly (DataLoader workers leave these signals to the main process: fm.data.stream); relaunch with
``ckpt_path=<dirpath>/preempt.ckpt``. Between step checkpoints, ``callbacks.time_checkpoint`` saves every 10 minutes.
"""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.callbacks import ThroughputMonitor as LightningThroughputMonitor

from fm import keys
from fm.model.config import encoder_flops

log = logging.getLogger(__name__)


def batch_tokens(batch: dict) -> torch.Tensor:
    """Modality tokens of a batch (spliced + unspliced, padding excluded; fusion tokens not counted): a 0-dim tensor
    on the batch's device (reading it is a host sync; the throughput monitor reads it only when it logs)."""
    return 2 * batch[keys.B_GENE_MASK].sum()


class ThroughputMonitor(LightningThroughputMonitor):
    """Lightning's ThroughputMonitor (fabric's ``Throughput``: rates over a window, FLOP/s and MFU against the
    device's peak) with fm's cells, tokens and FLOP count, updated only on the steps that log.

    Logs ``perf/cells_per_s`` and ``perf/tokens_per_s`` (global: all ranks), ``perf/tflops_per_device`` and, where
    Lightning knows the device's peak (CUDA GPUs), ``perf/mfu``. FLOPs per batch are estimated from the task's
    ``model_config`` and the batch shape (:func:`fm.model.config.encoder_flops`, x3 for forward and backward); a task
    without an encoder reports no FLOPs. Lightning's callback synchronises CUDA on every step to time it; this one
    counts cells on the host and tokens on the device every step and synchronises once per logged step.

    Args:
        window: steps the rates are averaged over (rounded to whole logging intervals).
        log_every_n_steps: steps between logged rates.
    """

    def __init__(self, window: int = 20, log_every_n_steps: int = 10):
        if window < 1 or log_every_n_steps < 1:
            raise ValueError("ThroughputMonitor: window and log_every_n_steps must be >= 1")
        super().__init__(batch_size_fn=lambda batch: batch[keys.B_GENE_MASK].shape[0],
                         window_size=max(2, window // log_every_n_steps + 1))
        self.every = log_every_n_steps
        self.last: dict[str, float] = {}
        self._pending_flops = 0.0
        self._tokens: torch.Tensor | int = 0

    def on_train_start(self, trainer, pl_module) -> None:  # every rank (Lightning's: rank zero only)
        self._start(trainer)
        self._pending_flops, self._tokens = 0.0, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stage = trainer.state.stage
        mask_BG = batch[keys.B_GENE_MASK]
        self._samples[stage] += mask_BG.shape[0]
        self._batches[stage] += 1
        self._tokens = self._tokens + batch_tokens(batch)  # on the device: no sync
        config = getattr(pl_module, "model_config", None)
        if config is not None:
            self._pending_flops += 3 * encoder_flops(config, *mask_BG.shape) * trainer.world_size
        if trainer.global_step % self.every or trainer.fit_loop._should_accumulate():
            return
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()  # once per logged step, so the time covers the queued work
        throughput = self._throughputs[stage]
        throughput.update(time=time.perf_counter() - self._t0s[stage], batches=self._batches[stage],
                          samples=self._samples[stage], lengths=int(self._tokens),
                          flops=self._pending_flops if config is not None else None)
        self._pending_flops = 0.0
        rates = throughput.compute()
        scope = "" if trainer.world_size > 1 else "device/"  # fabric names global rates only when world > 1
        names = {f"{scope}samples_per_sec": "perf/cells_per_s", f"{scope}items_per_sec": "perf/tokens_per_s",
                 "device/mfu": "perf/mfu"}
        self.last = {new: float(rates[old]) for old, new in names.items() if old in rates}
        if "device/flops_per_sec" in rates:
            self.last["perf/tflops_per_device"] = float(rates["device/flops_per_sec"]) / 1e12
        if self.last:
            pl_module.log_dict(self.last, batch_size=mask_BG.shape[0], rank_zero_only=True)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start(trainer)  # data loader start-up is not throughput
        self._pending_flops, self._tokens = 0.0, 0

    def on_validation_start(self, trainer, *args) -> None:  # training rates only
        pass

    def on_validation_batch_end(self, *args, **kwargs) -> None:
        pass

    def on_validation_end(self, trainer, *args) -> None:
        pass


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
