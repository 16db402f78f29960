#!/usr/bin/env bash
# Starts `python -m model.train "$@"` on this node of a (multi-node) job through torchrun's c10d rendezvous.
# Run it once on every node; the nodes find each other at RDZV_ENDPOINT and torchrun numbers them.
#
#   node 0..N-1:  NNODES=4 NPROC_PER_NODE=8 RDZV_ENDPOINT=node0:29500 RDZV_ID=run1 \
#                   bash scripts/launch.sh --preset internvl3-8b --plan plan.json --data meta.json
#   SLURM:        sbatch --nodes 4 scripts/train.sbatch --preset internvl3-8b --plan plan.json --data meta.json
#                 (srun runs this script once per node; SLURM's environment gives the defaults below)
#
# Settings (environment):  NNODES         nodes in the job            (SLURM_NNODES, else 1)
#   NPROC_PER_NODE  processes per node: one per GPU (the GPUs CUDA_VISIBLE_DEVICES names, else SLURM's
#                   SLURM_GPUS_ON_NODE, else the GPUs nvidia-smi lists, else 1)
#   RDZV_ENDPOINT   host:port of the rendezvous, reachable from every node: the job's first node under
#                   SLURM, port RDZV_PORT (29500 + the job id modulo 10000: jobs sharing a node do not
#                   collide); one node outside SLURM: a free local port; several nodes outside SLURM: required
#   RDZV_ID         a name shared by the job's nodes (SLURM_JOB_ID, else internvl3-engine)
#   RDZV_JOIN_TIMEOUT  seconds to wait for all nodes before giving up with an error (600)
#   TORCHRUN        the launcher command (python -m torch.distributed.run)
# Networks: NCCL (training's collectives) and gloo (the background checkpoint writer's, and everything on the
# CPU) each pick a network interface; on nodes with several (a management Ethernet beside InfiniBand or a
# fast Ethernet), name the one the nodes reach each other on: NCCL_SOCKET_IFNAME=ib0 (NCCL's bootstrap),
# NCCL_IB_HCA=mlx5 (its IB adapters) and GLOO_SOCKET_IFNAME=ib0 (or eth1, ...); a wrong pick shows as a hang
# or a timeout at the first collective. NCCL_DEBUG=INFO prints the transport NCCL chose (check it says
# NET/IB, not NET/Socket, across nodes). The defaults below report NCCL errors instead of hanging.
set -euo pipefail
cd "$(dirname "$0")/.."

nodes=${NNODES:-${SLURM_NNODES:-1}}
if [ -z "${NPROC_PER_NODE:-}" ]; then
  if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    NPROC_PER_NODE=$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c .)
  elif [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then
    NPROC_PER_NODE=$SLURM_GPUS_ON_NODE
  else
    NPROC_PER_NODE=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
  fi
  [ "$NPROC_PER_NODE" -gt 0 ] || NPROC_PER_NODE=1
fi
if [ -z "${RDZV_ENDPOINT:-}" ]; then
  if [ -n "${SLURM_JOB_NODELIST:-}" ]; then
    first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    RDZV_ENDPOINT="$first:${RDZV_PORT:-$((29500 + ${SLURM_JOB_ID:-0} % 10000))}"
  elif [ "$nodes" -eq 1 ]; then
    RDZV_ENDPOINT=127.0.0.1:0  # a free port, chosen by torchrun
  else
    echo "launch: $nodes nodes outside SLURM need RDZV_ENDPOINT=host:port, a port free on a host every node reaches" >&2
    exit 2
  fi
fi
rdzv_id=${RDZV_ID:-${SLURM_JOB_ID:-internvl3-engine}}

export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-3}  # a failed collective ends the job
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # torchrun's default too; data workers set their own

echo "launch: node of $nodes, $NPROC_PER_NODE processes, rendezvous $rdzv_id at $RDZV_ENDPOINT" >&2
# shellcheck disable=SC2086  # TORCHRUN may hold several words
exec ${TORCHRUN:-python -m torch.distributed.run} --nnodes "$nodes" --nproc-per-node "$NPROC_PER_NODE" \
  --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "$rdzv_id" \
  --rdzv-conf "join_timeout=${RDZV_JOIN_TIMEOUT:-600}" -m model.train "$@"
