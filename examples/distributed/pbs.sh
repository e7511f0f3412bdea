#!/bin/bash
# PBS-style schedulers (ABCI's qsub, PBS Pro, OpenPBS): 2 nodes, one `tuneforge train` per node
# started by mpirun; each starts one process per GPU.
#   qsub -g GROUP examples/distributed/pbs.sh          (ABCI: also -l rt_F=2 -l h_rt=24:00:00)
# tuneforge reads the node count and this node's rank from OMPI_COMM_WORLD_SIZE / _RANK (mpirun)
# or from the hosts in $PBS_NODEFILE, and the first host as the rendezvous. See docs/distributed.md.
#PBS -l select=2:ngpus=8
#PBS -l walltime=24:00:00
#PBS -j oe
set -euo pipefail
cd "${PBS_O_WORKDIR:-.}"
CONFIG=${CONFIG:-examples/distributed/llama3_8b_full_fsdp.yaml}
# Group (shared) storage, not the node-local home: every node must see the same cache (seed 001).
export TUNEFORGE_CACHE=${TUNEFORGE_CACHE:-/groups/$USER/tuneforge-cache}
export HF_HOME=${HF_HOME:-/groups/$USER/hf-cache}
export MASTER_ADDR=$(head -n 1 "$PBS_NODEFILE")
export MASTER_PORT=${MASTER_PORT:-29500}
NODES=$(sort -u "$PBS_NODEFILE" | wc -l)
tuneforge preprocess "$CONFIG"
mpirun -np "$NODES" -npernode 1 -x MASTER_ADDR -x MASTER_PORT -x TUNEFORGE_CACHE -x HF_HOME -x PATH \
  tuneforge train "$CONFIG" --nproc-per-node gpu output.resume=auto
