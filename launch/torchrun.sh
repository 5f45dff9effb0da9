#!/usr/bin/env bash
# Launch fm pretraining with torchrun, one node or several. Hydra overrides pass through.
#
#   launch/torchrun.sh data.corpus=corpus/ trainer=ddp                                  # all GPUs of this node
#   NPROC=2 launch/torchrun.sh data.corpus=corpus/ trainer=ddp trainer.accelerator=cpu   # 2 CPU processes (gloo)
#   # multi-node: run on every node with the same MASTER_ADDR/MASTER_PORT and its own NODE_RANK
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 launch/torchrun.sh data.corpus=/shared/corpus trainer=deepspeed_stage_2
#
# RUN_DIR must be the same on every process (Hydra would otherwise time-stamp each one separately).
set -euo pipefail
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
NPROC=${NPROC:-$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
RUN_DIR=${RUN_DIR:-runs/pretrain/$(date +%Y-%m-%d_%H-%M-%S)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

exec torchrun \
  --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  -m fm.train trainer.devices="$NPROC" trainer.num_nodes="$NNODES" hydra.run.dir="$RUN_DIR" "$@"
