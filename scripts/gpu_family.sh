#!/usr/bin/env bash
# Train the 49-token (7x7 grid) family on one GPU, all seven methods at once, and pack what they
# made for the trip back to a CPU machine, where scripts/ship_checkpoint.py evaluates and ships it.
#
#   bash scripts/gpu_family.sh DATA_ROOT OUT [METHOD ...]     # DATA_ROOT: the Fashion-MNIST .gz files
#   VITSSL_GPU_CAP=300 bash scripts/gpu_family.sh /data "$OUT"  # seconds per method (default 300)
#   VITSSL_GPU_TINY=1 VITSSL_DEVICE=cpu bash scripts/gpu_family.sh DATA OUT   # a CPU smoke test (tests/)
# The runs themselves go to $VITSSL_GPU_RUNS (default OUT/runs): point it elsewhere so that OUT
# receives only the packs (the device tool brings back at most 8 files).
#
# Recipes: configs/gpu/METHOD.yaml (the 16-token recipes with 4-px patches, bigger batches, more
# epochs). Every method trains in its own process on the same GPU (a 1.2M-parameter model leaves
# an H200 mostly idle), each under a time cap: a run the cap stops is checkpointed by the trainer
# (SIGTERM) and finished where it stands (`--resume --steps N`, so its card says N steps), and
# its capped.txt (packed with it) says so. As each method ends, OUT/vitssl_gpu_METHOD.tar.gz is written: the
# exported backbone (float32, timm keys) with its card, history.jsonl, run.json, config.json and
# train.log, and for MAE its decoder (MAE key names). Seven files, each a few MB (checked < 16 MiB).
# The whole family takes about CAP + 1 minute of wall time; nothing has run on a GPU yet.
set -euo pipefail
[[ $# -ge 2 ]] || { echo "usage: $0 DATA_ROOT OUT [METHOD ...]" >&2; exit 2; }
data=$1 out=$2
shift 2
methods=("$@")
[[ ${#methods[@]} -gt 0 ]] || methods=(dino mae simmim simclr mocov3 beit supervised)
[[ -d $data ]] || { echo "$0: DATA_ROOT '$data' is not a folder (it holds the Fashion-MNIST .gz files)" >&2; exit 2; }
cd "$(dirname "$0")/.."
repo=$PWD
mkdir -p "$out"
out=$(cd "$out" && pwd)
runs=${VITSSL_GPU_RUNS:-$out/runs}
cap=${VITSSL_GPU_CAP:-300}
device=${VITSSL_DEVICE:-cuda}
threads=${VITSSL_THREADS:-2}
tiny=()
if [[ -n ${VITSSL_GPU_TINY:-} ]]; then  # a few steps of a narrow model: the plumbing, not the results
  tiny=(--steps 4 --warmup-steps 1 --subset 64 --batch-size 16 --precision fp32 --log-every 1 --checkpoint-every 2
        --feature-validation 0 --model-arg depth=1 --model-arg embed_dim=32 --model-arg num_heads=2)
fi

train_one() {  # train_one METHOD: train, finish a capped run, pack
  local m=$1 run="$runs/$1" status=0 extra=()
  mkdir -p "$run"
  case $m in
    dino) [[ ${#tiny[@]} -gt 0 ]] && extra=(--method-arg n_local_crops=2 --method-arg out_dim=64 --method-arg hidden_dim=32) ;;
    mae) [[ ${#tiny[@]} -gt 0 ]] && extra=(--method-arg decoder_embed_dim=32 --method-arg decoder_depth=1 --method-arg decoder_num_heads=2) ;;
    beit) [[ ${#tiny[@]} -gt 0 ]] && extra=(--method-arg vocab_size=16 --method-arg tokenizer_images=64) ;;
  esac
  local cmd=(python -m vitssl_core pretrain --config "$repo/configs/gpu/$m.yaml" --data-root "$data" --device "$device"
             --out "$run" "${tiny[@]}" "${extra[@]}")
  OMP_NUM_THREADS=$threads timeout --signal=TERM --kill-after=60 "$cap" "${cmd[@]}" >>"$run/train.log" 2>&1 || status=$?
  if [[ $status -eq 124 && ! -f $run/backbone.safetensors ]]; then  # the cap stopped it: finish at the last checkpoint
    local step
    if [[ ! -f $run/checkpoints/last.json ]]; then
      echo "$m: the ${cap} s cap stopped it before its first checkpoint: raise VITSSL_GPU_CAP (log: $run/train.log)" >&2
      return 124
    fi
    step=$(python -c "import json, sys; print(json.load(open(sys.argv[1]))['step'])" "$run/checkpoints/last.json")
    echo "capped after ${cap} s at step $step of the recipe's schedule" > "$run/capped.txt"
    OMP_NUM_THREADS=$threads "${cmd[@]}" --resume --steps "$step" >>"$run/train.log" 2>&1 || status=$?
    [[ -f $run/backbone.safetensors ]] && status=0
  fi
  if [[ $status -ne 0 ]]; then echo "$m: exit $status (log: $run/train.log)" >&2; return "$status"; fi
  python "$repo/scripts/pack_run.py" "$run" "$out/vitssl_gpu_$m.tar.gz"
  echo "$m: packed $out/vitssl_gpu_$m.tar.gz"
}

pids=()
for m in "${methods[@]}"; do
  [[ -f $repo/configs/gpu/$m.yaml ]] || { echo "$0: no recipe configs/gpu/$m.yaml" >&2; exit 2; }
  train_one "$m" & pids+=($!)
done
failed=0
for pid in "${pids[@]}"; do wait "$pid" || failed=$((failed + 1)); done
echo "gpu_family: ${#methods[@]} methods, $failed failed; packs in $out"
[[ $failed -eq 0 ]]
