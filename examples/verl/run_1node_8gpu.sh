#!/usr/bin/env bash
# Train the SAE strength predictor inside verl on one node with 8 GPUs (GPU vLLM + verl 0.9).
# The LLM stays frozen: 8 vLLM rollout replicas (TP=1) steer each sample with its own
# strengths; the predictor (a small MLP) trains on the driver.
#   MODEL=/models/llama-3-8b-instruct SAE=/saes/llama3-8b-l16 bash examples/verl/run_1node_8gpu.sh
set -euo pipefail
: "${MODEL:?path of the LLM}" "${SAE:?path of the sae-lens SAE folder}"
OUT=${OUT:-./sae_outputs/verl-1node}
sae-fast train --engine verl --config examples/sae_ppo_config.yaml \
  --base-model-path "$MODEL" --sae-model-path "$SAE" \
  --train-data sae_fast/assets/demo_data/demo_train.jsonl \
  --val-data sae_fast/assets/demo_data/demo_val.jsonl \
  --strength-scale 1.0 --output-dir "$OUT" \
  --set model.dtype=bfloat16 --set rollout.max_new_tokens=256 \
  --verl-set actor_rollout_ref.rollout.n_gpus_per_node=8 \
  --verl-set trainer.n_gpus_per_node=8 \
  --verl-set actor_rollout_ref.rollout.agent.num_workers=8 \
  --verl-set actor_rollout_ref.rollout.gpu_memory_utilization=0.8 \
  --verl-set 'trainer.logger=[console,file,wandb]' "$@"
