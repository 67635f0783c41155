#!/usr/bin/env bash
# The same job on a multi-node Ray cluster. Start Ray first on every node:
#   head:    ray start --head --port=6379 --num-gpus=8
#   workers: ray start --address=<head-ip>:6379 --num-gpus=8
# then run this on the head node (the driver joins the running cluster: RAY_ADDRESS=auto).
#   NNODES=4 MODEL=... SAE=... bash examples/verl/run_multinode.sh
set -euo pipefail
: "${MODEL:?path of the LLM (on every node)}" "${SAE:?SAE folder (on every node)}"
NNODES=${NNODES:-2}
OUT=${OUT:-./sae_outputs/verl-${NNODES}nodes}
export RAY_ADDRESS=${RAY_ADDRESS:-auto}
sae-fast train --engine verl --config examples/sae_ppo_config.yaml \
  --base-model-path "$MODEL" --sae-model-path "$SAE" \
  --train-data sae_fast/assets/demo_data/demo_train.jsonl \
  --val-data sae_fast/assets/demo_data/demo_val.jsonl \
  --output-dir "$OUT" --set model.dtype=bfloat16 \
  --verl-set actor_rollout_ref.rollout.nnodes="$NNODES" \
  --verl-set actor_rollout_ref.rollout.n_gpus_per_node=8 \
  --verl-set trainer.nnodes="$NNODES" --verl-set trainer.n_gpus_per_node=8 \
  --verl-set actor_rollout_ref.rollout.agent.num_workers=$((8 * NNODES)) "$@"
