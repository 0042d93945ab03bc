#!/usr/bin/env bash
# Train the results recipes one after another on one CPU thread each, resumably:
#   bash scripts/train_results.sh simclr dino simmim      # run a queue (rerun it to resume)
# Each run's wall-clock seconds are appended to runs/results/NAME/wall_seconds.txt (one line per
# invocation, so a run resumed across sessions sums its parts); scripts/ship_checkpoint.py reads them.
set -euo pipefail
cd "$(dirname "$0")/.."
for name in "$@"; do
  out="runs/results/$name"
  mkdir -p "$out"
  if [[ -f "$out/backbone.safetensors" ]]; then echo "$name: already trained"; continue; fi
  resume=()
  if compgen -G "$out/checkpoints/*" > /dev/null; then resume=(--resume); fi
  start=$(date +%s)
  status=0
  OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" vitssl pretrain --config "configs/results/$name.yaml" "${resume[@]}" \
    > "$out/train.log" 2>&1 || status=$?
  echo $(( $(date +%s) - start )) >> "$out/wall_seconds.txt"
  echo "$name: exit $status after $(( $(date +%s) - start )) s"
  [[ $status -eq 0 ]] || exit $status
done
