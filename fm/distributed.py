"""The only module in fm that calls torch.distributed (and the glue that lets DeepSpeed run on CPU).

- ``get_rank`` / ``get_world_size``: 0 / 1 when no process group is initialised, so single-device code runs as is.
- ``all_gather_with_grad``: concatenates a tensor from every rank; gradients flow back to the rank that owns each
  slice (used for global InfoNCE negatives).
- ``DeepSpeedStrategy``: Lightning's DeepSpeed strategy, also on a CPU accelerator (gloo), for tests and laptops.
- ``consolidate_zero_checkpoint``: a ZeRO checkpoint folder -> one fp32 state dict file.

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 -m fm.train trainer=deepspeed_stage_3 trainer.accelerator=cpu
    python -c "from fm.distributed import consolidate_zero_checkpoint as c; c('runs/x/checkpoints/last.ckpt', 'x.pt')"
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.distributed as dist
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.strategies import DeepSpeedStrategy as _LightningDeepSpeedStrategy
from lightning.pytorch.strategies.strategy import Strategy
from torch import Tensor

log = logging.getLogger(__name__)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def all_gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` [B, ...] from every rank along dim 0 -> [world * B, ...], rank order, with gradient.

    Every rank must pass the same shape. Backward sums the gradients every rank computed for a slice and returns
    them to its owner, so a loss that is a mean over local rows, averaged over ranks by DDP, has the gradient of the
    global mean.
    """
    if get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)


class DeepSpeedStrategy(_LightningDeepSpeedStrategy):
    """Lightning's DeepSpeed strategy that also runs on a CPU accelerator (gloo), one code path for both.

    On CUDA it is Lightning's strategy unchanged. On CPU it skips the CUDA-only check, initialises the process
    group with gloo itself, and reports ``cpu:<local_rank>`` as the root device (DeepSpeed reads the device index).
    DeepSpeed must pick its CPU accelerator (``DS_ACCELERATOR=cpu``) before it is first imported; this class sets it
    when unset.
    """

    def _on_cpu(self) -> bool:
        return not isinstance(self.accelerator, CUDAAccelerator)

    @property
    def root_device(self) -> torch.device:
        device = super().root_device
        if device.type == "cpu":
            return torch.device("cpu", self.local_rank)
        return device

    def setup_environment(self) -> None:
        if not self._on_cpu():
            super().setup_environment()
            return
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        Strategy.setup_environment(self)  # what DDPStrategy does, minus Lightning's CUDA check
        self.setup_distributed()

    def setup_distributed(self) -> None:
        if not self._on_cpu():
            super().setup_distributed()
            return
        reset_seed()  # what Lightning's does, minus the check that device indices equal local ranks (CUDA only)
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _init_deepspeed_distributed(self) -> None:
        if not self._on_cpu():
            super()._init_deepspeed_distributed()
            return
        assert self.cluster_environment is not None
        self._set_node_environment_variables()
        self._process_group_backend = "gloo"
        if not is_initialized():
            log.info("initializing gloo process group: rank %d/%d", self.global_rank, self.world_size)
            dist.init_process_group("gloo", rank=self.global_rank, world_size=self.world_size, timeout=self._timeout)
        import deepspeed

        deepspeed.init_distributed("gloo", dist_init_required=False)


def consolidate_zero_checkpoint(checkpoint_dir: str | os.PathLike, output_file: str | os.PathLike) -> Path:
    """Merge a DeepSpeed ZeRO checkpoint folder (any stage, any world size) into one fp32 Lightning checkpoint.

    The result loads on one process: ``PretrainTask.load_from_checkpoint(output_file)`` or
    ``torch.load(output_file)["state_dict"]``. Runs on CPU; needs no process group.
    """
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    checkpoint_dir, output_file = Path(checkpoint_dir), Path(output_file)
    if not checkpoint_dir.is_dir():
        raise FileNotFoundError(f"{checkpoint_dir}: not a DeepSpeed checkpoint folder")
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    output_file.parent.mkdir(parents=True, exist_ok=True)
    convert_zero_checkpoint_to_fp32_state_dict(str(checkpoint_dir), str(output_file))
    log.info("consolidated %s -> %s", checkpoint_dir, output_file)
    return output_file
