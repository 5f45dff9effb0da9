#!/usr/bin/env bash
# Launch fm pretraining with the DeepSpeed launcher (ssh to the hosts in a hostfile). Hydra overrides pass through.
#
#   launch/deepspeed.sh data.corpus=/shared/corpus experiment=base_deepspeed          # this node's GPUs
#   HOSTFILE=launch/hostfile.example launch/deepspeed.sh data.corpus=/shared/corpus trainer=deepspeed_stage_3
#
# The hostfile lists "hostname slots=<GPUs>" per node (launch/hostfile.example); every node needs the same checkout
# and environment, and passwordless ssh from the first one. RUN_DIR must be on a shared file system.
set -euo pipefail
HOSTFILE=${HOSTFILE:-}
MASTER_PORT=${MASTER_PORT:-29500}
RUN_DIR=${RUN_DIR:-runs/pretrain/$(date +%Y-%m-%d_%H-%M-%S)}

if [[ -n "$HOSTFILE" ]]; then
  NNODES=$(grep -cv '^\s*\(#\|$\)' "$HOSTFILE")
  GPUS=$(awk -F'slots=' '!/^[[:space:]]*(#|$)/ {print $2; exit}' "$HOSTFILE")
  exec deepspeed --hostfile "$HOSTFILE" --master_port "$MASTER_PORT" --module fm.train \
    trainer=${TRAINER:-deepspeed_stage_2} trainer.devices="$GPUS" trainer.num_nodes="$NNODES" \
    hydra.run.dir="$RUN_DIR" "$@"
fi
GPUS=${GPUS:-$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")}
exec deepspeed --num_gpus "$GPUS" --master_port "$MASTER_PORT" --module fm.train \
  trainer=${TRAINER:-deepspeed_stage_2} trainer.devices="$GPUS" hydra.run.dir="$RUN_DIR" "$@"
