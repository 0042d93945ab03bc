#!/usr/bin/env bash
# Train the results recipes one after another, resumably:
#   bash scripts/train_results.sh simclr dino simmim      # run a queue (rerun it to resume)
#   VITSSL_RUNS=/work/runs OMP_NUM_THREADS=2 bash scripts/train_results.sh mae
# Runs live in $VITSSL_RUNS/results/NAME (default runs/results/NAME): put VITSSL_RUNS outside the
# work tree and a run stopped at any moment (Ctrl-C, SIGKILL, a session that ends) continues with
# the same command, even after the work tree is laid out afresh. The trainer keeps the wall time,
# hardware and threads of every resumed segment in its checkpoints and in backbone.json, and
# scripts/ship_checkpoint.py copies their sum into the card.
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${VITSSL_RUNS:-runs}"
threads="${OMP_NUM_THREADS:-1}"
for name in "$@"; do
  out="$runs/results/$name"
  mkdir -p "$out"
  if [[ -f "$out/backbone.safetensors" ]]; then echo "$name: already trained in $out"; continue; fi
  resume=()
  if compgen -G "$out/checkpoints/*" > /dev/null; then resume=(--resume); fi
  start=$(date +%s)
  status=0
  OMP_NUM_THREADS="$threads" vitssl pretrain --config "configs/results/$name.yaml" --out "$out" "${resume[@]}" \
    >> "$out/train.log" 2>&1 || status=$?
  echo "$name: exit $status after $(( $(date +%s) - start )) s (log: $out/train.log)"
  [[ $status -eq 0 ]] || exit $status
done
