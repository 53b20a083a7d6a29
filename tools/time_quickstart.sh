#!/bin/bash
# Times both quickstart chains on this machine (README: "Both chains"); appends to runs/timing.txt. Keeps each chain's
# quickstart.json, plots, stream and eval report under runs/qs-<chain>/.
# Both quickstart chains from the same state (no corpus, no reference, no quickstart folder, no Ray Train run
# to resume), then the stream bench.
cd "$(dirname "$0")/.."
run() {  # name, args...
  local name=$1; shift
  rm -rf runs/quickstart runs/data/corpus runs/data/corpus-reference runs/ray_results/quickstart-*  # nothing to resume
  local start=$(date +%s)
  .venv/bin/lmdm quickstart "$@" > runs/qs-$name.log 2>&1
  local rc=$?
  echo "$name rc=$rc seconds=$(( $(date +%s) - start )) $(date)" >> runs/timing.txt
  mkdir -p runs/qs-$name && cp runs/quickstart/quickstart.json runs/quickstart/*.png runs/quickstart/*.wav runs/qs-$name/ 2>/dev/null
  cp -r runs/quickstart/eval/report.html runs/quickstart/eval/report.md runs/quickstart/eval/eval.json runs/quickstart/eval/plots runs/qs-$name/ 2>/dev/null
}
# CHAINS="base" times only the default chain; "nolmm base" times it without, then with, the LMM baseline's stages.
for chain in ${CHAINS:-base scratch}; do
  case $chain in
    base) run base ;;
    nolmm) run nolmm quickstart.lmm=false ;;
    scratch) run scratch --from-scratch ;;
  esac
done
.venv/bin/lmdm bench stream --quick --json runs/bench-stream-quick.json > runs/bench-stream-quick.log 2>&1
echo "bench rc=$? $(date)" >> runs/timing.txt
