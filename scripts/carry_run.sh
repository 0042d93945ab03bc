#!/usr/bin/env bash
# Carry a training run from one machine to the next inside this git repository, for machines whose
# disk outside the work tree does not survive (a fresh machine per working session):
#   bash scripts/carry_run.sh save simclr      # $VITSSL_RUNS/results/simclr -> branch runs/simclr
#   bash scripts/carry_run.sh restore simclr   # branch runs/simclr -> $VITSSL_RUNS/results/simclr
#   VITSSL_RUNS=$HOME/vitssl-runs bash scripts/train_results.sh simclr   # then resumes where it stopped
# `save` writes the run folder (its newest committed checkpoint, enough to resume exactly, and its
# logs; half-written .tmp folders are left out) as the only commit of branch runs/NAME, with no
# parent: each save replaces the last one, and git drops the old copy at its next gc. main and the
# work tree are never touched. A vit_mini_28 run is about 20 MB; a clone of main does not need it
# (git clone --single-branch). Where the runs folder survives anyway (your own machine), you never
# need this script.
# The branch lives in the repository it was saved in: it reaches the next machine only if that machine
# gets this repository's branches (a push to a remote both machines share). Where only main is handed
# on, as on this project's CI machines, a saved branch is lost with the machine; there, carry a long
# run by finishing it within one session, or on a GPU (scripts/gpu_family.sh).
set -euo pipefail
usage() { echo "usage: $0 save|restore NAME  (NAME: a folder of \$VITSSL_RUNS/results, e.g. simclr)" >&2; exit 2; }
[[ $# -eq 2 ]] || usage
action=$1 name=$2
[[ $name =~ ^[A-Za-z0-9_.-]+$ ]] || { echo "$0: NAME '$name' must be a plain folder name" >&2; exit 2; }
cd "$(dirname "$0")/.."
runs="${VITSSL_RUNS:-runs}"
dir="$runs/results/$name"
branch="runs/$name"
case $action in
save)
  [[ -f $dir/checkpoints/last.json ]] || { echo "$0: $dir has no committed checkpoint to carry" >&2; exit 2; }
  index=$(mktemp -u)
  trap 'rm -f "$index"' EXIT
  # every file of the run but the .tmp folders a killed process may have left
  (cd "$dir" && find . -type f ! -path '*.tmp/*' -print0) \
    | GIT_INDEX_FILE=$index git --work-tree="$dir" update-index --add -z --stdin
  tree=$(GIT_INDEX_FILE=$index git write-tree)
  step=$(python3 -c "import json, sys; print(json.load(open(sys.argv[1]))['step'])" "$dir/checkpoints/last.json")
  commit=$(git commit-tree "$tree" -m "run $name at step $step, saved $(date -u +%Y-%m-%dT%H:%MZ)")
  git update-ref "refs/heads/$branch" "$commit"
  echo "saved $dir (step $step, $(du -sh "$dir" | cut -f1)) as branch $branch"
  ;;
restore)
  git rev-parse --verify -q "refs/heads/$branch" >/dev/null || { echo "$0: no branch $branch to restore" >&2; exit 2; }
  if [[ -f $dir/checkpoints/last.json ]]; then
    echo "$0: $dir already holds a run; move it away first, restore never overwrites one" >&2
    exit 2
  fi
  mkdir -p "$dir"
  git archive "$branch" | tar -x -C "$dir"
  echo "restored branch $branch into $dir: $(git log -1 --format=%s "$branch")"
  ;;
*) usage ;;
esac
